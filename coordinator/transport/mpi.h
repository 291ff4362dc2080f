/* The MPI implementation of coordinator/transport/transport.h (host buffers). */
#ifndef EPMOE_TRANSPORT_MPI_H
#define EPMOE_TRANSPORT_MPI_H

#include <mpi.h>

#include "coordinator/transport/transport.h"

/* timeout_s: collective_timeout_s (0 = wait forever). */
epmoe_status epmoe_transport_mpi_create(MPI_Comm comm, double timeout_s, epmoe_transport **out);

#endif
