/* The MPI implementation of coordinator/transport.h (host buffers). */
#ifndef EPMOE_TRANSPORT_MPI_H
#define EPMOE_TRANSPORT_MPI_H

#include <mpi.h>

#include "coordinator/transport.h"

epmoe_status epmoe_transport_mpi_create(MPI_Comm comm, epmoe_transport **out);

#endif
