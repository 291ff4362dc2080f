/* safetensors reader/writer and tensor dtypes: round trips of every dtype, and malformed files
 * that must each give an error naming the file (and tensor), never a crash. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/formats.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "common/tensor.h"
#include "tests/support/test_support.h"

/* ---- helpers ---- */

static char *data_path(const char *name) {
    char *p = strdup(epmoe_test_data_path(name));
    ck_assert_ptr_nonnull(p);
    return p;
}

static void write_bytes(const char *path, const void *bytes, size_t n) {
    FILE *fp = fopen(path, "wb");
    ck_assert_msg(fp != NULL, "cannot create %s", path);
    ck_assert_uint_eq(fwrite(bytes, 1, n, fp), n);
    ck_assert_int_eq(fclose(fp), 0);
}

/* A file with the given JSON header (unpadded) and `data_len` data bytes (0x5a each). */
static void write_raw(const char *path, const char *header, size_t data_len) {
    size_t hlen = strlen(header);
    size_t n = 8 + hlen + data_len;
    unsigned char *buf = malloc(n);
    ck_assert_ptr_nonnull(buf);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    memcpy(buf + 8, header, hlen);
    memset(buf + 8 + hlen, 0x5a, data_len);
    write_bytes(path, buf, n);
    free(buf);
}

static unsigned char *read_file(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    ck_assert_msg(fp != NULL, "cannot open %s", path);
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)size + 1);
    ck_assert_ptr_nonnull(buf);
    ck_assert_uint_eq(fread(buf, 1, (size_t)size, fp), (size_t)size);
    fclose(fp);
    *n = (size_t)size;
    return buf;
}

/* Opening must fail with `code`, and the message must name every string in `needles`. */
static void expect_open_error(const char *path, epmoe_status code, const char *needle1,
                              const char *needle2) {
    epmoe_st_file *f = (epmoe_st_file *)0x1;
    epmoe_clear_error();
    epmoe_status st = epmoe_st_open(path, &f);
    const char *msg = epmoe_last_error();
    ck_assert_msg(st == code, "%s: expected %s, got %s (%s)", path, epmoe_status_name(code),
                  epmoe_status_name(st), msg);
    ck_assert_ptr_null(f);
    ck_assert_msg(strstr(msg, path) != NULL, "message does not name the file: %s", msg);
    if (needle1) ck_assert_msg(strstr(msg, needle1) != NULL, "no '%s' in: %s", needle1, msg);
    if (needle2) ck_assert_msg(strstr(msg, needle2) != NULL, "no '%s' in: %s", needle2, msg);
}

static void fill_random_bytes(epmoe_rng *r, unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(1 + epmoe_rng_below(r, 255)); /* != 0 */
}

/* ---- dtypes and conversions ---- */

START_TEST(test_dtype_names_and_sizes) {
    const char *names[EPMOE_DTYPE_COUNT] = {"F32", "F64",  "BF16", "F16",     "U8",
                                            "I8",  "I32",  "I64",  "F8_E4M3", "F8_E8M0"};
    const size_t sizes[EPMOE_DTYPE_COUNT] = {4, 8, 2, 2, 1, 1, 4, 8, 1, 1};
    for (int t = 0; t < EPMOE_DTYPE_COUNT; t++) {
        ck_assert_str_eq(epmoe_dtype_name((epmoe_dtype)t), names[t]);
        ck_assert_uint_eq(epmoe_dtype_size((epmoe_dtype)t), sizes[t]);
        epmoe_dtype back = EPMOE_DTYPE_COUNT;
        ck_assert_int_eq(epmoe_dtype_from_name(names[t], &back), EPMOE_OK);
        ck_assert_int_eq(back, t);
    }
    epmoe_dtype d;
    ck_assert_int_eq(epmoe_dtype_from_name("f32", &d), EPMOE_ERR_FORMAT); /* case matters */
    ck_assert_int_eq(epmoe_dtype_from_name("F8_E5M2", &d), EPMOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "F8_E5M2"));
    epmoe_tensor t = {EPMOE_DTYPE_BF16, 3, {2, 3, 5}, NULL};
    ck_assert_int_eq(epmoe_tensor_numel(&t), 30);
    ck_assert_uint_eq(epmoe_tensor_nbytes(&t), 60);
    epmoe_tensor s = {EPMOE_DTYPE_F64, 0, {0}, NULL};
    ck_assert_int_eq(epmoe_tensor_numel(&s), 1);
}
END_TEST

START_TEST(test_conversions) {
    /* Values exactly representable in bf16 and fp16 survive both ways; others round (RNE). */
    const float exact[] = {1.0f, -2.5f, 0.15625f, 1024.0f, -0.0f, 3.0f};
    const size_t n = sizeof exact / sizeof exact[0];
    float back[8];
    uint16_t half[8];
    double wide[8];
    for (int which = 0; which < 2; which++) {
        epmoe_dtype dt = which ? EPMOE_DTYPE_F16 : EPMOE_DTYPE_BF16;
        epmoe_poison_f32(back, n);
        ck_assert_int_eq(epmoe_convert_from_f32(exact, n, dt, half), EPMOE_OK);
        ck_assert_int_eq(epmoe_convert_to_f32(dt, half, n, back), EPMOE_OK);
        for (size_t i = 0; i < n; i++) ck_assert(back[i] == exact[i]);
        ck_assert_int_eq(signbit(back[4]) != 0, 1);
    }
    /* bf16 keeps 8 significant bits: 1 + 2^-9 rounds to 1 (tie-free), 1 + 3*2^-9 to 1+2^-7. */
    const float rounding[2] = {1.0f + 0x1p-9f, 1.0f + 3 * 0x1p-9f};
    ck_assert_int_eq(epmoe_convert_from_f32(rounding, 2, EPMOE_DTYPE_BF16, half), EPMOE_OK);
    ck_assert_int_eq(epmoe_convert_to_f32(EPMOE_DTYPE_BF16, half, 2, back), EPMOE_OK);
    ck_assert(back[0] == 1.0f);
    ck_assert(back[1] == 1.0f + 0x1p-7f);
    for (size_t i = 0; i < n; i++) wide[i] = (double)exact[i] * 3.0;
    epmoe_poison_f32(back, n);
    ck_assert_int_eq(epmoe_convert_to_f32(EPMOE_DTYPE_F64, wide, n, back), EPMOE_OK);
    for (size_t i = 0; i < n; i++) ck_assert(back[i] == (float)wide[i]);
    /* Unaligned source (as in a file mapping) is fine. */
    unsigned char raw[1 + 4 * 3];
    const float three[3] = {1.5f, -7.0f, 0.25f};
    memcpy(raw + 1, three, sizeof three);
    ck_assert_int_eq(epmoe_convert_to_f32(EPMOE_DTYPE_F32, raw + 1, 3, back), EPMOE_OK);
    ck_assert(back[0] == 1.5f && back[1] == -7.0f && back[2] == 0.25f);
    ck_assert_int_eq(epmoe_convert_to_f32(EPMOE_DTYPE_U8, raw, 1, back), EPMOE_ERR_UNSUPPORTED);
    ck_assert_int_eq(epmoe_convert_from_f32(back, 1, EPMOE_DTYPE_I32, raw),
                     EPMOE_ERR_UNSUPPORTED);
}
END_TEST

/* ---- round trip ---- */

typedef struct {
    char name[48];
    epmoe_dtype dtype;
    int ndim;
    int64_t shape[4];
    unsigned char *bytes;
    size_t nbytes;
} case_tensor;

START_TEST(test_round_trip_every_dtype) {
    char *path = data_path("st_roundtrip.safetensors");
    epmoe_rng r;
    epmoe_rng_seed(&r, 11);
    case_tensor cases[EPMOE_DTYPE_COUNT + 4];
    int n = 0;
    /* Every dtype, with shapes whose byte sizes break 8-byte alignment along the way. */
    for (int t = 0; t < EPMOE_DTYPE_COUNT; t++) {
        case_tensor *c = &cases[n++];
        snprintf(c->name, sizeof c->name, "t.%s", epmoe_dtype_name((epmoe_dtype)t));
        c->dtype = (epmoe_dtype)t;
        c->ndim = 2;
        c->shape[0] = 3;
        c->shape[1] = 5 + t;
    }
    case_tensor *scalar = &cases[n++];
    *scalar = (case_tensor){"scalar", EPMOE_DTYPE_F32, 0, {0}, NULL, 0};
    case_tensor *empty = &cases[n++];
    *empty = (case_tensor){"empty", EPMOE_DTYPE_BF16, 2, {0, 7}, NULL, 0};
    case_tensor *deep = &cases[n++];
    *deep = (case_tensor){"layers.0.deep", EPMOE_DTYPE_I32, 4, {2, 1, 3, 2}, NULL, 0};
    case_tensor *vec = &cases[n++];
    *vec = (case_tensor){"vector", EPMOE_DTYPE_F8_E4M3, 1, {9}, NULL, 0};

    epmoe_st_writer *w = NULL;
    ck_assert_int_eq(epmoe_st_writer_create(&w), EPMOE_OK);
    for (int i = 0; i < n; i++) {
        case_tensor *c = &cases[i];
        size_t numel = 1;
        for (int d = 0; d < c->ndim; d++) numel *= (size_t)c->shape[d];
        c->nbytes = numel * epmoe_dtype_size(c->dtype);
        c->bytes = malloc(c->nbytes + 1);
        fill_random_bytes(&r, c->bytes, c->nbytes);
        ck_assert_int_eq(epmoe_st_writer_add(w, c->name, c->dtype, c->ndim, c->shape, c->bytes),
                         EPMOE_OK);
    }
    ck_assert_int_eq(epmoe_st_writer_metadata(w, "format", "pt"), EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_metadata(w, "epmoe.note", "a \"quoted\" value"), EPMOE_OK);
    /* A name added twice and the reserved name are refused. */
    ck_assert_int_eq(epmoe_st_writer_add(w, "scalar", EPMOE_DTYPE_F32, 0, NULL, cases[0].bytes),
                     EPMOE_ERR_INVALID_ARG);
    ck_assert_int_eq(epmoe_st_writer_add(w, "__metadata__", EPMOE_DTYPE_F32, 0, NULL,
                                         cases[0].bytes),
                     EPMOE_ERR_INVALID_ARG);
    ck_assert_int_eq(epmoe_st_writer_finish(w, path), EPMOE_OK);
    epmoe_st_writer_free(w);

    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    ck_assert_int_ne(access(tmp, F_OK), 0); /* renamed away */

    /* Header length: a multiple of 8, padded with spaces; data follows back to back. */
    size_t file_size = 0;
    unsigned char *raw = read_file(path, &file_size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | raw[i];
    ck_assert_uint_eq(hlen % 8, 0);
    size_t total = 0;
    for (int i = 0; i < n; i++) total += cases[i].nbytes;
    ck_assert_uint_eq(file_size, 8 + hlen + total);
    ck_assert_int_eq(raw[8], '{');
    free(raw);

    epmoe_st_file *f = NULL;
    ck_assert_msg(epmoe_st_open(path, &f) == EPMOE_OK, "%s", epmoe_last_error());
    ck_assert_str_eq(epmoe_st_path(f), path);
    ck_assert_int_eq(epmoe_st_count(f), n);
    for (int i = 0; i < n; i++) {
        const case_tensor *c = &cases[i];
        const epmoe_st_tensor *t = epmoe_st_find(f, c->name);
        ck_assert_msg(t != NULL, "%s missing", c->name);
        ck_assert_str_eq(t->name, c->name);
        ck_assert_int_eq(t->dtype, c->dtype);
        ck_assert_int_eq(t->ndim, c->ndim);
        for (int d = 0; d < c->ndim; d++) ck_assert_int_eq(t->shape[d], c->shape[d]);
        ck_assert_uint_eq(t->nbytes, c->nbytes);
        if (c->nbytes) ck_assert_int_eq(memcmp(t->data, c->bytes, c->nbytes), 0);
    }
    /* epmoe_st_at walks the file in data order: insertion order for the non-empty ones. */
    const epmoe_st_tensor *first = epmoe_st_at(f, 0);
    ck_assert_ptr_nonnull(first);
    ck_assert_ptr_null(epmoe_st_at(f, n));
    ck_assert_ptr_null(epmoe_st_at(f, -1));
    ck_assert_ptr_null(epmoe_st_find(f, "absent"));
    ck_assert_ptr_null(epmoe_st_find(f, "t.F3")); /* a prefix of a name is not a match */
    ck_assert_str_eq(epmoe_st_metadata(f, "format"), "pt");
    ck_assert_str_eq(epmoe_st_metadata(f, "epmoe.note"), "a \"quoted\" value");
    ck_assert_ptr_null(epmoe_st_metadata(f, "missing"));
    epmoe_st_close(f);

    /* The same file as a one-file set. */
    epmoe_st_set *s = NULL;
    ck_assert_int_eq(epmoe_st_set_open(path, &s), EPMOE_OK);
    const epmoe_st_file *from = NULL;
    const epmoe_st_tensor *t = epmoe_st_set_find(s, "layers.0.deep", &from);
    ck_assert_ptr_nonnull(t);
    ck_assert_str_eq(epmoe_st_path(from), path);
    ck_assert_int_eq(epmoe_st_set_require(s, "scalar", EPMOE_DTYPE_F32, 0, NULL, &t), EPMOE_OK);
    ck_assert_int_eq(t->ndim, 0);
    epmoe_st_set_close(s);

    for (int i = 0; i < n; i++) free(cases[i].bytes);
    free(path);
}
END_TEST

static epmoe_status fill_counting(void *ctx, const char *name, void *dst, size_t nbytes) {
    int *calls = ctx;
    (*calls)++;
    unsigned char *p = dst;
    for (size_t i = 0; i < nbytes; i++) p[i] = (unsigned char)(i * 7 + strlen(name));
    return EPMOE_OK;
}

static epmoe_status fill_failing(void *ctx, const char *name, void *dst, size_t nbytes) {
    (void)ctx, (void)dst, (void)nbytes;
    EPMOE_FAIL(EPMOE_ERR_NUMERIC, "cannot produce %s", name);
}

START_TEST(test_deferred_writer) {
    char *path = data_path("st_deferred.safetensors");
    int calls = 0;
    uint8_t direct[6] = {9, 8, 7, 6, 5, 4};
    epmoe_st_writer *w = NULL;
    ck_assert_int_eq(epmoe_st_writer_create(&w), EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_add_deferred(w, "lazy", EPMOE_DTYPE_U8, 2,
                                                  (int64_t[]){4, 5}, fill_counting, &calls),
                     EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_add(w, "direct", EPMOE_DTYPE_U8, 1, (int64_t[]){6}, direct),
                     EPMOE_OK);
    ck_assert_int_eq(calls, 0); /* nothing produced before finish */
    ck_assert_int_eq(epmoe_st_writer_finish(w, path), EPMOE_OK);
    ck_assert_int_eq(calls, 1);
    epmoe_st_writer_free(w);

    epmoe_st_file *f = NULL;
    ck_assert_int_eq(epmoe_st_open(path, &f), EPMOE_OK);
    const epmoe_st_tensor *t = epmoe_st_find(f, "lazy");
    ck_assert_ptr_nonnull(t);
    const unsigned char *p = t->data;
    for (size_t i = 0; i < 20; i++) ck_assert_uint_eq(p[i], (unsigned char)(i * 7 + 4));
    t = epmoe_st_find(f, "direct");
    ck_assert_int_eq(memcmp(t->data, direct, 6), 0);
    epmoe_st_close(f);

    /* A failing producer fails finish, names the tensor and leaves no file behind. */
    char *bad = data_path("st_deferred_bad.safetensors");
    unlink(bad);
    ck_assert_int_eq(epmoe_st_writer_create(&w), EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_add_deferred(w, "broken", EPMOE_DTYPE_F32, 1,
                                                  (int64_t[]){3}, fill_failing, NULL),
                     EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_finish(w, bad), EPMOE_ERR_NUMERIC);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "broken"));
    epmoe_st_writer_free(w);
    ck_assert_int_ne(access(bad, F_OK), 0);
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", bad);
    ck_assert_int_ne(access(tmp, F_OK), 0);
    free(bad);
    free(path);
}
END_TEST

/* ---- malformed files ---- */

START_TEST(test_truncated_files) {
    char *good = data_path("st_trunc_src.safetensors");
    char *cut = data_path("st_trunc.safetensors");
    float values[6] = {1, 2, 3, 4, 5, 6};
    epmoe_st_writer *w = NULL;
    ck_assert_int_eq(epmoe_st_writer_create(&w), EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_add(w, "first", EPMOE_DTYPE_F32, 1, (int64_t[]){2}, values),
                     EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_add(w, "last", EPMOE_DTYPE_F32, 1, (int64_t[]){4},
                                         values + 2),
                     EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_finish(w, good), EPMOE_OK);
    epmoe_st_writer_free(w);
    size_t size = 0;
    unsigned char *bytes = read_file(good, &size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | bytes[i];

    /* Before the header is complete: format errors naming the file. */
    const size_t header_cuts[] = {0, 3, 7, 8, 9, 8 + hlen / 2, 8 + hlen - 1};
    for (size_t i = 0; i < sizeof header_cuts / sizeof header_cuts[0]; i++) {
        write_bytes(cut, bytes, header_cuts[i]);
        expect_open_error(cut, EPMOE_ERR_FORMAT, NULL, NULL);
    }
    /* Header complete, data short: the tensor whose bytes are missing is named. */
    write_bytes(cut, bytes, 8 + hlen);
    expect_open_error(cut, EPMOE_ERR_FORMAT, "first", "outside the data");
    write_bytes(cut, bytes, size - 1);
    expect_open_error(cut, EPMOE_ERR_FORMAT, "last", "outside the data");
    /* The whole file opens. */
    epmoe_st_file *f = NULL;
    write_bytes(cut, bytes, size);
    ck_assert_int_eq(epmoe_st_open(cut, &f), EPMOE_OK);
    epmoe_st_close(f);
    free(bytes);
    free(good);
    free(cut);
}
END_TEST

START_TEST(test_bad_headers) {
    char *p = data_path("st_bad.safetensors");

    /* header length larger than the file */
    unsigned char big[16] = {0xff, 0xff, 0, 0, 0, 0, 0, 0, '{', '}'};
    write_bytes(p, big, 10);
    expect_open_error(p, EPMOE_ERR_FORMAT, "header length 65535", NULL);
    unsigned char huge[10] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, '{', '}'};
    write_bytes(p, huge, 10);
    expect_open_error(p, EPMOE_ERR_FORMAT, "header length", NULL);

    write_raw(p, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], ", 4);
    expect_open_error(p, EPMOE_ERR_FORMAT, "not valid JSON", NULL);
    write_raw(p, "[1, 2, 3]", 0);
    expect_open_error(p, EPMOE_ERR_FORMAT, "not a JSON object", NULL);
    /* a dtype this build does not know is kept by name (size unchecked) and refused only when
     * a caller requires the tensor; a known foreign one (F4: 4 bits) has its size checked */
    write_raw(p, "{\"w\": {\"dtype\": \"F7\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4);
    {
        epmoe_st_set *set = NULL;
        ck_assert_msg(epmoe_st_set_open(p, &set) == EPMOE_OK, "%s", epmoe_last_error());
        const epmoe_st_tensor *t = epmoe_st_set_find(set, "w", NULL);
        ck_assert_ptr_nonnull(t);
        ck_assert_int_eq(t->dtype, EPMOE_DTYPE_COUNT);
        ck_assert_str_eq(t->dtype_text, "F7");
        ck_assert_int_eq(epmoe_st_set_require(set, "w", EPMOE_DTYPE_U8, 1, NULL, NULL),
                         EPMOE_ERR_FORMAT);
        ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "w: dtype F7, expected U8"));
        epmoe_st_set_close(set);
    }
    write_raw(p, "{\"w.f4\": {\"dtype\": \"F4\", \"shape\": [3, 4], \"data_offsets\": [0, 8]}}", 8);
    expect_open_error(p, EPMOE_ERR_FORMAT, "w.f4", "F4 [3, 4] needs 6 bytes");
    write_raw(p, "{\"w\": {\"dtype\": 3, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4);
    expect_open_error(p, EPMOE_ERR_FORMAT, "w", "dtype");
    /* shape and bytes disagree */
    write_raw(p, "{\"w.bad\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 20]}}",
              24);
    expect_open_error(p, EPMOE_ERR_FORMAT, "w.bad", "24 bytes");
    write_raw(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [-2], \"data_offsets\": [0, 8]}}", 8);
    expect_open_error(p, EPMOE_ERR_FORMAT, "w", "non-negative");
    write_raw(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}", 8);
    expect_open_error(p, EPMOE_ERR_FORMAT, "w", "shape");
    /* a shape whose element count overflows must not wrap to a small byte count */
    write_raw(p,
              "{\"w\": {\"dtype\": \"F64\", \"shape\": [4294967296, 4294967296, 16], "
              "\"data_offsets\": [0, 0]}}",
              0);
    expect_open_error(p, EPMOE_ERR_FORMAT, "w", "overflow");
    write_raw(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4]}}", 8);
    expect_open_error(p, EPMOE_ERR_FORMAT, "w", "data_offsets");
    write_raw(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}", 8);
    expect_open_error(p, EPMOE_ERR_FORMAT, "w", "data_offsets");
    write_raw(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1]}}", 8);
    expect_open_error(p, EPMOE_ERR_FORMAT, "w", "data_offsets");
    write_raw(p, "{\"w\": 5}", 8);
    expect_open_error(p, EPMOE_ERR_FORMAT, "w", NULL);
    /* overlapping ranges */
    write_raw(p,
              "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
              " \"b.overlap\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}",
              12);
    expect_open_error(p, EPMOE_ERR_FORMAT, "b.overlap", "overlap");
    /* ranges outside the data section */
    write_raw(p, "{\"out\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [6, 10]}}", 8);
    expect_open_error(p, EPMOE_ERR_FORMAT, "out", "outside the data");
    /* metadata values must be strings; metadata must be an object */
    write_raw(p, "{\"__metadata__\": {\"format\": \"pt\", \"layers\": 4}}", 0);
    expect_open_error(p, EPMOE_ERR_FORMAT, "layers", "not a string");
    write_raw(p, "{\"__metadata__\": [\"x\"]}", 0);
    expect_open_error(p, EPMOE_ERR_FORMAT, "__metadata__", NULL);
    /* duplicate names */
    write_raw(p,
              "{\"dup\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]},"
              " \"dup\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [1, 2]}}",
              2);
    expect_open_error(p, EPMOE_ERR_FORMAT, "dup", "duplicate");
    /* not a file at all */
    expect_open_error("/nonexistent/x.safetensors", EPMOE_ERR_IO, NULL, NULL);

    /* Accepted: empty tensors anywhere, extra data bytes, ranges in any header order. */
    write_raw(p,
              "{\"z\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [4, 6]},"
              " \"e\": {\"dtype\": \"F32\", \"shape\": [0, 3], \"data_offsets\": [5, 5]},"
              " \"a\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [0, 4]}}   ",
              16);
    epmoe_st_file *f = NULL;
    ck_assert_msg(epmoe_st_open(p, &f) == EPMOE_OK, "%s", epmoe_last_error());
    ck_assert_int_eq(epmoe_st_count(f), 3);
    ck_assert_str_eq(epmoe_st_at(f, 0)->name, "a"); /* data order */
    ck_assert_uint_eq(epmoe_st_find(f, "e")->nbytes, 0);
    epmoe_st_close(f);
    free(p);
}
END_TEST

/* ---- directory sets ---- */

static void write_small(const char *path, const char *const *names, int n, const char *meta) {
    static const float values[4] = {0.5f, -1.5f, 2.0f, 8.0f};
    epmoe_st_writer *w = NULL;
    ck_assert_int_eq(epmoe_st_writer_create(&w), EPMOE_OK);
    for (int i = 0; i < n; i++)
        ck_assert_int_eq(epmoe_st_writer_add(w, names[i], EPMOE_DTYPE_F32, 2,
                                             (int64_t[]){2, 2}, values),
                         EPMOE_OK);
    if (meta) ck_assert_int_eq(epmoe_st_writer_metadata(w, "who", meta), EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_finish(w, path), EPMOE_OK);
    epmoe_st_writer_free(w);
}

START_TEST(test_directory_set) {
    char *dir = data_path("st_dir");
    mkdir(dir, 0777);
    char a[4200], b[4200], other[4200];
    snprintf(a, sizeof a, "%s/b-second.safetensors", dir);
    snprintf(b, sizeof b, "%s/a-first.safetensors", dir);
    snprintf(other, sizeof other, "%s/notes.txt", dir);
    write_small(a, (const char *const[]){"x.w", "x.v"}, 2, "second");
    write_small(b, (const char *const[]){"y.w"}, 1, "first");
    write_bytes(other, "not a checkpoint", 16); /* ignored: not *.safetensors */

    epmoe_st_set *s = NULL;
    ck_assert_msg(epmoe_st_set_open(dir, &s) == EPMOE_OK, "%s", epmoe_last_error());
    ck_assert_str_eq(epmoe_st_set_path(s), dir);
    const epmoe_st_file *from = NULL;
    ck_assert_ptr_nonnull(epmoe_st_set_find(s, "x.v", &from));
    ck_assert_str_eq(epmoe_st_path(from), a);
    ck_assert_ptr_nonnull(epmoe_st_set_find(s, "y.w", &from));
    ck_assert_str_eq(epmoe_st_path(from), b);
    ck_assert_ptr_null(epmoe_st_set_find(s, "z", &from));
    ck_assert_ptr_null(from);
    ck_assert_str_eq(epmoe_st_set_metadata(s, "who"), "first"); /* files in sorted order */

    const epmoe_st_tensor *t = NULL;
    ck_assert_int_eq(epmoe_st_set_require(s, "x.w", EPMOE_DTYPE_F32, 2, (int64_t[]){2, 2}, &t),
                     EPMOE_OK);
    const float expect[4] = {0.5f, -1.5f, 2.0f, 8.0f};
    ck_assert_int_eq(memcmp(t->data, expect, sizeof expect), 0);
    ck_assert_int_eq(epmoe_st_set_require(s, "x.w", EPMOE_DTYPE_F32, 2, NULL, NULL), EPMOE_OK);

    ck_assert_int_eq(epmoe_st_set_require(s, "x.w", EPMOE_DTYPE_BF16, 2, NULL, NULL),
                     EPMOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), a));
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "x.w: dtype F32, expected BF16"));
    ck_assert_int_eq(epmoe_st_set_require(s, "x.v", EPMOE_DTYPE_F32, 2, (int64_t[]){2, 3}, NULL),
                     EPMOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "x.v: shape [2, 2], expected [2, 3]"));
    ck_assert_int_eq(epmoe_st_set_require(s, "x.v", EPMOE_DTYPE_F32, 0, NULL, NULL),
                     EPMOE_OK); /* shape NULL skips the check */
    ck_assert_int_eq(epmoe_st_set_require(s, "x.v", EPMOE_DTYPE_F32, 1, (int64_t[]){4}, NULL),
                     EPMOE_ERR_FORMAT);
    ck_assert_int_eq(epmoe_st_set_require(s, "gone", EPMOE_DTYPE_F32, 0, NULL, NULL),
                     EPMOE_ERR_NOT_FOUND);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "gone"));
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), dir));
    epmoe_st_set_close(s);

    /* The same tensor name in two files is an error naming both. */
    char c[4200];
    snprintf(c, sizeof c, "%s/c-third.safetensors", dir);
    write_small(c, (const char *const[]){"x.v"}, 1, NULL);
    s = (epmoe_st_set *)0x1;
    ck_assert_int_eq(epmoe_st_set_open(dir, &s), EPMOE_ERR_FORMAT);
    ck_assert_ptr_null(s);
    const char *msg = epmoe_last_error();
    ck_assert_msg(strstr(msg, "x.v") && strstr(msg, a) && strstr(msg, c), "%s", msg);
    unlink(c);

    /* A broken member file fails the set, naming that file. */
    write_raw(c, "{oops", 0);
    ck_assert_int_eq(epmoe_st_set_open(dir, &s), EPMOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), c));
    unlink(c);

    unlink(a);
    unlink(b);
    unlink(other);
    /* An empty directory is not a checkpoint. */
    ck_assert_int_eq(epmoe_st_set_open(dir, &s), EPMOE_ERR_NOT_FOUND);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), dir));
    ck_assert_int_eq(epmoe_st_set_open("/nonexistent/ckpt", &s), EPMOE_ERR_IO);
    rmdir(dir);
    free(dir);
}
END_TEST

/* A model directory: the index names each tensor's shard; shards open on first use. */
START_TEST(test_indexed_set) {
    char *dir = data_path("st_indexed");
    mkdir(dir, 0777);
    char a[4200], b[4200], c[4200], index[4200];
    snprintf(a, sizeof a, "%s/model-00001-of-00003.safetensors", dir);
    snprintf(b, sizeof b, "%s/model-00002-of-00003.safetensors", dir);
    snprintf(c, sizeof c, "%s/model-00003-of-00003.safetensors", dir);
    snprintf(index, sizeof index, "%s/%s", dir, EPMOE_ST_INDEX_FILE);
    write_small(a, (const char *const[]){"embed.weight", "layers.0.w"}, 2, NULL);
    write_small(b, (const char *const[]){"layers.1.w", "layers.1.v"}, 2, "second");
    write_bytes(c, "not even a header", 17); /* named by no tensor we look up */
    const char *good =
        "{\"metadata\": {\"total_size\": 96}, \"weight_map\": {"
        "\"embed.weight\": \"model-00001-of-00003.safetensors\","
        "\"layers.0.w\": \"model-00001-of-00003.safetensors\","
        "\"layers.1.w\": \"model-00002-of-00003.safetensors\","
        "\"layers.1.v\": \"model-00002-of-00003.safetensors\","
        "\"layers.1.gone\": \"model-00002-of-00003.safetensors\","
        "\"head.weight\": \"model-00003-of-00003.safetensors\"}}";
    write_bytes(index, good, strlen(good));

    epmoe_st_set *s = NULL;
    ck_assert_msg(epmoe_st_set_open(dir, &s) == EPMOE_OK, "%s", epmoe_last_error());
    ck_assert_str_eq(epmoe_st_set_index_path(s), index);
    ck_assert_str_eq(epmoe_st_set_dir(s), dir);
    ck_assert_int_eq(epmoe_st_set_file_count(s), 3);
    ck_assert_int_eq(epmoe_st_set_files_open(s), 0); /* only the index was read */
    ck_assert(epmoe_st_set_contains(s, "head.weight") && !epmoe_st_set_contains(s, "nope"));
    ck_assert_int_eq(epmoe_st_set_files_open(s), 0);

    const epmoe_st_tensor *t = NULL;
    const epmoe_st_file *from = NULL;
    ck_assert_int_eq(epmoe_st_set_require(s, "layers.1.v", EPMOE_DTYPE_F32, 2, (int64_t[]){2, 2},
                                          &t),
                     EPMOE_OK);
    const float expect[4] = {0.5f, -1.5f, 2.0f, 8.0f};
    ck_assert_int_eq(memcmp(t->data, expect, sizeof expect), 0);
    ck_assert_int_eq(epmoe_st_set_files_open(s), 1);
    ck_assert(epmoe_st_set_file_is_open(s, "model-00002-of-00003.safetensors"));
    ck_assert(!epmoe_st_set_file_is_open(s, "model-00001-of-00003.safetensors"));
    ck_assert_str_eq(epmoe_st_set_metadata(s, "who"), "second");

    /* absent from the index: NULL without an error; the index is named when required */
    ck_assert_int_eq(epmoe_st_set_lookup(s, "nope", &t, &from), EPMOE_OK);
    ck_assert_ptr_null(t);
    ck_assert_int_eq(epmoe_st_set_require(s, "nope", EPMOE_DTYPE_F32, 0, NULL, NULL),
                     EPMOE_ERR_NOT_FOUND);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), index));
    /* the index names a shard that does not hold the tensor */
    ck_assert_int_eq(epmoe_st_set_lookup(s, "layers.1.gone", &t, &from), EPMOE_ERR_FORMAT);
    ck_assert_msg(strstr(epmoe_last_error(), "layers.1.gone") && strstr(epmoe_last_error(), b),
                  "%s", epmoe_last_error());
    /* a broken shard fails the lookups of its tensors, naming shard and tensor */
    ck_assert_int_eq(epmoe_st_set_lookup(s, "head.weight", &t, &from), EPMOE_ERR_FORMAT);
    ck_assert_msg(strstr(epmoe_last_error(), "head.weight") && strstr(epmoe_last_error(), c),
                  "%s", epmoe_last_error());
    ck_assert_ptr_null(epmoe_st_set_find(s, "head.weight", &from));
    ck_assert_ptr_null(from);
    /* a missing shard likewise */
    unlink(a);
    ck_assert_int_eq(epmoe_st_set_lookup(s, "layers.0.w", &t, &from), EPMOE_ERR_IO);
    ck_assert_msg(strstr(epmoe_last_error(), "layers.0.w") && strstr(epmoe_last_error(), a),
                  "%s", epmoe_last_error());
    epmoe_st_set_close(s);

    /* indexes that are refused when opened */
    const char *bad[][2] = {
        {"{\"weight_map\": {\"x\": \"../elsewhere.safetensors\"}}", "../elsewhere"},
        {"{\"weight_map\": {\"x\": 3}}", "x: shard must be a file name"},
        {"{\"metadata\": {}}", "weight_map"},
        {"{\"weight_map\": {}}", "lists no tensors"},
        {"{\"weight_map\": {\"x\": \"a.safetensors\",", "not valid JSON"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_bytes(index, bad[i][0], strlen(bad[i][0]));
        s = (epmoe_st_set *)0x1;
        ck_assert_int_ne(epmoe_st_set_open(dir, &s), EPMOE_OK);
        ck_assert_ptr_null(s);
        ck_assert_msg(strstr(epmoe_last_error(), bad[i][1]) && strstr(epmoe_last_error(), index),
                      "case %zu: %s", i, epmoe_last_error());
    }
    unlink(index);
    unlink(b);
    unlink(c);
    rmdir(dir);
    free(dir);
}
END_TEST

static Suite *safetensors_suite(void) {
    Suite *s = suite_create("safetensors");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_dtype_names_and_sizes);
    tcase_add_test(tc, test_conversions);
    tcase_add_test(tc, test_round_trip_every_dtype);
    tcase_add_test(tc, test_deferred_writer);
    tcase_add_test(tc, test_truncated_files);
    tcase_add_test(tc, test_bad_headers);
    tcase_add_test(tc, test_directory_set);
    tcase_add_test(tc, test_indexed_set);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(safetensors_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
