/* Variable-length attention over a packed batch, for the CPU: one call per layer for every sequence and head.
 *
 * q: [T, H, D], k / v: [T, KVH, D] (KVH divides H: grouped KV heads), out: [T, H, D]; rows of sequence s are
 * cu[s]..cu[s+1]-1. Each row of q, k, v, out may be a row of a wider tensor (e.g. the fused QKV projection):
 * the *_stride arguments give the elements between consecutive tokens; heads and head_dim are contiguous.
 * Elements are fp32, or bf16 (bf16 != 0) as raw 16-bit patterns.
 *
 * One task per (sequence, head), spread over the OpenMP threads (torch's own runtime: libgomp is loaded
 * once per process, by SONAME). Per task: K^T and V are unpacked once into fp32 scratch; then, R query rows
 * at a time, S = (q * scale) K^T in fp32 FMAs, a row softmax (max-subtracted, fp32 exp), O = P V, O / sum.
 * Every product and sum is fp32 (exact products of bf16 inputs), as in PyTorch's reference SDPA math: the fp32
 * path equals it to ~1e-7. A window (left, right; -1: unbounded): row i attends keys i-left..i+right of its
 * sequence; causal is (-1, 0), ModernBERT's local layers (w/2, w/2).
 *
 * Written with GCC/Clang vector types as wide as the instruction set it is built for (8 floats for AVX2, 16 for
 * AVX-512; see tokenpool/kernels/__init__.py), so the same source gives each CPU class its own code.
 */
#include <stdlib.h>

#include "simd.h"

#define CB 2 /* key column vectors per step */
#ifdef __AVX512F__
#define R 8 /* query rows per block: R x CB accumulators, 16 of the 32 vector registers */
#else
#define R 4 /* 8 of the 16 */
#endif

/* exp(x) for x <= 0, VL lanes (Cephes' expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp);
 * x < -87 gives 0. */
TP_INLINE vf exp_nonpositive(vf x) {
    const vi tiny = x < splat(-87.0f);
    vf xc = vmax(x, splat(-87.0f));
    vf n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    vf r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return (vf)((vi)(p * (vf)e) & ~tiny);
}

/* S[0..R, jb..jb+VL*nb) = Q[R, D] K^T[D, jb..] for nb (1 or CB) column blocks. */
TP_INLINE void scores(const float* qb, const float* kt, float* sb, int64_t D, int64_t lp, int64_t jb, int nb) {
    vf acc[R][CB];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < CB; c++) acc[r][c] = splat(0.0f);
    for (int64_t d = 0; d < D; d++) {
        const float* kr = kt + d * lp + jb;
        vf kv[CB];
        for (int c = 0; c < CB; c++) kv[c] = c < nb ? ld(kr + c * VL) : splat(0.0f);
        for (int r = 0; r < R; r++) {
            const vf qv = splat(qb[r * D + d]);
            for (int c = 0; c < CB; c++) acc[r][c] += qv * kv[c];
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < nb; c++) st(sb + r * lp + jb + c * VL, acc[r][c]);
}

/* The keys row i of a sequence of L attends: [lo, hi) */
TP_INLINE void key_range(int64_t i, int64_t L, int64_t left, int64_t right, int64_t* lo, int64_t* hi) {
    *lo = left < 0 || i - left < 0 ? 0 : i - left;
    *hi = right < 0 || i + right + 1 > L ? L : i + right + 1;
}

/* Softmax of one row of scores s[from..to) (whole vectors) over its keys [lo, hi): the other entries are set
 * to -inf first, so they come out as exact zeros. exp(scale * (s - max)) is written back in place (fp32), or to
 * p as bf16 when p is given. Returns 1 / the sum. */
TP_INLINE float row_softmax(float* s, int64_t from, int64_t to, int64_t lo, int64_t hi, float scale, uint16_t* p) {
    for (int64_t j = from; j < lo; j++) s[j] = -3.0e38f;
    for (int64_t j = hi; j < to; j++) s[j] = -3.0e38f;
    vf m = splat(-3.0e38f);
    for (int64_t j = from; j < to; j += VL) m = vmax(m, ld(s + j));
    const vf mx = splat(hmax(m) * scale);
    vf sum = splat(0.0f);
    for (int64_t j = from; j < to; j += VL) {
        const vf e = exp_nonpositive(ld(s + j) * scale - mx);
        sum += e;
        if (p) store_bf16(p + j, e);
        else st(s + j, e);
    }
    return 1.0f / hsum(sum);
}

static void attend_one(const void* q, const void* k, const void* v, void* out, int64_t q_stride, int64_t k_stride,
                       int64_t v_stride, int64_t o_stride, int64_t t0, int64_t L, int64_t h, int64_t kvh, int64_t D,
                       float scale, int64_t left, int64_t right, int bf16, float* kt, float* vb, float* sb,
                       float* qb) {
    const int64_t lp = (L + VL - 1) / VL * VL, nd = D / VL;
    /* K^T [D, lp] and V [L, D], in fp32 */
    for (int64_t j = 0; j < L; j++) {
        const int64_t kr = (t0 + j) * k_stride + kvh * D, vr = (t0 + j) * v_stride + kvh * D;
        for (int64_t d = 0; d < D; d += VL) {
            const vf kv = load_vec(k, kr + d, bf16);
            for (int l = 0; l < VL; l++) kt[(d + l) * lp + j] = kv[l];
            st(vb + j * D + d, load_vec(v, vr + d, bf16));
        }
    }
    for (int64_t i0 = 0; i0 < L; i0 += R) {
        const int64_t rows = L - i0 < R ? L - i0 : R;
        for (int64_t r = 0; r < R; r++)
            for (int64_t d = 0; d < D; d += VL)
                st(qb + r * D + d, r < rows ? load_vec(q, (t0 + i0 + r) * q_stride + h * D + d, bf16) * scale
                                            : splat(0.0f));
        /* the block's keys: from the first row's first to the last row's last, whole vectors */
        int64_t jlo, jhi, unused;
        key_range(i0, L, left, right, &jlo, &unused);
        key_range(i0 + rows - 1, L, left, right, &unused, &jhi);
        const int64_t jstart = jlo / VL * VL, jend = jhi;
        const int64_t jpad = (jend + VL - 1) / VL * VL;
        int64_t jb = jstart;
        for (; jb + CB * VL <= jpad; jb += CB * VL) scores(qb, kt, sb, D, lp, jb, CB);
        for (; jb < jpad; jb += VL) scores(qb, kt, sb, D, lp, jb, 1);
        /* softmax of each row over its keys: the others are set to -inf first, so every vector is full and they
         * come out as exact zeros for P V */
        float inv[R];
        for (int64_t r = 0; r < R; r++) {
            float* s = sb + r * lp;
            if (r >= rows) {
                for (int64_t j = jstart; j < jpad; j++) s[j] = 0.0f;
                inv[r] = 0.0f;
                continue;
            }
            int64_t lo, hi;
            key_range(i0 + r, L, left, right, &lo, &hi);
            inv[r] = row_softmax(s, jstart, jpad, lo, hi, 1.0f, NULL); /* q was scaled already */
        }
        /* O = P V, two head-dim vectors at a time for R rows */
        for (int64_t c0 = 0; c0 < nd; c0 += 2) {
            const int nc = nd - c0 >= 2 ? 2 : 1;
            vf acc[R][2];
            for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = splat(0.0f);
            for (int64_t j = jstart; j < jend; j++) {
                const float* vr = vb + j * D + c0 * VL;
                const vf v0 = ld(vr), v1 = nc == 2 ? ld(vr + VL) : splat(0.0f);
                for (int r = 0; r < R; r++) {
                    const vf p = splat(sb[r * lp + j]);
                    acc[r][0] += p * v0;
                    acc[r][1] += p * v1;
                }
            }
            for (int64_t r = 0; r < rows; r++) {
                const int64_t orow = (t0 + i0 + r) * o_stride + h * D + c0 * VL;
                for (int c = 0; c < nc; c++) {
                    const vf o = acc[r][c] * inv[r];
                    if (bf16) {
                        store_bf16((uint16_t*)out + orow + c * VL, o);
                    } else {
                        st((float*)out + orow + c * VL, o);
                    }
                }
            }
        }
    }
}


#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* AMX (Sapphire Rapids and later), bf16 inputs, head_dim a multiple of 32 up to 128: the two matrix products
 * on the tile unit (TDPBF16PS: bf16 pairs, fp32 accumulation), the softmax on AVX-512 in fp32 as above.
 * P is rounded to bf16 for P V, as PyTorch's bf16 flash kernel does. Tiles: 0 S / output, 1 K^T block,
 * 2..5 Q chunks then output blocks, 6 P block, 7 V block; every tile 16 rows x 64 bytes. */
#define AMX_KEYS 32 /* keys per P V step: one tile row of bf16 */
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint16_t v32h __attribute__((vector_size(64)));


#define QK_CHUNK(t, dc)                                                                                     \
    if (nd32 > dc) {                                                                                      \
        _tile_loadd(1, kp + ((int64_t)dc * (lp / 16) + jb / 16) * 256, 64);                               \
        _tile_dpbf16ps(0, t, 1);                                                                          \
    }
#define PV_BLOCK(t, g)                                                                                      \
    if (ng > g) {                                                                                         \
        _tile_loadd(7, vp + ((kc * nd16 + db0 + g) * 16) * 32, 64);                                       \
        _tile_dpbf16ps(t, 6, 7);                                                                          \
    }

static void attend_one_amx(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, int64_t q_stride,
                           int64_t k_stride, int64_t v_stride, int64_t o_stride, int64_t t0, int64_t L, int64_t h,
                           int64_t kvh, int64_t D, float scale, int64_t left, int64_t right, uint32_t* kp,
                           uint16_t* vp, uint16_t* qa,
                           float* sb, uint16_t* pb, float* ob) {
    const int64_t lp = (L + AMX_KEYS - 1) / AMX_KEYS * AMX_KEYS, nd32 = D / 32, nd16 = D / 16;
    /* K^T as VNNI blocks [D/32][lp/16][16 d-pairs][16 keys] of bf16 pairs (32 bits): each block is the
     * transpose of 16 keys x 16 pairs, written contiguously */
    for (int64_t jb = 0; jb < lp; jb += 16) {
        const int64_t n = L - jb < 16 ? (L > jb ? L - jb : 0) : 16;
        for (int64_t dc = 0; dc < nd32; dc++) {
            uint32_t* dst = kp + (dc * (lp / 16) + jb / 16) * 256;
            for (int64_t pr = 0; pr < 16; pr++) {
                const uint32_t* src = (const uint32_t*)(k + (t0 + jb) * k_stride + kvh * D) + dc * 16 + pr;
                for (int64_t jj = 0; jj < 16; jj++) dst[pr * 16 + jj] = jj < n ? src[jj * (k_stride / 2)] : 0u;
            }
        }
    }
    /* V as VNNI blocks [lp/32][D/16][16 key-pairs][16 dims][2 keys]: two key rows interleaved */
    for (int64_t j = 0; j < lp; j += 2) {
        const int64_t kc = j / AMX_KEYS, pr = (j % AMX_KEYS) / 2;
        const uint16_t* v0 = v + (t0 + j) * v_stride + kvh * D;
        const uint16_t* v1 = v0 + v_stride;
        for (int64_t db = 0; db < nd16; db++) {
            v16h a = {0}, b = {0};
            if (j < L) memcpy(&a, v0 + db * 16, 32);
            if (j + 1 < L) memcpy(&b, v1 + db * 16, 32);
            const v32h pair = __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8,
                                                      24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            memcpy(vp + ((kc * nd16 + db) * 16 + pr) * 32, &pair, 64);
        }
    }
    for (int64_t i0 = 0; i0 < L; i0 += 16) {
        const int64_t rows = L - i0 < 16 ? L - i0 : 16;
        /* Q rows: straight from the input (row stride q_stride); a last partial block is copied and
         * zero-padded (the rows past it may be past the tensor) */
        const uint16_t* qsrc = q + (t0 + i0) * q_stride + h * D;
        int64_t qstride = q_stride * 2;
        if (rows < 16) {
            for (int64_t r = 0; r < 16; r++)
                for (int64_t d = 0; d < D; d += 32) {
                    v32h row = {0};
                    if (r < rows) memcpy(&row, qsrc + r * q_stride + d, 64);
                    memcpy(qa + r * D + d, &row, 64);
                }
            qsrc = qa;
            qstride = D * 2;
        }
        int64_t jlo, jhi, unused;
        key_range(i0, L, left, right, &jlo, &unused);
        key_range(i0 + rows - 1, L, left, right, &unused, &jhi);
        const int64_t jstart = jlo / AMX_KEYS * AMX_KEYS, jend = jhi;
        const int64_t j16 = (jend + 15) / 16 * 16, j32 = (jend + AMX_KEYS - 1) / AMX_KEYS * AMX_KEYS;
        if (nd32 > 0) _tile_loadd(2, qsrc, qstride);
        if (nd32 > 1) _tile_loadd(3, qsrc + 32, qstride);
        if (nd32 > 2) _tile_loadd(4, qsrc + 64, qstride);
        if (nd32 > 3) _tile_loadd(5, qsrc + 96, qstride);
        for (int64_t jb = jstart; jb < j16; jb += 16) { /* S[16, jb..jb+16) */
            _tile_zero(0);
            QK_CHUNK(2, 0)
            QK_CHUNK(3, 1)
            QK_CHUNK(4, 2)
            QK_CHUNK(5, 3)
            _tile_stored(0, sb + jb, lp * 4);
        }
        float inv[16];
        for (int64_t r = 0; r < 16; r++) { /* scaled softmax per row -> P (bf16, zeros past the row's keys) */
            float* srow = sb + r * lp;
            uint16_t* prow = pb + r * lp;
            if (r >= rows) {
                memset(prow + jstart, 0, (j32 - jstart) * 2);
                inv[r] = 0.0f;
                continue;
            }
            int64_t lo, hi;
            key_range(i0 + r, L, left, right, &lo, &hi);
            inv[r] = row_softmax(srow, jstart, j16, lo, hi, scale, prow);
            for (int64_t j = j16; j < j32; j++) prow[j] = 0;
        }
        for (int64_t db0 = 0; db0 < nd16; db0 += 4) { /* O[16, 64 dims at a time] = P V */
            const int64_t ng = nd16 - db0 < 4 ? nd16 - db0 : 4;
            _tile_zero(2);
            _tile_zero(3);
            _tile_zero(4);
            _tile_zero(5);
            for (int64_t kc = jstart / AMX_KEYS; kc < j32 / AMX_KEYS; kc++) {
                _tile_loadd(6, pb + kc * AMX_KEYS, lp * 2);
                PV_BLOCK(2, 0)
                PV_BLOCK(3, 1)
                PV_BLOCK(4, 2)
                PV_BLOCK(5, 3)
            }
            if (ng > 0) _tile_stored(2, ob + db0 * 16, D * 4);
            if (ng > 1) _tile_stored(3, ob + db0 * 16 + 16, D * 4);
            if (ng > 2) _tile_stored(4, ob + db0 * 16 + 32, D * 4);
            if (ng > 3) _tile_stored(5, ob + db0 * 16 + 48, D * 4);
        }
        for (int64_t r = 0; r < rows; r++) {
            uint16_t* orow = out + (t0 + i0 + r) * o_stride + h * D;
            for (int64_t d = 0; d < D; d += VL) store_bf16(orow + d, ld(ob + r * D + d) * inv[r]);
        }
    }
}
#endif

#if defined(__AVX512F__) && !(defined(__AMX_TILE__) && defined(__AMX_BF16__)) && \
    (defined(__clang__) || __GNUC__ >= 10)
/* AVX512-BF16 (avx512 build; called with bf16 == 2 only, when the caller saw avx512_bf16 in the CPU's flags: AMD
 * Zen 4 / Zen 5, Intel Cooper Lake): both products with VDPBF16PS over pairs, bf16 products exact in fp32, fp32
 * sums. S = Q K^T over dimension pairs (K's rows read as 32-bit pairs as they are stored; q unscaled, the scale
 * applied in the softmax), P rounded to bf16 as on AMX, O = P V over key pairs (V interleaved by key pairs). */
#define HAVE_DPBF16 1
#include <immintrin.h>
#define DP_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

/* S[0..R, jb..jb+16 nb) over dimension pairs: qw [R][D/2], kw [D/2][lp] */
DP_TARGET static void dp_scores(const uint32_t* qw, const uint32_t* kw, float* sb, int64_t D, int64_t lp, int64_t jb,
                                int nb) {
    __m512 acc[R][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < D / 2; p++) {
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kw + p * lp + jb);
        const __m512bh k1 = nb > 1 ? (__m512bh)_mm512_loadu_si512(kw + p * lp + jb + 16) : (__m512bh)_mm512_setzero_si512();
        for (int r = 0; r < R; r++) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)qw[r * (D / 2) + p]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], k0, b);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], k1, b);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(sb + r * lp + jb, acc[r][0]);
        if (nb > 1) _mm512_storeu_ps(sb + r * lp + jb + 16, acc[r][1]);
    }
}

DP_TARGET static void attend_one_dp(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out,
                                    int64_t q_stride, int64_t k_stride, int64_t v_stride, int64_t o_stride, int64_t t0,
                                    int64_t L, int64_t h, int64_t kvh, int64_t D, float scale, int64_t left,
                                    int64_t right, uint32_t* kw, uint32_t* vw, float* sb, uint16_t* pb, uint32_t* qw) {
    const int64_t lp = (L + 31) / 32 * 32, half = D / 2, nd = D / 16;
    /* K as dimension pairs [D/2][lp] (keys past L: zeros), V as key pairs [lp/2][D] (the same) */
    for (int64_t j = 0; j < lp; j++) {
        const uint16_t* kr = k + (t0 + (j < L ? j : 0)) * k_stride + kvh * D;
        for (int64_t p = 0; p < half; p++) {
            uint32_t w = 0;
            if (j < L) memcpy(&w, kr + 2 * p, 4);
            kw[p * lp + j] = w;
        }
    }
    for (int64_t jp = 0; jp < lp / 2; jp++) {
        const int64_t j = 2 * jp;
        const uint16_t* v0 = v + (t0 + j) * v_stride + kvh * D;
        const uint16_t* v1 = v + (t0 + j + 1) * v_stride + kvh * D;
        for (int64_t d = 0; d < D; d++)
            vw[jp * D + d] = (j < L ? v0[d] : 0u) | (uint32_t)(j + 1 < L ? v1[d] : 0u) << 16;
    }
    for (int64_t i0 = 0; i0 < L; i0 += R) {
        const int64_t rows = L - i0 < R ? L - i0 : R;
        for (int64_t r = 0; r < R; r++) {
            memcpy(qw + r * half, q + (t0 + i0 + (r < rows ? r : 0)) * q_stride + h * D, (size_t)D * 2);
        }
        int64_t jlo, jhi, unused;
        key_range(i0, L, left, right, &jlo, &unused);
        key_range(i0 + rows - 1, L, left, right, &unused, &jhi);
        const int64_t jstart = jlo / 32 * 32, jpad = (jhi + 15) / 16 * 16;
        int64_t jb = jstart;
        for (; jb + 32 <= jpad; jb += 32) dp_scores(qw, kw, sb, D, lp, jb, 2);
        for (; jb < jpad; jb += 16) dp_scores(qw, kw, sb, D, lp, jb, 1);
        float inv[R];
        for (int64_t r = 0; r < R; r++) {
            float* s = sb + r * lp;
            uint16_t* p = pb + r * lp;
            if (r >= rows) {
                for (int64_t j = jstart; j < jpad; j++) p[j] = 0;
                inv[r] = 0.0f;
            } else {
                int64_t lo, hi;
                key_range(i0 + r, L, left, right, &lo, &hi);
                inv[r] = row_softmax(s, jstart, jpad, lo, hi, scale, p);
            }
        }
        /* O = P V over key pairs, two head-dim vectors at a time */
        const int64_t jp0 = jstart / 2, jp1 = (jpad + 1) / 2;
        for (int64_t c0 = 0; c0 < nd; c0 += 2) {
            const int nc = nd - c0 >= 2 ? 2 : 1;
            __m512 acc[R][2];
            for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
            for (int64_t jp = jp0; jp < jp1; jp++) {
                const uint32_t* vr = vw + jp * D + c0 * 16;
                const __m512bh a0 = (__m512bh)_mm512_loadu_si512(vr);
                const __m512bh a1 = nc == 2 ? (__m512bh)_mm512_loadu_si512(vr + 16) : (__m512bh)_mm512_setzero_si512();
                for (int r = 0; r < R; r++) {
                    uint32_t pw;
                    memcpy(&pw, pb + r * lp + 2 * jp, 4);
                    const __m512bh b = (__m512bh)_mm512_set1_epi32((int)pw);
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a0, b);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a1, b);
                }
            }
            for (int64_t r = 0; r < rows; r++) {
                uint16_t* orow = out + (t0 + i0 + r) * o_stride + h * D + c0 * 16;
                for (int c = 0; c < nc; c++) store_bf16(orow + c * 16, (vf)acc[r][c] * inv[r]);
            }
        }
    }
}
#endif

int tp_varlen_attention(const void* q, const void* k, const void* v, void* out, int64_t q_stride, int64_t k_stride,
                        int64_t v_stride, int64_t o_stride, const int32_t* cu, int64_t num_seqs, int64_t heads,
                        int64_t kv_heads, int64_t head_dim, float scale, int64_t window_left, int64_t window_right,
                        int bf16, int num_threads) {
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || head_dim <= 0 || head_dim % VL != 0) return 1;
    int64_t max_len = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        const int64_t n = (int64_t)cu[s + 1] - cu[s];
        if (n < 0) return 2;
        max_len = n > max_len ? n : max_len;
    }
    const int64_t lp = (max_len + VL - 1) / VL * VL, D = head_dim, group = heads / kv_heads;
    const int64_t tasks = num_seqs * heads;
    int failed = 0;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (bf16 && D % 32 == 0 && D <= 128 && amx_ready()) {
        const int64_t lp32 = (max_len + AMX_KEYS - 1) / AMX_KEYS * AMX_KEYS;
#pragma omp parallel num_threads(num_threads)
        {
            uint32_t* kp = aligned_alloc(64, (size_t)(D * lp32 * 2 + 64) / 64 * 64);
            uint16_t* vp = aligned_alloc(64, (size_t)(D * lp32 * 2 + 64) / 64 * 64);
            uint16_t* qa = aligned_alloc(64, (size_t)(16 * D * 2 + 64) / 64 * 64);
            float* sb = aligned_alloc(64, (size_t)(16 * lp32 * 4 + 64) / 64 * 64);
            uint16_t* pb = aligned_alloc(64, (size_t)(16 * lp32 * 2 + 64) / 64 * 64);
            float* ob = aligned_alloc(64, (size_t)(16 * D * 4 + 64) / 64 * 64);
            if (!kp || !vp || !qa || !sb || !pb || !ob) {
#pragma omp atomic write
                failed = 3;
            }
#pragma omp barrier
            if (!failed) {
                amx_configure();
#pragma omp for schedule(dynamic, 1)
                for (int64_t task = 0; task < tasks; task++) {
                    const int64_t s = task / heads, h = task % heads;
                    const int64_t t0 = cu[s], L = (int64_t)cu[s + 1] - cu[s];
                    if (L > 0)
                        attend_one_amx(q, k, v, out, q_stride, k_stride, v_stride, o_stride, t0, L, h, h / group, D,
                                       scale, window_left, window_right, kp, vp, qa, sb, pb, ob);
                }
                _tile_release();
            }
            free(kp);
            free(vp);
            free(qa);
            free(sb);
            free(pb);
            free(ob);
        }
        return failed;
    }
#endif
    int use_dp = 0; /* bf16 == 2: the AVX512-BF16 path, where this build has it (else the fp32-FMA one) */
#ifdef HAVE_DPBF16
    use_dp = bf16 == 2;
#endif
    if (bf16 == 2) bf16 = 1;
    const int64_t lpa = use_dp ? (max_len + 31) / 32 * 32 : lp;
#pragma omp parallel num_threads(num_threads)
    {
        /* per thread: K^T (fp32; or dimension pairs), V (fp32; or key pairs), scores, the query block (fp32; or
         * pairs), P (bf16, the AVX512-BF16 path only); each sized for the fp32 layout, which is the larger */
        void* kt = aligned_alloc(64, (size_t)((D * lpa * 4 + 63) / 64 * 64) + 64);
        void* vb = aligned_alloc(64, (size_t)((lpa * D * 4 + 63) / 64 * 64) + 64);
        float* sb = aligned_alloc(64, (size_t)((R * lpa * 4 + 63) / 64 * 64) + 64);
        void* qb = aligned_alloc(64, (size_t)((R * D * 4 + 63) / 64 * 64) + 64);
        uint16_t* pb = use_dp ? aligned_alloc(64, (size_t)((R * lpa * 2 + 63) / 64 * 64) + 64) : NULL;
        if (!kt || !vb || !sb || !qb || (use_dp && !pb)) {
#pragma omp atomic write
            failed = 3;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < tasks; task++) {
                const int64_t s = task / heads, h = task % heads;
                const int64_t t0 = cu[s], L = (int64_t)cu[s + 1] - cu[s];
                if (L <= 0) continue;
#ifdef HAVE_DPBF16
                if (use_dp) {
                    attend_one_dp(q, k, v, out, q_stride, k_stride, v_stride, o_stride, t0, L, h, h / group, D,
                                  scale, window_left, window_right, kt, vb, sb, pb, qb);
                    continue;
                }
#endif
                attend_one(q, k, v, out, q_stride, k_stride, v_stride, o_stride, t0, L, h, h / group, D, scale,
                           window_left, window_right, bf16, kt, vb, sb, qb);
            }
        }
        free(kt);
        free(vb);
        free(sb);
        free(qb);
        free(pb);
    }
    return failed;
}
