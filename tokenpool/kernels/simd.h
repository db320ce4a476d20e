/* Vector types as wide as the instruction set the file is built for (8 floats for AVX2, 16 for AVX-512; see
 * tokenpool/kernels/__init__.py), and the fp32 <-> bf16 conversions torch uses, for tokenpool's C kernels. */
#ifndef TP_SIMD_H
#define TP_SIMD_H
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#define VL 16 /* floats per vector register */
#else
#define VL 8
#endif

#define TP_INLINE static inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2), aligned(2)));

TP_INLINE vf ld(const float* p) { return *(const vfu*)p; }
TP_INLINE void st(float* p, vf x) { *(vfu*)p = x; }
TP_INLINE vf splat(float x) { return x - (vf){0}; } /* a broadcast */
TP_INLINE vf vmax(vf a, vf b) {
    vi m = a > b;
    return (vf)(((vi)a & m) | ((vi)b & ~m));
}
/* horizontal max / sum: halve the vector with shuffles (log2(VL) steps, no scalar loop) */
#if VL == 16
#define TP_HALVES(op, x)                                                                                    \
    x = op(x, __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));        \
    x = op(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));        \
    x = op(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));        \
    x = op(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
#else
#define TP_HALVES(op, x)                                                                                    \
    x = op(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3));                                      \
    x = op(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5));                                      \
    x = op(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6));
#endif
TP_INLINE vf vadd(vf a, vf b) { return a + b; }
TP_INLINE float hmax(vf x) {
    TP_HALVES(vmax, x)
    return x[0];
}
TP_INLINE float hsum(vf x) {
    TP_HALVES(vadd, x)
    return x[0];
}

TP_INLINE float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

TP_INLINE uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* VL bf16 values -> floats (each bf16 is the high half of its float's bits) */
TP_INLINE vf bf16_vec(const uint16_t* p) { return (vf)(__builtin_convertvector(*(const vh*)p, vi) << 16); }

/* VL elements at base[index..] as floats, from fp32 or bf16 storage */
TP_INLINE vf load_vec(const void* base, int64_t index, int bf16) {
    return bf16 ? bf16_vec((const uint16_t*)base + index) : ld((const float*)base + index);
}

/* VL floats -> bf16, rounded to nearest even as f32_to_bf16 (NaN -> 0x7fc0), in vector registers; one
 * instruction where the build has AVX512-BF16 (the AMX build) */
#if defined(__AVX512BF16__) && VL == 16
#include <immintrin.h>
TP_INLINE void store_bf16(uint16_t* dst, vf x) {
    const __m256bh h = _mm512_cvtneps_pbh((__m512)x);
    memcpy(dst, &h, sizeof h);
}
#else
TP_INLINE void store_bf16(uint16_t* dst, vf x) {
    const vi u = (vi)x;
    const vi nan = (u & 0x7fffffff) > 0x7f800000;
    const vi r = (vi)(((u + 0x7fff + ((u >> 16) & 1)) >> 16) & 0xffff);
    const vh h = __builtin_convertvector((r & ~nan) | (0x7fc0 & nan), vh);
    memcpy(dst, &h, sizeof h);
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* The tile unit (AMX build): every tile 16 rows x 64 bytes, configured once per thread. */
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static int amx_ready(void) { /* Linux hands out the tile state only on request (once per process) */
    static int state = 0;
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
    return state == 1;
}

static void amx_configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}
#endif
#endif
