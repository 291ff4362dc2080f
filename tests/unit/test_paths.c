/* Output paths (common/paths.h): what a program may write to, checked before any work. Each
 * refusal must name the path. Runs in a fresh directory under the test data folder. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/paths.h"
#include "tests/support/test_support.h"

static char dir[1024];

static const char *in_dir(const char *name) {
    static char buf[2][1200];
    static int which = 0;
    which = !which;
    snprintf(buf[which], sizeof buf[which], "%s/%s", dir, name);
    return buf[which];
}

static void setup(void) {
    snprintf(dir, sizeof dir, "%s", epmoe_test_data_path("paths_XXXXXX"));
    ck_assert_ptr_nonnull(mkdtemp(dir));
}

static void teardown(void) {
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}

static void refused(epmoe_status got, epmoe_status want, const char *needle) {
    ck_assert_msg(got == want, "status %s, expected %s (%s)", epmoe_status_name(got),
                  epmoe_status_name(want), epmoe_last_error());
    ck_assert_msg(strstr(epmoe_last_error(), needle), "message does not name '%s': %s", needle,
                  epmoe_last_error());
}

START_TEST(regular_files_and_new_names_pass) {
    ck_assert_int_eq(epmoe_check_output_file(in_dir("new.safetensors"), 0), EPMOE_OK);
    FILE *f = fopen(in_dir("old.safetensors"), "w");
    ck_assert_ptr_nonnull(f);
    fclose(f);
    ck_assert_int_eq(epmoe_check_output_file(in_dir("old.safetensors"), 1000), EPMOE_OK);
    ck_assert_int_eq(epmoe_check_output_dir(in_dir("ckpt")), EPMOE_OK);     /* new */
    ck_assert_int_eq(epmoe_check_output_dir(in_dir("ckpt/")), EPMOE_OK);    /* new, slash */
    ck_assert_int_eq(epmoe_check_output_dir(dir), EPMOE_OK);                /* existing */
}
END_TEST

START_TEST(device_nodes_symlinks_directories_refused) {
    refused(epmoe_check_output_file("/dev/null", 0), EPMOE_ERR_INVALID_ARG, "/dev/null");
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "character device"));
    ck_assert_int_eq(symlink("/tmp/some-target", in_dir("link")), 0);
    refused(epmoe_check_output_file(in_dir("link"), 0), EPMOE_ERR_INVALID_ARG, in_dir("link"));
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "symbolic link"));
    refused(epmoe_check_output_file(dir, 0), EPMOE_ERR_INVALID_ARG, dir);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "directory"));
    refused(epmoe_check_output_file(in_dir("sub/"), 0), EPMOE_ERR_INVALID_ARG, "sub/");
    ck_assert_int_eq(mkfifo(in_dir("fifo"), 0600), 0);
    refused(epmoe_check_output_file(in_dir("fifo"), 0), EPMOE_ERR_INVALID_ARG, "FIFO");
    refused(epmoe_check_output_file("", 0), EPMOE_ERR_INVALID_ARG, "empty");
    /* a directory output may not be a file or a device */
    FILE *f = fopen(in_dir("plain"), "w");
    ck_assert_ptr_nonnull(f);
    fclose(f);
    refused(epmoe_check_output_dir(in_dir("plain")), EPMOE_ERR_INVALID_ARG, in_dir("plain"));
    refused(epmoe_check_output_dir("/dev/null"), EPMOE_ERR_INVALID_ARG, "/dev/null");
    refused(epmoe_check_output_dir(""), EPMOE_ERR_INVALID_ARG, "empty");
}
END_TEST

START_TEST(missing_or_unusable_directory_refused) {
    refused(epmoe_check_output_file(in_dir("no/such/dir/out.st"), 0), EPMOE_ERR_IO, "no/such/dir");
    FILE *f = fopen(in_dir("file"), "w");
    ck_assert_ptr_nonnull(f);
    fclose(f);
    refused(epmoe_check_output_file(in_dir("file/out.st"), 0), EPMOE_ERR_IO, "file");
    refused(epmoe_check_output_dir(in_dir("no/such/ckpt")), EPMOE_ERR_IO, "no/such");
    /* more bytes than any file system has: the free-space check refuses, naming the path */
    refused(epmoe_check_output_file(in_dir("big.st"), UINT64_MAX / 2), EPMOE_ERR_IO, "big.st");
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "free"));
}
END_TEST

START_TEST(open_regular_never_follows_a_symlink) {
    /* the temp name of a write-and-rename, planted as a symlink to a victim: refused, and the
     * victim keeps its contents */
    FILE *victim = fopen(in_dir("victim"), "w");
    ck_assert_ptr_nonnull(victim);
    fputs("keep me", victim);
    fclose(victim);
    ck_assert_int_eq(symlink(in_dir("victim"), in_dir("out.tmp")), 0);
    FILE *f = NULL;
    refused(epmoe_open_regular_for_write(in_dir("out.tmp"), &f), EPMOE_ERR_IO, "out.tmp");
    ck_assert_ptr_null(f);
    struct stat sb;
    ck_assert_int_eq(stat(in_dir("victim"), &sb), 0);
    ck_assert_int_eq(sb.st_size, 7);
    /* a FIFO is refused without blocking; a regular file is truncated and written */
    ck_assert_int_eq(mkfifo(in_dir("fifo.tmp"), 0600), 0);
    refused(epmoe_open_regular_for_write(in_dir("fifo.tmp"), &f), EPMOE_ERR_IO, "fifo.tmp");
    ck_assert_int_eq(epmoe_open_regular_for_write(in_dir("victim"), &f), EPMOE_OK);
    fputs("new", f);
    fclose(f);
    ck_assert_int_eq(stat(in_dir("victim"), &sb), 0);
    ck_assert_int_eq(sb.st_size, 3);
}
END_TEST

int main(void) {
    Suite *s = suite_create("paths");
    TCase *tc = tcase_create("output");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, regular_files_and_new_names_pass);
    tcase_add_test(tc, device_nodes_symlinks_directories_refused);
    tcase_add_test(tc, missing_or_unusable_directory_refused);
    tcase_add_test(tc, open_regular_never_follows_a_symlink);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
