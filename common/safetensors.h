/* safetensors files: 8-byte little-endian header length, a JSON header mapping tensor names to
 * {dtype, shape, data_offsets:[begin,end)} (offsets relative to the end of the header), an
 * optional "__metadata__" object of string->string, then the raw bytes.
 *
 * The reader mmaps the file and validates everything before any tensor is returned: header
 * length within the file, JSON well-formed, known dtypes, shape products matching the byte
 * ranges, ranges inside the data section and not overlapping. Errors name the file and tensor.
 *
 * A checkpoint may be one file, a directory of *.safetensors files, or a model directory with
 * an index (see epmoe_st_set below); the set looks tensors up by name across its files.
 */
#ifndef EPMOE_SAFETENSORS_H
#define EPMOE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "common/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct epmoe_st_file epmoe_st_file;

typedef struct {
    const char *name;
    epmoe_dtype dtype;      /* EPMOE_DTYPE_COUNT: a dtype this build does not compute with */
    char dtype_text[16];    /* the header's spelling ("F8_E4M3", "F4", ...) */
    int ndim;
    int64_t shape[EPMOE_MAX_DIMS];
    const void *data;   /* points into the mapping; valid until the file is closed */
    size_t nbytes;
} epmoe_st_tensor;

epmoe_status epmoe_st_open(const char *path, epmoe_st_file **out);
void epmoe_st_close(epmoe_st_file *f);
const char *epmoe_st_path(const epmoe_st_file *f);

int epmoe_st_count(const epmoe_st_file *f);
const epmoe_st_tensor *epmoe_st_at(const epmoe_st_file *f, int i);
/* NULL when absent (not an error by itself: callers decide whether a tensor is required). */
const epmoe_st_tensor *epmoe_st_find(const epmoe_st_file *f, const char *name);
/* __metadata__ value, or NULL. */
const char *epmoe_st_metadata(const epmoe_st_file *f, const char *key);

/* A checkpoint: one file, every *.safetensors in a directory, or, when the directory holds
 * model.safetensors.index.json (a Hugging Face model directory), the shards its weight map
 * names. An indexed set reads only the index when opened; a shard is opened (its header
 * parsed and the file mapped, no tensor data read) the first time one of its tensors is
 * looked up, so a rank touches only the shards that hold its tensors. Lookups are thread-safe. */
#define EPMOE_ST_INDEX_FILE "model.safetensors.index.json"
typedef struct epmoe_st_set epmoe_st_set;
epmoe_status epmoe_st_set_open(const char *path, epmoe_st_set **out);
void epmoe_st_set_close(epmoe_st_set *s);
/* Whether the set has a tensor of that name (an indexed set answers from its index). */
int epmoe_st_set_contains(const epmoe_st_set *s, const char *name);
/* *t_out = NULL when the set has no such tensor (not an error); an error when its shard cannot
 * be opened or does not hold it. *file_out (optional) is the file that holds it. */
epmoe_status epmoe_st_set_lookup(const epmoe_st_set *s, const char *name,
                                 const epmoe_st_tensor **t_out, const epmoe_st_file **file_out);
/* epmoe_st_set_lookup that returns NULL for absent and broken alike (the error is kept). */
const epmoe_st_tensor *epmoe_st_set_find(const epmoe_st_set *s, const char *name,
                                         const epmoe_st_file **file_out);
/* Metadata of the first (opened) file that has the key. */
const char *epmoe_st_set_metadata(const epmoe_st_set *s, const char *key);
const char *epmoe_st_set_path(const epmoe_st_set *s);
/* The directory of a directory set, else NULL; the index file of an indexed set, else NULL. */
const char *epmoe_st_set_dir(const epmoe_st_set *s);
const char *epmoe_st_set_index_path(const epmoe_st_set *s);
/* Files in the set, and how many are open now (an indexed set opens them on demand); whether
 * the file of that name (no directory) is open. */
int epmoe_st_set_file_count(const epmoe_st_set *s);
int epmoe_st_set_files_open(const epmoe_st_set *s);
int epmoe_st_set_file_is_open(const epmoe_st_set *s, const char *file_name);

/* Looks up `name`, requiring the dtype and the exact shape; errors name the file and tensor
 * ("ckpt.safetensors: layers.0.ffn.experts.3.w1.weight: shape [128, 64], expected [128, 128]").
 * shape may be NULL to skip the shape check; ndim 0 is a scalar. */
epmoe_status epmoe_st_set_require(const epmoe_st_set *s, const char *name, epmoe_dtype dtype,
                                  int ndim, const int64_t *shape, const epmoe_st_tensor **out);
/* The same, accepting any of n_dtypes dtypes ("dtype F32, expected F8_E8M0 or U8"). */
epmoe_status epmoe_st_set_require_any(const epmoe_st_set *s, const char *name,
                                      const epmoe_dtype *dtypes, int n_dtypes, int ndim,
                                      const int64_t *shape, const epmoe_st_tensor **out);

/* Writer: add tensors (data copied by reference: must stay valid until finish), metadata,
 * then finish writes the file (to path.tmp, then renamed, so readers never see a partial
 * file). The header is padded with spaces so that the data section starts 8-byte aligned;
 * tensors follow back to back in insertion order (the safetensors reference implementation
 * rejects gaps between tensors), so a tensor is 8-byte aligned when the sizes before it are
 * multiples of 8: put odd-sized tensors last. Readers must not assume alignment. */
typedef struct epmoe_st_writer epmoe_st_writer;
epmoe_status epmoe_st_writer_create(epmoe_st_writer **out);
epmoe_status epmoe_st_writer_add(epmoe_st_writer *w, const char *name, epmoe_dtype dtype,
                                 int ndim, const int64_t *shape, const void *data);
/* Streaming variant for files larger than memory: at finish, for each deferred tensor in
 * insertion order, the writer calls fill(ctx, name, dst, nbytes) to produce its bytes into a
 * scratch buffer, then writes them. */
typedef epmoe_status (*epmoe_st_fill_fn)(void *ctx, const char *name, void *dst, size_t nbytes);
epmoe_status epmoe_st_writer_add_deferred(epmoe_st_writer *w, const char *name,
                                          epmoe_dtype dtype, int ndim, const int64_t *shape,
                                          epmoe_st_fill_fn fill, void *ctx);
/* For writers that fill a pre-sized file themselves (from several threads, with pwrite): a
 * reserved tensor has a place in the header and the data section but no bytes from the writer;
 * epmoe_st_writer_layout gives the file's head (8-byte length and the JSON header, to be
 * written at offset 0, head_bytes long) and the data section's size; tensor i's bytes go at
 * head_bytes + epmoe_st_writer_data_offset(w, i). finish refuses a writer with reserved
 * tensors. */
epmoe_status epmoe_st_writer_add_reserved(epmoe_st_writer *w, const char *name,
                                          epmoe_dtype dtype, int ndim, const int64_t *shape);
epmoe_status epmoe_st_writer_layout(const epmoe_st_writer *w, char **head_out,
                                    size_t *head_bytes, uint64_t *data_bytes);
int epmoe_st_writer_count(const epmoe_st_writer *w);
uint64_t epmoe_st_writer_data_offset(const epmoe_st_writer *w, int i);
epmoe_status epmoe_st_writer_metadata(epmoe_st_writer *w, const char *key, const char *value);
epmoe_status epmoe_st_writer_finish(epmoe_st_writer *w, const char *path);
void epmoe_st_writer_free(epmoe_st_writer *w);

#ifdef __cplusplus
}
#endif
#endif
