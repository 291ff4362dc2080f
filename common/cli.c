#include "common/cli.h"

#include <string.h>

int epmoe_cli_help_or_version(int argc, char **argv, const char *program, const char *version,
                              void (*usage)(FILE *)) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 1;
        }
        if (strcmp(argv[i], "--version") == 0) {
            printf("%s %s\n", program, version);
            return 1;
        }
    }
    return 0;
}
