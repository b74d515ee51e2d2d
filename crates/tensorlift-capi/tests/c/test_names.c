/* Names and paths C cannot take as they are, from C. Run by tests/capi.rs:
 *
 *   test_names NUL_NAMED_FILE NON_UTF8_PATH
 *
 * NUL_NAMED_FILE holds tensors "w\u0000x", "w" and "z", in that order (a JSON name may
 * hold a NUL, which a C string cannot): a load of it fails, and a stream of it fails once
 * and is over: nothing comes after the failure. NON_UTF8_PATH is a checkpoint at a path that is not UTF-8 (the system's
 * paths are bytes): it loads. Prints "ok" and exits 0 when every check held. */
#include <stdio.h>
#include <string.h>

#include "tensorlift.h"

#include "expect.h"

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: test_names NUL_NAMED_FILE NON_UTF8_PATH\n");
        return 2;
    }
    TlOptions *o = NULL;
    TlLoader *l = NULL;
    EXPECT(tl_options_new(&o) == TL_STATUS_OK);
    EXPECT(tl_options_set_device(o, "cpu") == TL_STATUS_OK);
    EXPECT(tl_loader_new(o, &l) == TL_STATUS_OK);
    tl_options_free(o);

    TlModel *m = NULL;
    EXPECT(tl_load(l, argv[1], &m) == TL_STATUS_LOAD_FAILED);
    EXPECT(m == NULL);
    EXPECT(strstr(tl_last_error(), "has a NUL in its name") != NULL);

    TlStream *s = NULL;
    EXPECT(tl_stream_open(l, argv[1], &s) == TL_STATUS_OK);
    int named = 0, failed = 0, after = 0;
    for (;;) {
        TlTensor *t = NULL;
        TlStatus st = tl_stream_next(s, &t);
        if (st == TL_STATUS_END) {
            EXPECT(t == NULL);
            break;
        }
        if (st == TL_STATUS_LOAD_FAILED) {
            EXPECT(t == NULL);
            EXPECT(strstr(tl_last_error(), "has a NUL in its name") != NULL);
            failed++;
            continue;
        }
        EXPECT(st == TL_STATUS_OK);
        TlTensorInfo info;
        EXPECT(tl_tensor_info(t, &info) == TL_STATUS_OK);
        EXPECT(strcmp(info.name, "w") == 0 || strcmp(info.name, "z") == 0);
        named++;
        after += failed;
        tl_tensor_free(t);
    }
    /* One failure, and nothing after it. */
    EXPECT(failed == 1 && after == 0 && named <= 2);
    const char *stats = NULL;
    EXPECT(tl_stream_stats_json(s, &stats) == TL_STATUS_OK && stats[0] == '{');
    tl_stream_free(s);

    EXPECT(tl_load(l, argv[2], &m) == TL_STATUS_OK);
    EXPECT(tl_model_len(m) == 1);
    tl_model_free(m);
    tl_loader_free(l);
    printf("ok\n");
    return 0;
}
