#include "common/safetensors.h"

#include "common/paths.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_METADATA_KEY "__metadata__"

/* ============================================================================ reader ===== */

struct epmoe_st_file {
    char *path;
    void *map;
    size_t map_size;
    const uint8_t *data; /* start of the data section */
    size_t data_size;
    int n_tensors;
    epmoe_st_tensor *tensors;            /* in data-offset order */
    const epmoe_st_tensor **by_name;     /* sorted by name, for bsearch */
    int n_meta;
    char **meta_keys;
    char **meta_values;
};

static void file_free(epmoe_st_file *f) {
    if (!f) return;
    for (int i = 0; i < f->n_tensors; i++) free((char *)f->tensors[i].name);
    free(f->tensors);
    free(f->by_name);
    for (int i = 0; i < f->n_meta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_values[i]);
    }
    free(f->meta_keys);
    free(f->meta_values);
    if (f->map) munmap(f->map, f->map_size);
    free(f->path);
    free(f);
}

void epmoe_st_close(epmoe_st_file *f) { file_free(f); }

static int cmp_tensor_name(const void *a, const void *b) {
    const epmoe_st_tensor *ta = *(const epmoe_st_tensor *const *)a;
    const epmoe_st_tensor *tb = *(const epmoe_st_tensor *const *)b;
    return strcmp(ta->name, tb->name);
}

/* Tensors ordered by where their bytes start; begins/ends are kept beside them while parsing. */
typedef struct {
    epmoe_st_tensor t;
    uint64_t begin, end;
} parsed_tensor;

static int cmp_parsed_offset(const void *a, const void *b) {
    const parsed_tensor *pa = a, *pb = b;
    if (pa->begin != pb->begin) return pa->begin < pb->begin ? -1 : 1;
    if (pa->end != pb->end) return pa->end < pb->end ? -1 : 1;
    return 0;
}

static void format_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < ndim && n < cap; d++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

static epmoe_status parse_metadata(epmoe_st_file *f, json_t *meta) {
    EPMOE_REQUIRE(json_is_object(meta), EPMOE_ERR_FORMAT, "%s: %s is not a JSON object",
                  f->path, ST_METADATA_KEY);
    size_t n = json_object_size(meta);
    f->meta_keys = calloc(n ? n : 1, sizeof(char *));
    f->meta_values = calloc(n ? n : 1, sizeof(char *));
    EPMOE_REQUIRE(f->meta_keys && f->meta_values, EPMOE_ERR_OOM, "%s: metadata", f->path);
    const char *key;
    json_t *value;
    json_object_foreach(meta, key, value) {
        EPMOE_REQUIRE(json_is_string(value), EPMOE_ERR_FORMAT,
                      "%s: %s value of '%s' is not a string", f->path, ST_METADATA_KEY, key);
        f->meta_keys[f->n_meta] = strdup(key);
        f->meta_values[f->n_meta] = strdup(json_string_value(value));
        f->n_meta++;
        EPMOE_REQUIRE(f->meta_keys[f->n_meta - 1] && f->meta_values[f->n_meta - 1],
                      EPMOE_ERR_OOM, "%s: metadata", f->path);
    }
    return EPMOE_OK;
}

/* Bits per element of safetensors dtypes that epmoe_dtype does not list; 0 when unknown. */
static unsigned foreign_dtype_bits(const char *name) {
    static const struct {
        const char *name;
        unsigned bits;
    } foreign[] = {{"BOOL", 8},         {"F4", 4},          {"F6_E2M3", 6},  {"F6_E3M2", 6},
                   {"F8_E5M2", 8},      {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8}, {"I16", 16},
                   {"U16", 16},         {"U32", 32},        {"U64", 64},     {"C64", 64}};
    for (size_t i = 0; i < sizeof foreign / sizeof foreign[0]; i++)
        if (strcmp(foreign[i].name, name) == 0) return foreign[i].bits;
    return 0;
}

/* One header entry: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}. */
static epmoe_status parse_tensor(const epmoe_st_file *f, const char *name, json_t *desc,
                                 parsed_tensor *out) {
    const char *path = f->path;
    EPMOE_REQUIRE(json_is_object(desc), EPMOE_ERR_FORMAT, "%s: %s: entry is not a JSON object",
                  path, name);
    json_t *jdtype = json_object_get(desc, "dtype");
    json_t *jshape = json_object_get(desc, "shape");
    json_t *joffsets = json_object_get(desc, "data_offsets");
    EPMOE_REQUIRE(json_is_string(jdtype), EPMOE_ERR_FORMAT,
                  "%s: %s: missing or non-string \"dtype\"", path, name);
    EPMOE_REQUIRE(json_is_array(jshape), EPMOE_ERR_FORMAT,
                  "%s: %s: missing or non-array \"shape\"", path, name);
    EPMOE_REQUIRE(json_is_array(joffsets) && json_array_size(joffsets) == 2, EPMOE_ERR_FORMAT,
                  "%s: %s: \"data_offsets\" is not an array [begin, end]", path, name);

    /* A dtype this build does not compute with (F8_E5M2, F4, ...) is kept by name: a model
     * directory's shards hold tensors the loader never touches, and only a required tensor of
     * such a dtype is an error (naming it). */
    const char *dtype_text = json_string_value(jdtype);
    snprintf(out->t.dtype_text, sizeof out->t.dtype_text, "%s", dtype_text);
    out->t.dtype = EPMOE_DTYPE_COUNT;
    for (int t = 0; t < EPMOE_DTYPE_COUNT; t++)
        if (strcmp(epmoe_dtype_name((epmoe_dtype)t), dtype_text) == 0) out->t.dtype = (epmoe_dtype)t;
    unsigned bits = out->t.dtype < EPMOE_DTYPE_COUNT ? 8 * (unsigned)epmoe_dtype_size(out->t.dtype)
                                                     : foreign_dtype_bits(dtype_text);

    size_t ndim = json_array_size(jshape);
    EPMOE_REQUIRE(ndim <= EPMOE_MAX_DIMS, EPMOE_ERR_FORMAT, "%s: %s: %zu dimensions (at most %d)",
                  path, name, ndim, EPMOE_MAX_DIMS);
    out->t.ndim = (int)ndim;
    /* Elements counted in uint64 with an explicit overflow check: a hostile shape must not
     * wrap around to a small byte count. */
    uint64_t numel = 1;
    for (size_t d = 0; d < ndim; d++) {
        json_t *jd = json_array_get(jshape, d);
        EPMOE_REQUIRE(json_is_integer(jd) && json_integer_value(jd) >= 0, EPMOE_ERR_FORMAT,
                      "%s: %s: shape dimension %zu is not a non-negative integer", path, name, d);
        uint64_t dim = (uint64_t)json_integer_value(jd);
        out->t.shape[d] = (int64_t)dim;
        EPMOE_REQUIRE(dim == 0 || numel <= UINT64_MAX / 16 / dim, EPMOE_ERR_FORMAT,
                      "%s: %s: shape overflows", path, name);
        numel *= dim;
    }
    json_t *jb = json_array_get(joffsets, 0), *je = json_array_get(joffsets, 1);
    EPMOE_REQUIRE(json_is_integer(jb) && json_is_integer(je) && json_integer_value(jb) >= 0 &&
                      json_integer_value(je) >= json_integer_value(jb),
                  EPMOE_ERR_FORMAT, "%s: %s: data_offsets are not integers 0 <= begin <= end",
                  path, name);
    out->begin = (uint64_t)json_integer_value(jb);
    out->end = (uint64_t)json_integer_value(je);
    /* bits 0: an unknown dtype, whose size cannot be checked (its range still is) */
    uint64_t nbytes = bits ? (numel * bits + 7) / 8 : out->end - out->begin;
    if (out->end - out->begin != nbytes) {
        char shape[160];
        format_shape(shape, sizeof shape, out->t.ndim, out->t.shape);
        EPMOE_FAIL(EPMOE_ERR_FORMAT,
                   "%s: %s: %s %s needs %llu bytes but data_offsets [%llu, %llu) hold %llu", path,
                   name, out->t.dtype_text, shape, (unsigned long long)nbytes,
                   (unsigned long long)out->begin, (unsigned long long)out->end,
                   (unsigned long long)(out->end - out->begin));
    }
    EPMOE_REQUIRE(out->end <= f->data_size, EPMOE_ERR_FORMAT,
                  "%s: %s: data_offsets [%llu, %llu) outside the data section (%zu bytes)", path,
                  name, (unsigned long long)out->begin, (unsigned long long)out->end,
                  f->data_size);
    out->t.nbytes = (size_t)nbytes;
    out->t.data = f->data + out->begin;
    return EPMOE_OK;
}

static epmoe_status parse_header(epmoe_st_file *f, json_t *root) {
    EPMOE_REQUIRE(json_is_object(root), EPMOE_ERR_FORMAT, "%s: header is not a JSON object",
                  f->path);
    size_t n_entries = json_object_size(root);
    parsed_tensor *parsed = calloc(n_entries ? n_entries : 1, sizeof *parsed);
    EPMOE_REQUIRE(parsed != NULL, EPMOE_ERR_OOM, "%s: %zu header entries", f->path, n_entries);

    epmoe_status st = EPMOE_OK;
    int n = 0;
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value) {
        if (strcmp(key, ST_METADATA_KEY) == 0) {
            EPMOE_TRY_GOTO(st, parse_metadata(f, value), done);
            continue;
        }
        EPMOE_TRY_GOTO(st, parse_tensor(f, key, value, &parsed[n]), done);
        parsed[n].t.name = key; /* borrowed from the JSON until copied below */
        n++;
    }

    /* Non-empty ranges must not overlap (empty tensors own no bytes and may sit anywhere). */
    qsort(parsed, (size_t)n, sizeof *parsed, cmp_parsed_offset);
    const parsed_tensor *prev = NULL;
    for (int i = 0; i < n; i++) {
        if (parsed[i].begin == parsed[i].end) continue;
        if (prev && parsed[i].begin < prev->end) {
            st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                                 "%s: %s: data_offsets [%llu, %llu) overlap those of %s "
                                 "[%llu, %llu)",
                                 f->path, parsed[i].t.name, (unsigned long long)parsed[i].begin,
                                 (unsigned long long)parsed[i].end, prev->t.name,
                                 (unsigned long long)prev->begin, (unsigned long long)prev->end);
            goto done;
        }
        prev = &parsed[i];
    }

    f->tensors = calloc(n ? (size_t)n : 1, sizeof *f->tensors);
    f->by_name = calloc(n ? (size_t)n : 1, sizeof *f->by_name);
    if (!f->tensors || !f->by_name) {
        st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "%s: %d tensors", f->path, n);
        goto done;
    }
    for (int i = 0; i < n; i++) {
        f->tensors[i] = parsed[i].t;
        f->tensors[i].name = strdup(parsed[i].t.name);
        f->n_tensors = i + 1;
        if (!f->tensors[i].name) {
            st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "%s: tensor names", f->path);
            goto done;
        }
        f->by_name[i] = &f->tensors[i];
    }
    qsort(f->by_name, (size_t)n, sizeof *f->by_name, cmp_tensor_name);
    /* jansson already rejects duplicate keys; this guards the lookup invariant. */
    for (int i = 1; i < n; i++) {
        if (strcmp(f->by_name[i - 1]->name, f->by_name[i]->name) == 0) {
            st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                                 "%s: %s: duplicate tensor name", f->path, f->by_name[i]->name);
            goto done;
        }
    }
done:
    free(parsed);
    return st;
}

static epmoe_status map_file(epmoe_st_file *f) {
    int fd = open(f->path, O_RDONLY | O_CLOEXEC);
    EPMOE_REQUIRE(fd >= 0, EPMOE_ERR_IO, "%s: cannot open: %s", f->path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int err = errno;
        close(fd);
        EPMOE_FAIL(EPMOE_ERR_IO, "%s: cannot stat: %s", f->path, strerror(err));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        EPMOE_FAIL(EPMOE_ERR_IO, "%s: not a regular file", f->path);
    }
    size_t size = (size_t)sb.st_size;
    if (size < 8) {
        close(fd);
        EPMOE_FAIL(EPMOE_ERR_FORMAT, "%s: file is %zu bytes, shorter than the 8-byte header length",
                   f->path, size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    close(fd); /* the mapping keeps the file alive */
    EPMOE_REQUIRE(map != MAP_FAILED, EPMOE_ERR_IO, "%s: cannot mmap %zu bytes: %s", f->path, size,
                  strerror(err));
    f->map = map;
    f->map_size = size;
    return EPMOE_OK;
}

epmoe_status epmoe_st_open(const char *path, epmoe_st_file **out) {
    *out = NULL;
    EPMOE_REQUIRE(path != NULL, EPMOE_ERR_INVALID_ARG, "safetensors path is NULL");
    epmoe_st_file *f = calloc(1, sizeof *f);
    EPMOE_REQUIRE(f != NULL, EPMOE_ERR_OOM, "%s: file handle", path);
    f->path = strdup(path);
    epmoe_status st = EPMOE_OK;
    if (!f->path) {
        st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "%s: path", path);
        goto fail;
    }
    EPMOE_TRY_GOTO(st, map_file(f), fail);

    const uint8_t *bytes = f->map;
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--) header_len = (header_len << 8) | bytes[i]; /* little-endian */
    if (header_len > f->map_size - 8) {
        st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                             "%s: header length %llu exceeds the %zu bytes after the length "
                             "field (truncated or not a safetensors file)",
                             path, (unsigned long long)header_len, f->map_size - 8);
        goto fail;
    }
    f->data = bytes + 8 + header_len;
    f->data_size = f->map_size - 8 - (size_t)header_len;

    json_error_t jerr;
    json_t *root = json_loadb((const char *)bytes + 8, (size_t)header_len, JSON_REJECT_DUPLICATES,
                              &jerr);
    if (!root) {
        st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                             "%s: header is not valid JSON: %s (at byte %d)", path, jerr.text,
                             jerr.position);
        goto fail;
    }
    st = parse_header(f, root);
    json_decref(root);
    if (st != EPMOE_OK) goto fail;
    *out = f;
    return EPMOE_OK;
fail:
    file_free(f);
    return st;
}

const char *epmoe_st_path(const epmoe_st_file *f) { return f->path; }
int epmoe_st_count(const epmoe_st_file *f) { return f->n_tensors; }

const epmoe_st_tensor *epmoe_st_at(const epmoe_st_file *f, int i) {
    return (i >= 0 && i < f->n_tensors) ? &f->tensors[i] : NULL;
}

const epmoe_st_tensor *epmoe_st_find(const epmoe_st_file *f, const char *name) {
    epmoe_st_tensor key = {.name = name};
    const epmoe_st_tensor *pkey = &key;
    const epmoe_st_tensor **hit =
        bsearch(&pkey, f->by_name, (size_t)f->n_tensors, sizeof *f->by_name, cmp_tensor_name);
    return hit ? *hit : NULL;
}

const char *epmoe_st_metadata(const epmoe_st_file *f, const char *key) {
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_keys[i], key) == 0) return f->meta_values[i];
    return NULL;
}

/* ========================================================================= file sets ===== */

/* One tensor name of the set and the file that holds it. */
typedef struct {
    const char *name; /* owned by the file (listed sets) or by the set (indexed sets) */
    int file;
} set_entry;

struct epmoe_st_set {
    char *path;
    char *dir;           /* the directory, or NULL for a one-file set */
    char *index_path;    /* the index file of an indexed set, else NULL */
    int n_files;
    char **file_paths;   /* [n_files] */
    epmoe_st_file **files; /* [n_files]; an indexed set opens a file on its first lookup */
    size_t n_entries;
    set_entry *by_name;  /* sorted by name */
    char **owned_names;  /* indexed sets: the names of the weight map */
    pthread_mutex_t lock; /* guards files[] of an indexed set */
};

static int cmp_set_entry(const void *a, const void *b) {
    return strcmp(((const set_entry *)a)->name, ((const set_entry *)b)->name);
}

static int cmp_cstr(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

void epmoe_st_set_close(epmoe_st_set *s) {
    if (!s) return;
    for (int i = 0; i < s->n_files; i++) {
        if (s->files) file_free(s->files[i]);
        if (s->file_paths) free(s->file_paths[i]);
    }
    free(s->files);
    free(s->file_paths);
    if (s->owned_names)
        for (size_t i = 0; i < s->n_entries; i++) free(s->owned_names[i]);
    free(s->owned_names);
    free(s->by_name);
    free(s->index_path);
    free(s->dir);
    free(s->path);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

static int has_suffix(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static char *join_path(const char *dir, const char *name) {
    size_t len = strlen(dir) + 1 + strlen(name) + 1;
    char *p = malloc(len);
    if (p) snprintf(p, len, "%s/%s", dir, name);
    return p;
}

/* Sorted full paths of every *.safetensors file in dir. */
static epmoe_status list_safetensors(const char *dir, char ***paths_out, int *n_out) {
    DIR *d = opendir(dir);
    EPMOE_REQUIRE(d != NULL, EPMOE_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    char **paths = NULL;
    int n = 0, cap = 0;
    epmoe_status st = EPMOE_OK;
    struct dirent *ent;
    while ((ent = readdir(d)) != NULL) {
        if (ent->d_name[0] == '.' || !has_suffix(ent->d_name, ".safetensors")) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            char **grown = realloc(paths, (size_t)cap * sizeof *paths);
            if (!grown) {
                st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "%s: listing", dir);
                break;
            }
            paths = grown;
        }
        paths[n] = join_path(dir, ent->d_name);
        if (!paths[n]) {
            st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "%s: listing", dir);
            break;
        }
        n++;
    }
    closedir(d);
    if (st == EPMOE_OK && n == 0)
        st = epmoe_set_error(EPMOE_ERR_NOT_FOUND, __FILE__, __LINE__,
                             "%s: directory holds no *.safetensors files", dir);
    if (st != EPMOE_OK) {
        for (int i = 0; i < n; i++) free(paths[i]);
        free(paths);
        return st;
    }
    qsort(paths, (size_t)n, sizeof *paths, cmp_cstr);
    *paths_out = paths;
    *n_out = n;
    return EPMOE_OK;
}

static epmoe_status check_unique_names(const epmoe_st_set *s) {
    for (size_t i = 1; i < s->n_entries; i++) {
        const set_entry *a = &s->by_name[i - 1], *b = &s->by_name[i];
        if (strcmp(a->name, b->name) != 0) continue;
        if (s->index_path)
            EPMOE_FAIL(EPMOE_ERR_FORMAT, "%s: tensor %s is listed twice", s->index_path,
                       b->name);
        EPMOE_FAIL(EPMOE_ERR_FORMAT, "%s: tensor %s is in two files: %s and %s", s->path,
                   b->name, s->file_paths[a->file], s->file_paths[b->file]);
    }
    return EPMOE_OK;
}

/* Every file opened; the index lists every tensor of every file. */
static epmoe_status open_listed(epmoe_st_set *s) {
    size_t total = 0;
    for (int i = 0; i < s->n_files; i++) {
        EPMOE_TRY(epmoe_st_open(s->file_paths[i], &s->files[i]));
        total += (size_t)s->files[i]->n_tensors;
    }
    s->by_name = calloc(total ? total : 1, sizeof *s->by_name);
    EPMOE_REQUIRE(s->by_name != NULL, EPMOE_ERR_OOM, "%s: index of %zu tensors", s->path, total);
    size_t k = 0;
    for (int i = 0; i < s->n_files; i++)
        for (int j = 0; j < s->files[i]->n_tensors; j++)
            s->by_name[k++] = (set_entry){s->files[i]->tensors[j].name, i};
    s->n_entries = total;
    qsort(s->by_name, total, sizeof *s->by_name, cmp_set_entry);
    return check_unique_names(s);
}

/* A shard name from an index must be a plain file name in the directory. */
static int plain_file_name(const char *name) {
    return name[0] != '\0' && name[0] != '.' && strchr(name, '/') == NULL;
}

/* model.safetensors.index.json: {"metadata": {...}, "weight_map": {tensor: shard file}}. Only
 * the index is read here; shards open when a tensor of theirs is first looked up. */
static epmoe_status open_indexed(epmoe_st_set *s) {
    json_error_t jerr;
    json_t *root = json_load_file(s->index_path, JSON_REJECT_DUPLICATES, &jerr);
    EPMOE_REQUIRE(root != NULL, EPMOE_ERR_FORMAT, "%s: not valid JSON: %s (line %d)",
                  s->index_path, jerr.text, jerr.line);
    epmoe_status st = EPMOE_OK;
    json_t *map = json_object_get(root, "weight_map");
    if (!json_is_object(map)) {
        st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                             "%s: no \"weight_map\" object (tensor name -> shard file)",
                             s->index_path);
        goto done;
    }
    size_t n = json_object_size(map);
    s->by_name = calloc(n ? n : 1, sizeof *s->by_name);
    s->owned_names = calloc(n ? n : 1, sizeof *s->owned_names);
    s->file_paths = calloc(n ? n : 1, sizeof *s->file_paths); /* at most one shard per name */
    if (!s->by_name || !s->owned_names || !s->file_paths) {
        st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "%s: %zu tensors",
                             s->index_path, n);
        goto done;
    }
    /* shard names, each once, in the order the map first names them */
    const char *name;
    json_t *value;
    json_object_foreach(map, name, value) {
        if (!json_is_string(value) || !plain_file_name(json_string_value(value))) {
            st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                                 "%s: %s: shard must be a file name in %s, got %s",
                                 s->index_path, name, s->dir,
                                 json_is_string(value) ? json_string_value(value) : "a non-string");
            goto done;
        }
        const char *shard = json_string_value(value);
        int file = -1;
        for (int i = s->n_files - 1; i >= 0 && file < 0; i--) /* shards come in runs */
            if (strcmp(strrchr(s->file_paths[i], '/') + 1, shard) == 0) file = i;
        if (file < 0) {
            s->file_paths[s->n_files] = join_path(s->dir, shard);
            if (!s->file_paths[s->n_files]) {
                st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "%s", s->index_path);
                goto done;
            }
            file = s->n_files++;
        }
        s->owned_names[s->n_entries] = strdup(name);
        if (!s->owned_names[s->n_entries]) {
            st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "%s", s->index_path);
            goto done;
        }
        s->by_name[s->n_entries] = (set_entry){s->owned_names[s->n_entries], file};
        s->n_entries++;
    }
    if (s->n_entries == 0) {
        st = epmoe_set_error(EPMOE_ERR_NOT_FOUND, __FILE__, __LINE__,
                             "%s: the weight map lists no tensors", s->index_path);
        goto done;
    }
    s->files = calloc((size_t)s->n_files, sizeof *s->files);
    if (!s->files) {
        st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "%s", s->index_path);
        goto done;
    }
    qsort(s->by_name, s->n_entries, sizeof *s->by_name, cmp_set_entry);
    st = check_unique_names(s);
done:
    json_decref(root);
    return st;
}

epmoe_status epmoe_st_set_open(const char *path, epmoe_st_set **out) {
    *out = NULL;
    EPMOE_REQUIRE(path != NULL, EPMOE_ERR_INVALID_ARG, "checkpoint path is NULL");
    struct stat sb;
    EPMOE_REQUIRE(stat(path, &sb) == 0, EPMOE_ERR_IO, "%s: %s", path, strerror(errno));

    epmoe_st_set *s = calloc(1, sizeof *s);
    EPMOE_REQUIRE(s != NULL, EPMOE_ERR_OOM, "%s: checkpoint handle", path);
    pthread_mutex_init(&s->lock, NULL);
    epmoe_status st = EPMOE_OK;
    s->path = strdup(path);
    if (!s->path) {
        st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "%s: path", path);
        goto fail;
    }
    if (S_ISDIR(sb.st_mode)) {
        s->dir = strdup(path);
        s->index_path = join_path(path, EPMOE_ST_INDEX_FILE);
        if (!s->dir || !s->index_path) {
            st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "%s: path", path);
            goto fail;
        }
        if (access(s->index_path, F_OK) == 0) {
            EPMOE_TRY_GOTO(st, open_indexed(s), fail);
            *out = s;
            return EPMOE_OK;
        }
        free(s->index_path);
        s->index_path = NULL;
        EPMOE_TRY_GOTO(st, list_safetensors(path, &s->file_paths, &s->n_files), fail);
    } else {
        s->file_paths = malloc(sizeof *s->file_paths);
        if (s->file_paths) s->file_paths[0] = strdup(path);
        if (!s->file_paths || !s->file_paths[0]) {
            st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "%s: path", path);
            goto fail;
        }
        s->n_files = 1;
    }
    s->files = calloc((size_t)s->n_files, sizeof *s->files);
    if (!s->files) {
        st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "%s: %d files", path, s->n_files);
        goto fail;
    }
    EPMOE_TRY_GOTO(st, open_listed(s), fail);
    *out = s;
    return EPMOE_OK;
fail:
    epmoe_st_set_close(s);
    return st;
}

/* The file behind entry e, opened if it was not yet (indexed sets). */
static epmoe_status entry_file(const epmoe_st_set *cs, const set_entry *e,
                               const epmoe_st_file **out) {
    epmoe_st_set *s = (epmoe_st_set *)cs; /* opening a shard is invisible to the caller */
    pthread_mutex_lock(&s->lock);
    epmoe_status st = EPMOE_OK;
    if (!s->files[e->file]) {
        st = epmoe_st_open(s->file_paths[e->file], &s->files[e->file]);
        if (st != EPMOE_OK)
            epmoe_add_context(st, "%s names it as the shard of %s", EPMOE_ST_INDEX_FILE, e->name);
    }
    *out = s->files[e->file];
    pthread_mutex_unlock(&s->lock);
    return st;
}

static const set_entry *find_entry(const epmoe_st_set *s, const char *name) {
    set_entry key = {name, 0};
    return bsearch(&key, s->by_name, s->n_entries, sizeof *s->by_name, cmp_set_entry);
}

int epmoe_st_set_contains(const epmoe_st_set *s, const char *name) {
    return find_entry(s, name) != NULL;
}

epmoe_status epmoe_st_set_lookup(const epmoe_st_set *s, const char *name,
                                 const epmoe_st_tensor **t_out, const epmoe_st_file **file_out) {
    *t_out = NULL;
    if (file_out) *file_out = NULL;
    const set_entry *e = find_entry(s, name);
    if (!e) return EPMOE_OK;
    const epmoe_st_file *file = NULL;
    EPMOE_TRY(entry_file(s, e, &file));
    const epmoe_st_tensor *t = epmoe_st_find(file, name);
    EPMOE_REQUIRE(t != NULL, EPMOE_ERR_FORMAT, "%s: %s names %s as the shard of %s, which it "
                  "does not hold", file->path, s->index_path ? s->index_path : s->path,
                  file->path, name);
    *t_out = t;
    if (file_out) *file_out = file;
    return EPMOE_OK;
}

const epmoe_st_tensor *epmoe_st_set_find(const epmoe_st_set *s, const char *name,
                                         const epmoe_st_file **file_out) {
    const epmoe_st_tensor *t = NULL;
    if (epmoe_st_set_lookup(s, name, &t, file_out) != EPMOE_OK) {
        if (file_out) *file_out = NULL;
        return NULL;
    }
    return t;
}

const char *epmoe_st_set_metadata(const epmoe_st_set *s, const char *key) {
    for (int i = 0; i < s->n_files; i++) {
        const char *v = s->files[i] ? epmoe_st_metadata(s->files[i], key) : NULL;
        if (v) return v;
    }
    return NULL;
}

const char *epmoe_st_set_path(const epmoe_st_set *s) { return s->path; }
const char *epmoe_st_set_dir(const epmoe_st_set *s) { return s->dir; }
const char *epmoe_st_set_index_path(const epmoe_st_set *s) { return s->index_path; }

int epmoe_st_set_file_count(const epmoe_st_set *s) { return s->n_files; }

int epmoe_st_set_files_open(const epmoe_st_set *cs) {
    epmoe_st_set *s = (epmoe_st_set *)cs;
    pthread_mutex_lock(&s->lock);
    int n = 0;
    for (int i = 0; i < s->n_files; i++) n += s->files[i] != NULL;
    pthread_mutex_unlock(&s->lock);
    return n;
}

int epmoe_st_set_file_is_open(const epmoe_st_set *cs, const char *file_name) {
    epmoe_st_set *s = (epmoe_st_set *)cs;
    pthread_mutex_lock(&s->lock);
    int open = 0;
    for (int i = 0; i < s->n_files; i++) {
        const char *base = strrchr(s->file_paths[i], '/');
        base = base ? base + 1 : s->file_paths[i];
        if (strcmp(base, file_name) == 0) open = s->files[i] != NULL;
    }
    pthread_mutex_unlock(&s->lock);
    return open;
}

static void format_dtypes(char *buf, size_t cap, const epmoe_dtype *dtypes, int n) {
    size_t at = 0;
    buf[0] = '\0';
    for (int i = 0; i < n && at < cap; i++)
        at += (size_t)snprintf(buf + at, cap - at, "%s%s", i == 0 ? "" : i + 1 == n ? " or " : ", ",
                               epmoe_dtype_name(dtypes[i]));
}

epmoe_status epmoe_st_set_require_any(const epmoe_st_set *s, const char *name,
                                      const epmoe_dtype *dtypes, int n_dtypes, int ndim,
                                      const int64_t *shape, const epmoe_st_tensor **out) {
    const epmoe_st_file *file = NULL;
    const epmoe_st_tensor *t = NULL;
    EPMOE_TRY(epmoe_st_set_lookup(s, name, &t, &file));
    EPMOE_REQUIRE(t != NULL, EPMOE_ERR_NOT_FOUND, "%s: tensor %s not found",
                  s->index_path ? s->index_path : s->path, name);
    int dtype_ok = 0;
    for (int i = 0; i < n_dtypes; i++) dtype_ok |= t->dtype == dtypes[i];
    if (!dtype_ok) {
        char want[96];
        format_dtypes(want, sizeof want, dtypes, n_dtypes);
        EPMOE_FAIL(EPMOE_ERR_FORMAT, "%s: %s: dtype %s, expected %s", file->path, name,
                   t->dtype_text, want);
    }
    if (shape) {
        int same = t->ndim == ndim;
        for (int d = 0; same && d < ndim; d++) same = t->shape[d] == shape[d];
        if (!same) {
            char got[160], want[160];
            format_shape(got, sizeof got, t->ndim, t->shape);
            format_shape(want, sizeof want, ndim, shape);
            EPMOE_FAIL(EPMOE_ERR_FORMAT, "%s: %s: shape %s, expected %s", file->path, name, got,
                       want);
        }
    }
    if (out) *out = t;
    return EPMOE_OK;
}

epmoe_status epmoe_st_set_require(const epmoe_st_set *s, const char *name, epmoe_dtype dtype,
                                  int ndim, const int64_t *shape, const epmoe_st_tensor **out) {
    return epmoe_st_set_require_any(s, name, &dtype, 1, ndim, shape, out);
}

/* ============================================================================ writer ===== */

typedef struct {
    char *name;
    epmoe_dtype dtype;
    int ndim;
    int64_t shape[EPMOE_MAX_DIMS];
    size_t nbytes;
    size_t begin;          /* offset in the data section */
    const void *data;      /* or, deferred: */
    epmoe_st_fill_fn fill;
    void *fill_ctx;
    int reserved;          /* the caller writes the bytes (epmoe_st_writer_layout) */
} writer_entry;

struct epmoe_st_writer {
    writer_entry *entries;
    int n, cap;
    size_t data_size;
    json_t *names;    /* set of names, for the duplicate check */
    json_t *metadata; /* string -> string */
};

epmoe_status epmoe_st_writer_create(epmoe_st_writer **out) {
    epmoe_st_writer *w = calloc(1, sizeof *w);
    EPMOE_REQUIRE(w != NULL, EPMOE_ERR_OOM, "safetensors writer");
    w->names = json_object();
    w->metadata = json_object();
    if (!w->names || !w->metadata) {
        epmoe_st_writer_free(w);
        EPMOE_FAIL(EPMOE_ERR_OOM, "safetensors writer");
    }
    *out = w;
    return EPMOE_OK;
}

void epmoe_st_writer_free(epmoe_st_writer *w) {
    if (!w) return;
    for (int i = 0; i < w->n; i++) free(w->entries[i].name);
    free(w->entries);
    json_decref(w->names);
    json_decref(w->metadata);
    free(w);
}

static epmoe_status writer_add(epmoe_st_writer *w, const char *name, epmoe_dtype dtype, int ndim,
                               const int64_t *shape, const void *data, epmoe_st_fill_fn fill,
                               void *ctx, int reserved) {
    EPMOE_REQUIRE(name && name[0], EPMOE_ERR_INVALID_ARG, "tensor name is empty");
    EPMOE_REQUIRE(strcmp(name, ST_METADATA_KEY) != 0, EPMOE_ERR_INVALID_ARG,
                  "%s is reserved, not a tensor name", ST_METADATA_KEY);
    EPMOE_REQUIRE(json_object_get(w->names, name) == NULL, EPMOE_ERR_INVALID_ARG,
                  "%s: tensor added twice", name);
    EPMOE_REQUIRE((int)dtype >= 0 && dtype < EPMOE_DTYPE_COUNT, EPMOE_ERR_INVALID_ARG,
                  "%s: invalid dtype %d", name, (int)dtype);
    EPMOE_REQUIRE(ndim >= 0 && ndim <= EPMOE_MAX_DIMS, EPMOE_ERR_INVALID_ARG,
                  "%s: %d dimensions (0..%d)", name, ndim, EPMOE_MAX_DIMS);
    size_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        EPMOE_REQUIRE(shape[d] >= 0, EPMOE_ERR_INVALID_ARG, "%s: negative dimension %lld", name,
                      (long long)shape[d]);
        numel *= (size_t)shape[d];
    }
    size_t nbytes = numel * epmoe_dtype_size(dtype);
    EPMOE_REQUIRE(nbytes == 0 || data || fill || reserved, EPMOE_ERR_INVALID_ARG,
                  "%s: data is NULL", name);
    if (w->n == w->cap) {
        int cap = w->cap ? 2 * w->cap : 64;
        writer_entry *grown = realloc(w->entries, (size_t)cap * sizeof *grown);
        EPMOE_REQUIRE(grown != NULL, EPMOE_ERR_OOM, "%s: writer entries", name);
        w->entries = grown;
        w->cap = cap;
    }
    writer_entry *e = &w->entries[w->n];
    memset(e, 0, sizeof *e);
    e->name = strdup(name);
    EPMOE_REQUIRE(e->name != NULL, EPMOE_ERR_OOM, "%s: name", name);
    EPMOE_REQUIRE(json_object_set_new(w->names, name, json_true()) == 0, EPMOE_ERR_OOM,
                  "%s: name set", name);
    e->dtype = dtype;
    e->ndim = ndim;
    for (int d = 0; d < ndim; d++) e->shape[d] = shape[d];
    e->nbytes = nbytes;
    e->begin = w->data_size;
    e->data = data;
    e->fill = fill;
    e->fill_ctx = ctx;
    e->reserved = reserved;
    w->data_size += nbytes;
    w->n++;
    return EPMOE_OK;
}

epmoe_status epmoe_st_writer_add(epmoe_st_writer *w, const char *name, epmoe_dtype dtype,
                                 int ndim, const int64_t *shape, const void *data) {
    return writer_add(w, name, dtype, ndim, shape, data, NULL, NULL, 0);
}

epmoe_status epmoe_st_writer_add_reserved(epmoe_st_writer *w, const char *name,
                                          epmoe_dtype dtype, int ndim, const int64_t *shape) {
    return writer_add(w, name, dtype, ndim, shape, NULL, NULL, NULL, 1);
}

epmoe_status epmoe_st_writer_add_deferred(epmoe_st_writer *w, const char *name,
                                          epmoe_dtype dtype, int ndim, const int64_t *shape,
                                          epmoe_st_fill_fn fill, void *ctx) {
    EPMOE_REQUIRE(fill != NULL, EPMOE_ERR_INVALID_ARG, "%s: fill function is NULL", name);
    return writer_add(w, name, dtype, ndim, shape, NULL, fill, ctx, 0);
}

epmoe_status epmoe_st_writer_metadata(epmoe_st_writer *w, const char *key, const char *value) {
    EPMOE_REQUIRE(key && value, EPMOE_ERR_INVALID_ARG, "metadata key or value is NULL");
    json_t *v = json_string(value);
    EPMOE_REQUIRE(v != NULL, EPMOE_ERR_INVALID_ARG, "metadata %s: value is not valid UTF-8", key);
    EPMOE_REQUIRE(json_object_set_new(w->metadata, key, v) == 0, EPMOE_ERR_OOM, "metadata %s",
                  key);
    return EPMOE_OK;
}

/* The JSON header text, padded with spaces to a multiple of 8 bytes. */
static epmoe_status writer_header(const epmoe_st_writer *w, char **text_out, size_t *len_out) {
    json_t *root = json_object();
    EPMOE_REQUIRE(root != NULL, EPMOE_ERR_OOM, "safetensors header");
    int bad = 0;
    if (json_object_size(w->metadata) > 0)
        bad |= json_object_set(root, ST_METADATA_KEY, w->metadata);
    for (int i = 0; i < w->n && !bad; i++) {
        const writer_entry *e = &w->entries[i];
        json_t *shape = json_array();
        for (int d = 0; shape && d < e->ndim; d++)
            bad |= json_array_append_new(shape, json_integer(e->shape[d]));
        json_t *desc = json_pack("{s:s, s:o, s:[I, I]}", "dtype", epmoe_dtype_name(e->dtype),
                                 "shape", shape, "data_offsets", (json_int_t)e->begin,
                                 (json_int_t)(e->begin + e->nbytes));
        bad |= !desc || json_object_set_new(root, e->name, desc);
    }
    char *text = bad ? NULL : json_dumps(root, JSON_COMPACT);
    json_decref(root);
    EPMOE_REQUIRE(text != NULL, EPMOE_ERR_OOM, "safetensors header of %d tensors", w->n);
    size_t len = strlen(text), padded = (len + 7) / 8 * 8;
    char *out = realloc(text, padded + 1);
    if (!out) {
        free(text);
        EPMOE_FAIL(EPMOE_ERR_OOM, "safetensors header");
    }
    memset(out + len, ' ', padded - len);
    out[padded] = '\0';
    *text_out = out;
    *len_out = padded;
    return EPMOE_OK;
}

epmoe_status epmoe_st_writer_layout(const epmoe_st_writer *w, char **head_out,
                                    size_t *head_bytes, uint64_t *data_bytes) {
    char *header = NULL;
    size_t header_len = 0;
    EPMOE_TRY(writer_header(w, &header, &header_len));
    char *head = malloc(8 + header_len);
    if (!head) {
        free(header);
        EPMOE_FAIL(EPMOE_ERR_OOM, "safetensors header of %d tensors", w->n);
    }
    for (int i = 0; i < 8; i++) head[i] = (char)(uint8_t)((uint64_t)header_len >> (8 * i));
    memcpy(head + 8, header, header_len);
    free(header);
    *head_out = head;
    *head_bytes = 8 + header_len;
    *data_bytes = w->data_size;
    return EPMOE_OK;
}

int epmoe_st_writer_count(const epmoe_st_writer *w) { return w->n; }

uint64_t epmoe_st_writer_data_offset(const epmoe_st_writer *w, int i) {
    return i >= 0 && i < w->n ? w->entries[i].begin : 0;
}

static epmoe_status write_all(FILE *fp, const void *data, size_t n, const char *path) {
    EPMOE_REQUIRE(n == 0 || fwrite(data, 1, n, fp) == n, EPMOE_ERR_IO, "%s: write failed: %s",
                  path, strerror(errno));
    return EPMOE_OK;
}

static epmoe_status writer_body(const epmoe_st_writer *w, FILE *fp, const char *tmp) {
    char *header = NULL;
    size_t header_len = 0;
    EPMOE_TRY(writer_header(w, &header, &header_len));
    uint8_t len_bytes[8];
    for (int i = 0; i < 8; i++) len_bytes[i] = (uint8_t)((uint64_t)header_len >> (8 * i));
    epmoe_status st = write_all(fp, len_bytes, 8, tmp);
    if (st == EPMOE_OK) st = write_all(fp, header, header_len, tmp);
    free(header);
    EPMOE_TRY(st);

    size_t scratch_size = 0;
    for (int i = 0; i < w->n; i++)
        if (w->entries[i].fill && w->entries[i].nbytes > scratch_size)
            scratch_size = w->entries[i].nbytes;
    void *scratch = NULL;
    if (scratch_size) {
        scratch = malloc(scratch_size);
        EPMOE_REQUIRE(scratch != NULL, EPMOE_ERR_OOM, "%s: %zu-byte scratch buffer", tmp,
                      scratch_size);
    }
    for (int i = 0; i < w->n && st == EPMOE_OK; i++) {
        const writer_entry *e = &w->entries[i];
        if (e->nbytes == 0) continue;
        if (e->fill) {
            st = e->fill(e->fill_ctx, e->name, scratch, e->nbytes);
            if (st != EPMOE_OK) {
                st = epmoe_add_context(st, "%s: producing %s", tmp, e->name);
                break;
            }
            st = write_all(fp, scratch, e->nbytes, tmp);
        } else {
            st = write_all(fp, e->data, e->nbytes, tmp);
        }
    }
    free(scratch);
    return st;
}

epmoe_status epmoe_st_writer_finish(epmoe_st_writer *w, const char *path) {
    EPMOE_REQUIRE(path != NULL, EPMOE_ERR_INVALID_ARG, "output path is NULL");
    for (int i = 0; i < w->n; i++)
        EPMOE_REQUIRE(!w->entries[i].reserved || w->entries[i].nbytes == 0, EPMOE_ERR_INVALID_ARG,
                      "%s: %s is reserved: its bytes are the caller's to write "
                      "(epmoe_st_writer_layout)",
                      path, w->entries[i].name);
    size_t tmp_len = strlen(path) + 5;
    char *tmp = malloc(tmp_len);
    EPMOE_REQUIRE(tmp != NULL, EPMOE_ERR_OOM, "%s: path", path);
    snprintf(tmp, tmp_len, "%s.tmp", path);
    FILE *fp = NULL; /* never through a symlink or into a device planted at the temp name */
    epmoe_status open_st = epmoe_open_regular_for_write(tmp, &fp);
    if (open_st != EPMOE_OK) {
        free(tmp);
        return open_st;
    }
    epmoe_status st = writer_body(w, fp, tmp);
    if (fclose(fp) != 0 && st == EPMOE_OK)
        st = epmoe_set_error(EPMOE_ERR_IO, __FILE__, __LINE__, "%s: close failed: %s", tmp,
                             strerror(errno));
    if (st == EPMOE_OK && rename(tmp, path) != 0)
        st = epmoe_set_error(EPMOE_ERR_IO, __FILE__, __LINE__, "cannot rename %s to %s: %s", tmp,
                             path, strerror(errno));
    if (st != EPMOE_OK) unlink(tmp);
    free(tmp);
    return st;
}
