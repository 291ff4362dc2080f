/* What every program's command line shares. */
#ifndef EPMOE_CLI_H
#define EPMOE_CLI_H

#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* --help / -h or --version anywhere on the command line, looked at before anything else (no
 * MPI, no files): prints the usage (to stdout) or "<program> <version>" and returns 1, so that
 * main returns 0; returns 0 when neither was given. */
int epmoe_cli_help_or_version(int argc, char **argv, const char *program, const char *version,
                              void (*usage)(FILE *));

#ifdef __cplusplus
}
#endif
#endif
