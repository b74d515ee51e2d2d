/* The C API from C: load, walk, export to DLPack, stream, and the errors. Run by
 * tests/capi.rs, which compiles it with the system compiler (once with AddressSanitizer),
 * gives it a checkpoint and a device, and checks what it wrote against the file's bytes.
 *
 *   test_capi PATH DEVICE OUTDIR
 *
 * Writes OUTDIR/NAME.bin with each tensor's bytes (a device tensor's read back through the
 * driver the load used), prints one line per tensor
 * ("tensor NAME DTYPE [d0,d1] DEVICE_TYPE NBYTES"), and exits 0 when every check held. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tensorlift.h"
/* DLPack's structs as PyTorch ships them (torch/include/ATen/dlpack.h): not ours. */
#include "ATen/dlpack.h"

#include "expect.h"

enum { MAX = 64 };

/* A load on a thread of its own. */
struct Job {
    TlLoader *loader;
    const char *path;
    TlStatus status;
    size_t tensors;
    int error_was_empty;
    /* Whether the pointer taken before the thread's first call names its load's path
     * afterwards (for a load that fails). */
    int first_pointer_names_path;
};

static void *load_in_thread(void *arg) {
    struct Job *job = arg;
    const char *first = tl_last_error();
    job->error_was_empty = first[0] == 0;
    TlModel *m = NULL;
    job->status = tl_load(job->loader, job->path, &m);
    job->first_pointer_names_path = strstr(first, job->path) != NULL;
    job->tensors = tl_model_len(m);
    tl_model_free(m);
    return NULL;
}

/* Copies n bytes at device address ptr of device 0 to dst, through the driver library the
 * load used (TENSORLIFT_LIBCUDA, else libcuda.so.1) in device 0's primary context, the
 * context tensorlift loads in; 0 on success. */
static int device_bytes(uint64_t ptr, void *dst, size_t n) {
    const char *name = getenv("TENSORLIFT_LIBCUDA");
    void *lib = dlopen(name && *name ? name : "libcuda.so.1", RTLD_NOW);
    if (lib == NULL) return -1;
    int (*init)(unsigned) = (int (*)(unsigned))dlsym(lib, "cuInit");
    int (*get)(int *, int) = (int (*)(int *, int))dlsym(lib, "cuDeviceGet");
    int (*retain)(void **, int) = (int (*)(void **, int))dlsym(lib, "cuDevicePrimaryCtxRetain");
    int (*release)(int) = (int (*)(int))dlsym(lib, "cuDevicePrimaryCtxRelease_v2");
    int (*set)(void *) = (int (*)(void *))dlsym(lib, "cuCtxSetCurrent");
    int (*copy)(void *, uint64_t, size_t) = (int (*)(void *, uint64_t, size_t))dlsym(lib, "cuMemcpyDtoH_v2");
    int dev = -1, rc = -1;
    void *ctx = NULL;
    if (init && get && retain && release && set && copy && init(0) == 0 && get(&dev, 0) == 0 &&
        retain(&ctx, dev) == 0) {
        if (set(ctx) == 0) rc = n == 0 ? 0 : copy(dst, ptr, n);
        set(NULL);
        release(dev);
    }
    dlclose(lib);
    return rc;
}

/* The tensor's bytes, wherever they are (copied back from a device), in new memory, or
 * NULL. */
static unsigned char *bytes_of(const TlTensorInfo *info) {
    unsigned char *bytes = malloc(info->nbytes ? info->nbytes : 1);
    if (bytes == NULL) return NULL;
    if (info->device_type == 1) {
        if (info->nbytes) memcpy(bytes, info->host_data, info->nbytes);
    } else if (device_bytes(info->device_ptr, bytes, info->nbytes) != 0) {
        free(bytes);
        return NULL;
    }
    return bytes;
}

/* Whether the first n bytes of the file the model's tensor `name` was written to (and the
 * test checks against the checkpoint) are `bytes`. */
static int same_as_written(const char *outdir, const char *name, const unsigned char *bytes, size_t n) {
    char file[4096];
    snprintf(file, sizeof file, "%s/%s.bin", outdir, name);
    FILE *f = fopen(file, "rb");
    if (f == NULL) return 0;
    unsigned char *want = malloc(n ? n : 1);
    int same = want != NULL && fread(want, 1, n, f) == n && memcmp(bytes, want, n) == 0;
    free(want);
    fclose(f);
    return same;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: test_capi PATH DEVICE OUTDIR BIG\n");
        return 2;
    }
    const char *path = argv[1], *device = argv[2], *outdir = argv[3], *big = argv[4];
    printf("version %s\n", tl_version());
    /* The library is of the ABI this program was built against. */
    EXPECT(tl_abi_version() == TL_ABI_VERSION);

    TlOptions *options = NULL;
    CHECK(tl_options_new(&options));
    EXPECT(tl_options_set_device(options, "tpu") == TL_STATUS_INVALID_ARGUMENT);
    EXPECT(strstr(tl_last_error(), "tpu") != NULL);
    CHECK(tl_options_set_device(options, device));
    EXPECT(tl_options_set_dtype(options, "F64") == TL_STATUS_INVALID_ARGUMENT);
    TlLoader *loader = NULL;
    CHECK(tl_loader_new(options, &loader));
    tl_options_free(options);
    const char *where = NULL;
    CHECK(tl_loader_device(loader, &where));
    printf("device %s\n", where);

    /* Every tensor, each exported to DLPack; the exports outlive the model. */
    TlModel *model = NULL;
    CHECK(tl_load(loader, path, &model));
    size_t n = tl_model_len(model);
    EXPECT(n > 0 && n <= MAX);
    DLManagedTensorVersioned *exports[MAX];
    const void *host[MAX];
    uint64_t sizes[MAX];
    for (size_t i = 0; i < n; i++) {
        TlTensorInfo info;
        CHECK(tl_model_tensor(model, i, &info));
        printf("tensor %s %s [", info.name, info.dtype);
        for (size_t d = 0; d < info.ndim; d++) printf(d ? ",%llu" : "%llu", (unsigned long long)info.shape[d]);
        printf("] %d %llu\n", info.device_type, (unsigned long long)info.nbytes);
        size_t found = MAX;
        CHECK(tl_model_find(model, info.name, &found));
        EXPECT(found == i);
        char file[4096];
        snprintf(file, sizeof file, "%s/%s.bin", outdir, info.name);
        FILE *f = fopen(file, "wb");
        EXPECT(f != NULL);
        if (info.device_type == 1) {
            EXPECT(info.host_data != NULL || info.nbytes == 0);
            EXPECT(info.device_ptr == 0);
            EXPECT(fwrite(info.host_data, 1, info.nbytes, f) == info.nbytes);
        } else {
            EXPECT(info.device_type == 2 && info.host_data == NULL && info.device_ptr != 0);
            unsigned char *bytes = malloc(info.nbytes ? info.nbytes : 1);
            EXPECT(bytes != NULL);
            EXPECT(device_bytes(info.device_ptr, bytes, info.nbytes) == 0);
            EXPECT(fwrite(bytes, 1, info.nbytes, f) == info.nbytes);
            free(bytes);
        }
        fclose(f);
        CHECK(tl_model_to_dlpack(model, i, &exports[i]));
        DLTensor *t = &exports[i]->dl_tensor;
        EXPECT(exports[i]->version.major >= 1);
        EXPECT((int)t->device.device_type == info.device_type && t->ndim == (int32_t)info.ndim);
        for (size_t d = 0; d < info.ndim; d++) EXPECT(t->shape[d] == (int64_t)info.shape[d]);
        uintptr_t data = (uintptr_t)t->data + (uintptr_t)t->byte_offset;
        /* (An empty tensor's address means nothing: its host_data is null.) */
        if (info.nbytes == 0) EXPECT(info.host_data == NULL);
        if (info.nbytes > 0)
            EXPECT(info.device_type == 1 ? data == (uintptr_t)info.host_data : data == (uintptr_t)info.device_ptr);
        if (info.device_type == 1) EXPECT((exports[i]->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0);
        host[i] = info.host_data;
        sizes[i] = info.nbytes;
    }
    /* A filter and a slice: the first row of the first tensor that has two or more. */
    for (size_t i = 0; i < n; i++) {
        TlTensorInfo info;
        CHECK(tl_model_tensor(model, i, &info));
        if (info.ndim == 0 || info.shape[0] < 2) continue;
        TlOptions *o = NULL;
        CHECK(tl_options_new(&o));
        CHECK(tl_options_set_device(o, device));
        CHECK(tl_options_add_filter(o, info.name));
        uint64_t start = 0, stop = 1;
        CHECK(tl_options_add_slice(o, info.name, &start, &stop, 1));
        EXPECT(tl_options_add_slice(o, info.name, &stop, &start, 1) == TL_STATUS_INVALID_ARGUMENT);
        /* A count no tensor has (a caller's bug) is refused before the arrays are read. */
        EXPECT(tl_options_add_slice(o, info.name, &start, &stop, (size_t)-1) == TL_STATUS_INVALID_ARGUMENT);
        EXPECT(strstr(tl_last_error(), "more than 1024") != NULL);
        TlLoader *l = NULL;
        CHECK(tl_loader_new(o, &l));
        tl_options_free(o);
        TlModel *m = NULL;
        CHECK(tl_load(l, path, &m));
        TlTensorInfo part;
        EXPECT(tl_model_len(m) == 1);
        CHECK(tl_model_tensor(m, 0, &part));
        EXPECT(strcmp(part.name, info.name) == 0 && part.shape[0] == 1);
        EXPECT(part.nbytes * info.shape[0] == info.nbytes);
        /* Its first row, on the host or the device: the first bytes of the whole tensor. */
        unsigned char *row = bytes_of(&part);
        EXPECT(row != NULL && same_as_written(outdir, info.name, row, part.nbytes));
        free(row);
        printf("slice %s [0,1) of %llu rows\n", part.name, (unsigned long long)info.shape[0]);
        tl_model_free(m);
        tl_loader_free(l);
        break;
    }
    size_t missing = 0;
    EXPECT(tl_model_find(model, "no such tensor", &missing) == TL_STATUS_NOT_FOUND);
    /* Nowhere to put the index: refused, whether or not the name is found. */
    {
        TlTensorInfo first;
        CHECK(tl_model_tensor(model, 0, &first));
        EXPECT(tl_model_find(model, first.name, NULL) == TL_STATUS_INVALID_ARGUMENT);
        EXPECT(tl_model_find(model, "no such tensor", NULL) == TL_STATUS_INVALID_ARGUMENT);
    }
    const char *stats = NULL;
    CHECK(tl_model_stats_json(model, &stats));
    EXPECT(strstr(stats, "\"seconds\"") != NULL);
    char names[MAX][256];
    for (size_t i = 0; i < n; i++) {
        TlTensorInfo info;
        CHECK(tl_model_tensor(model, i, &info));
        snprintf(names[i], sizeof names[i], "%s", info.name);
    }
    tl_model_free(model);
    /* The model is gone and the loader keeps no memory: the exports still hold the bytes
     * (read, under AddressSanitizer, and compared with what was written from the model). */
    CHECK(tl_loader_release_host_memory(loader));
    for (size_t i = 0; i < n; i++) {
        DLTensor *t = &exports[i]->dl_tensor;
        if (t->device.device_type == kDLCPU && sizes[i] > 0) {
            const unsigned char *bytes = (const unsigned char *)t->data + t->byte_offset;
            EXPECT(bytes == host[i]);
            char file[4096];
            snprintf(file, sizeof file, "%s/%s.bin", outdir, names[i]);
            FILE *f = fopen(file, "rb");
            EXPECT(f != NULL);
            unsigned char *want = malloc(sizes[i]);
            EXPECT(want != NULL && fread(want, 1, sizes[i], f) == sizes[i]);
            fclose(f);
            EXPECT(memcmp(bytes, want, sizes[i]) == 0);
            free(want);
        }
        exports[i]->deleter(exports[i]);
    }

    /* The same tensors streamed, one at a time. */
    TlStream *stream = NULL;
    CHECK(tl_stream_open(loader, path, &stream));
    size_t streamed = 0;
    for (;;) {
        TlTensor *t = NULL;
        TlStatus s = tl_stream_next(stream, &t);
        if (s == TL_STATUS_END) {
            EXPECT(t == NULL && strstr(tl_last_error(), "no tensor left") != NULL);
            break;
        }
        CHECK(s);
        TlTensorInfo info;
        CHECK(tl_tensor_info(t, &info));
        unsigned char *got = bytes_of(&info);
        EXPECT(got != NULL && same_as_written(outdir, info.name, got, info.nbytes));
        free(got);
        DLManagedTensorVersioned *e = NULL;
        CHECK(tl_tensor_to_dlpack(t, &e));
        tl_tensor_free(t);
        e->deleter(e);
        streamed++;
    }
    EXPECT(streamed == n);
    CHECK(tl_stream_stats_json(stream, &stats));
    EXPECT(strstr(stats, "\"tensors_loaded\"") != NULL);
    /* The stats are final: asked again, the same string, and the first pointer still
     * readable (under AddressSanitizer). */
    const char *stats_again = NULL;
    CHECK(tl_stream_stats_json(stream, &stats_again));
    EXPECT(stats_again == stats && strstr(stats, "\"tensors_loaded\"") != NULL);
    tl_stream_free(stream);

    /* A stream cancelled and freed after its first tensor, of BIG's four reads (the others
     * may still be in flight then, or done): its first tensor stays valid, and the loader
     * loads BIG whole afterwards. (Under AddressSanitizer, nothing leaks.) */
    CHECK(tl_stream_open(loader, big, &stream));
    TlTensor *first = NULL;
    CHECK(tl_stream_next(stream, &first));
    /* Cancelled after it: the next call gives nothing and says so, as does every later one;
     * the first tensor stays valid. */
    CHECK(tl_stream_cancel(stream));
    TlTensor *after = first;
    EXPECT(tl_stream_next(stream, &after) == TL_STATUS_CANCELLED && after == NULL);
    EXPECT(strstr(tl_last_error(), "cancelled") != NULL);
    EXPECT(tl_stream_next(stream, &after) == TL_STATUS_CANCELLED && after == NULL);
    tl_stream_free(stream);
    TlTensorInfo first_info;
    CHECK(tl_tensor_info(first, &first_info));
    unsigned char *first_bytes = bytes_of(&first_info);
    EXPECT(first_bytes != NULL && first_info.nbytes == 6u << 20);
    if (first_bytes != NULL) {
        /* Written for the test to compare with the checkpoint. */
        char file[4096];
        snprintf(file, sizeof file, "%s/midway.bin", outdir);
        FILE *f = fopen(file, "wb");
        EXPECT(f != NULL && fwrite(first_bytes, 1, first_info.nbytes, f) == first_info.nbytes);
        if (f != NULL) fclose(f);
        printf("midway %s\n", first_info.name);
    }
    free(first_bytes);
    tl_tensor_free(first);
    tl_loader_release_host_memory(loader);
    TlModel *whole = NULL;
    CHECK(tl_load(loader, big, &whole));
    EXPECT(tl_model_len(whole) == 4);
    tl_model_free(whole);

    /* Two threads load with one loader at once; each thread has its own last error. */
    struct Job jobs[2] = {{loader, path, 0, 0, 0, 0}, {loader, "/nonexistent/model.safetensors", 0, 0, 0, 0}};
    pthread_t threads[2];
    for (int j = 0; j < 2; j++) EXPECT(pthread_create(&threads[j], NULL, load_in_thread, &jobs[j]) == 0);
    for (int j = 0; j < 2; j++) EXPECT(pthread_join(threads[j], NULL) == 0);
    EXPECT(jobs[0].status == TL_STATUS_OK && jobs[0].tensors == n && jobs[0].error_was_empty);
    EXPECT(jobs[1].status == TL_STATUS_LOAD_FAILED && jobs[1].first_pointer_names_path);

    /* Errors: a missing checkpoint names itself and leaves null; nulls are refused, not
     * followed, and a call with nowhere to put its result makes nothing. */
    TlModel *none = (TlModel *)&missing;
    EXPECT(tl_load(loader, "/nonexistent/model.safetensors", &none) == TL_STATUS_LOAD_FAILED);
    EXPECT(strstr(tl_last_error(), "/nonexistent") != NULL && none == NULL);
    /* The last error's pointer outlives later failures, which change what it says (as in
     * `printf("%d %s", tl_load(...), tl_last_error())`, whichever C evaluates first): read
     * under AddressSanitizer, it is the next failure's message. */
    const char *said = tl_last_error();
    EXPECT(tl_load(loader, "/nonexistent/other.safetensors", &none) == TL_STATUS_LOAD_FAILED);
    EXPECT(strstr(said, "other.safetensors") != NULL && said == tl_last_error());
    EXPECT(tl_load(loader, path, NULL) == TL_STATUS_INVALID_ARGUMENT);
    EXPECT(tl_stream_open(loader, path, NULL) == TL_STATUS_INVALID_ARGUMENT);
    EXPECT(tl_loader_new(NULL, NULL) == TL_STATUS_INVALID_ARGUMENT);
    EXPECT(tl_load(loader, NULL, &none) == TL_STATUS_INVALID_ARGUMENT);
    EXPECT(tl_load(NULL, path, &none) == TL_STATUS_INVALID_ARGUMENT);
    EXPECT(tl_model_tensor(NULL, 0, NULL) == TL_STATUS_INVALID_ARGUMENT);
    /* An export refused (no model or tensor, an index past the end) leaves null too. */
    DLManagedTensorVersioned *no_export = (DLManagedTensorVersioned *)&missing;
    EXPECT(tl_model_to_dlpack(NULL, 0, &no_export) == TL_STATUS_INVALID_ARGUMENT && no_export == NULL);
    TlModel *again = NULL;
    CHECK(tl_load(loader, path, &again));
    no_export = (DLManagedTensorVersioned *)&missing;
    EXPECT(tl_model_to_dlpack(again, tl_model_len(again), &no_export) == TL_STATUS_INVALID_ARGUMENT);
    EXPECT(no_export == NULL);
    tl_model_free(again);
    no_export = (DLManagedTensorVersioned *)&missing;
    EXPECT(tl_tensor_to_dlpack(NULL, &no_export) == TL_STATUS_INVALID_ARGUMENT && no_export == NULL);
    EXPECT(tl_model_len(NULL) == 0);
    tl_model_free(NULL);
    tl_tensor_free(NULL);
    tl_loader_free(loader);
    printf("ok %zu tensors\n", n);
    return 0;
}
