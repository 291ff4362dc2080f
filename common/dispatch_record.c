#include "common/dispatch_record.h"

#include <string.h>

const char *epmoe_wire_format_name(epmoe_wire_format format) {
    return format == EPMOE_WIRE_NVFP4 ? "nvfp4" : "fp32";
}

epmoe_status epmoe_dispatch_record_layout(epmoe_wire_format format, int64_t hidden_size,
                                          int64_t top_k, epmoe_dispatch_record *out) {
    const int64_t H = hidden_size;
    EPMOE_REQUIRE(top_k > 0 && top_k <= 128, EPMOE_ERR_INVALID_ARG,
                  "dispatch record: top_k = %lld outside [1, 128]", (long long)top_k);
    memset(out, 0, sizeof *out);
    out->format = format, out->hidden_size = H, out->top_k = top_k;
    if (format == EPMOE_WIRE_NVFP4) {
        EPMOE_REQUIRE(H > 0 && H % 32 == 0, EPMOE_ERR_INVALID_ARG,
                      "dispatch record: the NVFP4 wire format needs hidden_size %% 32 == 0, "
                      "got %lld", (long long)H);
        /* codes in 16-byte pieces (H % 32 == 0), scales in 2-byte ones, 1/gs 4-byte aligned;
         * a hidden size that is a multiple of 64 leaves no gap */
        out->codes_offset = 0;
        out->sf_offset = H / 2;
        out->inv_gs_offset = (H / 2 + H / 16 + 3) / 4 * 4;
        out->payload_bytes = out->inv_gs_offset + 4;
    } else {
        EPMOE_REQUIRE(format == EPMOE_WIRE_F32 && H > 0 && H % 4 == 0, EPMOE_ERR_INVALID_ARG,
                      "dispatch record: format %d with hidden_size %lld (fp32 needs H %% 4 == 0)",
                      (int)format, (long long)H);
        out->payload_bytes = 4 * H;
    }
    out->meta_offset = out->payload_bytes;
    out->bytes = (out->meta_offset + 4 * top_k + 15) / 16 * 16;
    return EPMOE_OK;
}

