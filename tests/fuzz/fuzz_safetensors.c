/* libFuzzer target: the safetensors reader (common/safetensors.c): the 8-byte header length,
 * the JSON header, dtypes, shapes, offsets, metadata. A file it accepts must describe only
 * bytes inside the file: every tensor's data is read through (ASan and the mapping catch a
 * range that is not). */
#include <string.h>
#include <unistd.h>

#include "common/safetensors.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[64];
    int fd = fuzz_memfile(data, size, path, sizeof path);
    if (fd < 0) return 0;
    epmoe_st_file *f = NULL;
    if (epmoe_st_open(path, &f) == EPMOE_OK) {
        volatile uint8_t sink = 0;
        for (int i = 0; i < epmoe_st_count(f); i++) {
            const epmoe_st_tensor *t = epmoe_st_at(f, i);
            const uint8_t *p = t->data;
            for (size_t b = 0; b < t->nbytes; b++) sink ^= p[b];
            if (epmoe_st_find(f, t->name) == NULL) __builtin_trap(); /* listed, so findable */
        }
        (void)epmoe_st_metadata(f, "epmoe.hidden_size");
        (void)sink;
        epmoe_st_close(f);
    }
    close(fd);
    return 0;
}
