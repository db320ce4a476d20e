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
TP_INLINE float hmax(vf x) {
    float m = x[0];
    for (int l = 1; l < VL; l++) m = x[l] > m ? x[l] : m;
    return m;
}
TP_INLINE float hsum(vf x) {
    float s = 0.0f;
    for (int l = 0; l < VL; l++) s += x[l];
    return s;
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

TP_INLINE void store_bf16(uint16_t* dst, vf x) {
    for (int l = 0; l < VL; l++) dst[l] = f32_to_bf16(x[l]);
}
#endif
