/* libFuzzer target: the request decoder (coordinator/service/wire.c), the first code a
 * client's bytes reach. Any input must give OK with a request, or an error code with a
 * message; a decoded request is then encoded back as a response (its rows as the output), so
 * the encoder and the dtype checks run on every shape the decoder lets through. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/service/batcher.h"
#include "coordinator/service/wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* A small model, so that valid requests are small: hidden 32, layer 0 hash-routed. */
    const epmoe_wire_limits limits = {32, 4, 1, 1024, 64, 0, 0};
    epmoe_serve_request *r = NULL;
    char message[512];
    int code = epmoe_wire_decode_forward(data, size, &limits, &r, message, sizeof message);
    if (code != 0) {
        if (r != NULL || message[0] == '\0') abort(); /* an error always says why */
        return 0;
    }
    if (r->n_tokens < 1 || r->n_tokens > limits.max_request_tokens || r->layer_begin < 0 ||
        r->layer_end > limits.n_layers || r->layer_begin >= r->layer_end)
        abort();
    for (int64_t i = 0; i < r->n_tokens * limits.hidden_size; i++)
        if (!isfinite(r->x[i])) abort(); /* NaN/Inf never get through */
    size_t n = (size_t)(r->n_tokens * limits.hidden_size);
    r->out = malloc(n * sizeof(float));
    memcpy(r->out, r->x, n * sizeof(float));
    uint8_t *bytes = NULL;
    size_t nbytes = 0;
    if (epmoe_wire_encode_forward(r, limits.hidden_size, &bytes, &nbytes) == EPMOE_OK)
        free(bytes);
    epmoe_serve_request_free(r);
    return 0;
}
