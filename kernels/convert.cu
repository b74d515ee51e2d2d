// Element type conversion on the device: bf16, f16, f32, f8 e4m3fn and f8 e5m2 into bf16,
// f16 or f32, computing what the host path computes (tensorlift::convert, which follows the
// `half` crate's software conversions; bit for bit, NaN payloads aside, which the host may
// quiet in hardware): one exact decode to f32, one rounding to the target, to nearest, ties
// to even; NaN keeps its sign and gets the quiet bit, infinities stay infinite, subnormals are
// kept where the target can hold them.
//
// Written with integer operations only and no headers, so that NVRTC compiles it with no
// toolkit installed (scripts/make-ptx.py); the PTX is committed beside it and loaded at run
// time (crates/tensorlift-cuda/src/kernels.rs). Each kernel is
//     tl_convert_<from>_<to>(const unsigned char* src, unsigned char* dst, unsigned long long n)
// over n elements, with a grid-stride loop, so any launch shape covers them all.
//
// It is also plain C: crates/tensorlift-cuda/tests/kernels_on_host.rs compiles it with the
// host's C compiler (shims for the few CUDA names, in tests/kernels/host.c) and checks every
// 16-bit and 8-bit input against the host conversion, so the arithmetic is tested without
// a GPU.

#ifndef TL_KERNEL
#define TL_KERNEL extern "C" __global__
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

// ---- Decoding to f32 (exact) ------------------------------------------------------------

__device__ __forceinline__ u32 dec_bf16(u16 h) { return ((u32)h) << 16; }

__device__ __forceinline__ u32 dec_f16(u16 i) {
    if ((i & 0x7FFFu) == 0) return ((u32)i) << 16;
    u32 sign = ((u32)(i & 0x8000u)) << 16;
    u32 exp = i & 0x7C00u;
    u32 man = i & 0x03FFu;
    if (exp == 0x7C00u) {
        if (man == 0) return sign | 0x7F800000u;
        return sign | 0x7FC00000u | (man << 13);
    }
    if (exp == 0) {
        // A subnormal: normalized by moving its leading one up to the hidden bit.
        int e = __clz((int)man) - 16 - 6;
        u32 fexp = (u32)(127 - 15 - e) << 23;
        u32 fman = (man << (14 + e)) & 0x7FFFFFu;
        return sign | fexp | fman;
    }
    u32 fexp = (u32)(((int)(exp >> 10)) - 15 + 127) << 23;
    return sign | fexp | (man << 13);
}

__device__ __forceinline__ u32 dec_e5m2(u8 b) { return dec_f16(((u16)b) << 8); }

__device__ __forceinline__ u32 dec_e4m3fn(u8 b) {
    u32 sign = ((u32)(b & 0x80u)) << 24;
    u32 exp = (b >> 3) & 0xFu;
    u32 man = b & 0x7u;
    if (exp == 0xFu && man == 0x7u) return sign | 0x7FC00000u;
    if (exp == 0) {
        if (man == 0) return sign;
        // man / 8 * 2^-6: the leading one of man becomes the hidden bit.
        int lead = 31 - __clz((int)man);  // 0, 1 or 2
        u32 fexp = (u32)(127 - 6 - 3 + lead) << 23;
        u32 fman = (man << (23 - lead)) & 0x7FFFFFu;
        return sign | fexp | fman;
    }
    return sign | ((exp - 7 + 127) << 23) | (man << 20);
}

// ---- Rounding from f32 --------------------------------------------------------------------

__device__ __forceinline__ u16 enc_bf16(u32 x) {
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((x >> 16) | 0x0040u);
    u32 round_bit = 0x00008000u;
    if ((x & round_bit) != 0 && (x & (3 * round_bit - 1)) != 0) return (u16)((x >> 16) + 1);
    return (u16)(x >> 16);
}

__device__ __forceinline__ u16 enc_f16(u32 x) {
    u32 sign = x & 0x80000000u;
    u32 exp = x & 0x7F800000u;
    u32 man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        u32 nan_bit = man == 0 ? 0 : 0x0200u;
        return (u16)((sign >> 16) | 0x7C00u | nan_bit | (man >> 13));
    }
    u32 half_sign = sign >> 16;
    int half_exp = ((int)(exp >> 23)) - 127 + 15;
    if (half_exp >= 0x1F) return (u16)(half_sign | 0x7C00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (u16)half_sign;
        u32 m = man | 0x00800000u;
        u32 half_man = m >> (14 - half_exp);
        u32 round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0 && (m & (3 * round_bit - 1)) != 0) half_man += 1;
        return (u16)(half_sign | half_man);
    }
    u32 h = half_sign | ((u32)half_exp << 10) | (man >> 13);
    u32 round_bit = 0x00001000u;
    if ((man & round_bit) != 0 && (man & (3 * round_bit - 1)) != 0) h += 1;
    return (u16)h;
}

// ---- Kernels ------------------------------------------------------------------------------

#define LOAD_bf16(p, i) dec_bf16(((const u16*)(p))[i])
#define LOAD_f16(p, i) dec_f16(((const u16*)(p))[i])
#define LOAD_f32(p, i) (((const u32*)(p))[i])
#define LOAD_f8e4m3(p, i) dec_e4m3fn(((const u8*)(p))[i])
#define LOAD_f8e5m2(p, i) dec_e5m2(((const u8*)(p))[i])

#define STORE_bf16(p, i, x) (((u16*)(p))[i] = enc_bf16(x))
#define STORE_f16(p, i, x) (((u16*)(p))[i] = enc_f16(x))
#define STORE_f32(p, i, x) (((u32*)(p))[i] = (x))

#define CONVERT(FROM, TO)                                                                       \
    TL_KERNEL void tl_convert_##FROM##_##TO(const u8* src, u8* dst, u64 n) {                   \
        u64 stride = (u64)gridDim.x * blockDim.x;                                               \
        for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {          \
            STORE_##TO(dst, i, LOAD_##FROM(src, i));                                            \
        }                                                                                       \
    }

CONVERT(bf16, f16)
CONVERT(bf16, f32)
CONVERT(f16, bf16)
CONVERT(f16, f32)
CONVERT(f32, bf16)
CONVERT(f32, f16)
CONVERT(f8e4m3, bf16)
CONVERT(f8e4m3, f16)
CONVERT(f8e4m3, f32)
CONVERT(f8e5m2, bf16)
CONVERT(f8e5m2, f16)
CONVERT(f8e5m2, f32)
