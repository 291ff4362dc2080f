/* The wire format of a dispatched row: one record per (token, destination rank), the same on
 * both backends (the CPU engine and the GPU engine), computed in one place for both ends.
 *
 *   EPMOE_WIRE_F32    payload = the fp32 row, 4H bytes.
 *   EPMOE_WIRE_NVFP4  payload = the row as the worker's W13 input quantization would produce it
 *                     with per-row global scales (act_quant = nvfp4, act_scale = per_row): E2M1
 *                     codes H/2 bytes, UE4M3 block scales H/16 bytes, 1/gs fp32 (at the next
 *                     4-byte boundary: 2 bytes later when H % 64 == 32). Quantizing on
 *                     the sender gives the worker the same codes it would compute (the
 *                     quantization reads only the row), so the output bits do not change, and
 *                     the row shrinks from 4H to 9H/16 + 4 bytes (7.1x; 3.6x against bf16).
 *                     (GPU only: the CPU engine sends fp32.)
 * Then the meta at meta_offset: the token's k global expert ids in slot order, int32, -1 where
 * the slot's expert lives on another rank. The record is padded to 16 bytes so every field of
 * every row stays aligned for vector loads. */
#ifndef EPMOE_DISPATCH_RECORD_H
#define EPMOE_DISPATCH_RECORD_H

#include <stdint.h>

#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { EPMOE_WIRE_F32 = 0, EPMOE_WIRE_NVFP4 = 1 } epmoe_wire_format;

typedef struct {
    epmoe_wire_format format;
    int64_t hidden_size, top_k;
    int64_t codes_offset, sf_offset, inv_gs_offset; /* NVFP4 fields (bytes into the record) */
    int64_t payload_bytes;                          /* what DeepEP-style bandwidth counts */
    int64_t meta_offset;
    int64_t bytes;                                  /* record stride */
} epmoe_dispatch_record;

/* NVFP4 needs H % 32 == 0 (the worker pads its GEMM input to the 128-wide K step itself);
 * F32 H % 4 == 0. */
epmoe_status epmoe_dispatch_record_layout(epmoe_wire_format format, int64_t hidden_size,
                                          int64_t top_k, epmoe_dispatch_record *out);
const char *epmoe_wire_format_name(epmoe_wire_format format);

#ifdef __cplusplus
}
#endif
#endif
