/* kernels/convert.cu as plain C on the host, for crates/tensorlift-cuda/tests/kernels_on_host.rs:
 * shims for the CUDA names it uses, one thread covering every element, and a main that
 * converts standard input to standard output:
 *     host FROM TO < elements > converted
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define __device__
#define __forceinline__ static inline
#define TL_KERNEL
static struct { unsigned int x; } gridDim = {1}, blockDim = {1}, blockIdx = {0}, threadIdx = {0};
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }

#include "../../../../kernels/convert.cu"

typedef void (*kernel)(const u8*, u8*, u64);

static const struct {
    const char* name;
    kernel k;
    int from, to;
} KERNELS[] = {
    {"bf16_f16", tl_convert_bf16_f16, 2, 2},     {"bf16_f32", tl_convert_bf16_f32, 2, 4},
    {"f16_bf16", tl_convert_f16_bf16, 2, 2},     {"f16_f32", tl_convert_f16_f32, 2, 4},
    {"f32_bf16", tl_convert_f32_bf16, 4, 2},     {"f32_f16", tl_convert_f32_f16, 4, 2},
    {"f8e4m3_bf16", tl_convert_f8e4m3_bf16, 1, 2}, {"f8e4m3_f16", tl_convert_f8e4m3_f16, 1, 2},
    {"f8e4m3_f32", tl_convert_f8e4m3_f32, 1, 4}, {"f8e5m2_bf16", tl_convert_f8e5m2_bf16, 1, 2},
    {"f8e5m2_f16", tl_convert_f8e5m2_f16, 1, 2}, {"f8e5m2_f32", tl_convert_f8e5m2_f32, 1, 4},
};

int main(int argc, char** argv) {
    if (argc != 2) return 2;
    for (size_t i = 0; i < sizeof KERNELS / sizeof KERNELS[0]; i++) {
        if (strcmp(argv[1], KERNELS[i].name) != 0) continue;
        size_t cap = 1 << 20, len = 0, r;
        u8* in = malloc(cap);
        while (in && (r = fread(in + len, 1, cap - len, stdin)) > 0) {
            len += r;
            if (len == cap) in = realloc(in, cap *= 2);
        }
        if (!in) return 3;
        u64 n = len / KERNELS[i].from;
        u8* out = malloc(n * KERNELS[i].to + 1);
        if (!out) return 3;
        KERNELS[i].k(in, out, n);
        fwrite(out, 1, n * KERNELS[i].to, stdout);
        return 0;
    }
    return 2;
}
