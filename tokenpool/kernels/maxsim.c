/* MaxSim of stacked queries against stored token matrices, for the CPU (tokenpool/index/multivector.py).
 *
 * queries: [rows, D] fp32, row r belongs to query row_query[r] (0..n_queries-1). The documents: those of
 * n_segments segments of one codec laid end to end; segment s has codes[s] [tokens, D] as fp32 (kind 0), fp16
 * (kind 1) or int8 (kind 2: x = code * row_scales[s][token] * dim_scales[d]), its document i is rows
 * offsets[s][i]..offsets[s][i+1]-1, and first[s] documents come before it (docs, when given, selects the
 * documents scored by position in that order: out row j is document docs[j]).
 * out: [n_docs, n_queries], out[j, q] = sum over q's rows of the max over the document's tokens of the dot
 * product (a document with no tokens: 0; the caller never stores one).
 *
 * Two paths, chosen by the caller:
 * - fp32 (every build): each document's tokens are decoded once into fp32 scratch, then every block of RB
 *   query rows runs an outer product over the dimensions: for each dimension, RB/VL query vectors (the queries
 *   stored transposed, so no horizontal sums) times TJ broadcast token values, TJ x RB/VL accumulators, then a
 *   running max per query row. Exact fp32 products (the sums' rounding order differs from a GEMM's: ~1e-7).
 * - bf16 on AMX (amx build only, D a multiple of 32): tokens decoded to bf16, queries packed once into the tile
 *   unit's pair layout, [16 tokens x 16 query rows] score tiles accumulated over D/32 chunks (TDPBF16PS: bf16
 *   products, fp32 sums), up to 4 row blocks per token tile. Each product carries the bf16 rounding of both
 *   sides: |error of a dot product| <= 2^-8 |q| |x| (1 + 2^-7); the caller rescores with the fp32 path every
 *   document that this bound lets into the top k, so search results stay exact.
 * - bf16 with AVX512-BF16 (avx512 build, a function compiled for that extension, called only when the caller
 *   saw avx512_bf16 in the CPU's flags: AMD Zen 4 / Zen 5, Intel Cooper Lake; D a multiple of 32): the fp32
 *   path's outer product with dimension pairs: VDPBF16PS multiplies a vector of 16 query rows' (d, d+1) bf16
 *   pairs by one token's broadcast pair, fp32 sums: half the instructions of the fp32 path, the same bound as
 *   the AMX path (both sides rounded to bf16). Every code kind is converted to bf16 in registers, 8 tokens at a
 *   time just before their products.
 *
 * One OpenMP task per chunk of DOC_CHUNK documents (dynamic schedule) over every segment in one parallel region,
 * torch's OpenMP runtime (see tokenpool/kernels/__init__.py).
 */
#include <stdlib.h>

#include "simd.h"
#ifdef __F16C__
#include <immintrin.h>
#endif

#define TJ 4 /* tokens per step of the fp32 path */
#define NV 2 /* query-row vectors per block: RB = NV * VL rows */
#define RB (NV * VL)
#define DOC_CHUNK 16 /* documents per scheduling chunk */

TP_INLINE float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0) bits = sign;
    else { /* subnormal: normalize */
        int e = -1;
        uint32_t m = man;
        do { e++; m <<= 1; } while (!(m & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#ifdef __F16C__
/* VL fp16 values -> floats (the F16C conversion, 8 or 16 lanes as the build) */
TP_INLINE vf half_vec(const uint16_t* p) {
#if VL == 16
    __m256i v;
    memcpy(&v, p, 32);
    return (vf)_mm512_cvtph_ps(v);
#else
    __m128i v;
    memcpy(&v, p, 16);
    return (vf)_mm256_cvtph_ps(v);
#endif
}
#endif

/* tokens t0..t1 of the codes as fp32 rows of x ([t1 - t0, D]) */
static void decode_rows(const void* codes, int kind, const float* row_scales, const float* dim_scales, int64_t D,
                        int64_t t0, int64_t t1, float* x) {
    for (int64_t t = t0; t < t1; t++) {
        float* row = x + (t - t0) * D;
        if (kind == 0) {
            memcpy(row, (const float*)codes + t * D, D * sizeof(float));
        } else if (kind == 1) {
            const uint16_t* h = (const uint16_t*)codes + t * D;
#ifdef __F16C__
            for (int64_t d = 0; d + VL <= D; d += VL) st(row + d, half_vec(h + d));
            for (int64_t d = D / VL * VL; d < D; d++) row[d] = half_to_float(h[d]);
#else
            for (int64_t d = 0; d < D; d++) row[d] = half_to_float(h[d]);
#endif
        } else {
            const int8_t* c = (const int8_t*)codes + t * D;
            const float s = row_scales[t];
            for (int64_t d = 0; d < D; d++) row[d] = (float)c[d] * s * dim_scales[d];
        }
    }
}

/* fp32 path: row maxima of one document (n tokens in x) for the RB rows of qt at column rb: m[RB] */
static void row_block_max(const float* qt, int64_t rp, int64_t D, const float* x, int64_t n, int64_t rb, float* m) {
    vf best[NV];
    for (int v = 0; v < NV; v++) best[v] = splat(-3.0e38f);
    for (int64_t j = 0; j < n; j += TJ) {
        const int tj = n - j < TJ ? (int)(n - j) : TJ;
        vf acc[TJ][NV];
        for (int t = 0; t < TJ; t++)
            for (int v = 0; v < NV; v++) acc[t][v] = splat(0.0f);
        const float* xj = x + j * D;
        for (int64_t d = 0; d < D; d++) {
            vf qv[NV];
            for (int v = 0; v < NV; v++) qv[v] = ld(qt + d * rp + rb + v * VL);
            for (int t = 0; t < TJ; t++) {
                const vf b = splat(xj[(t < tj ? t : 0) * D + d]);
                for (int v = 0; v < NV; v++) acc[t][v] += qv[v] * b;
            }
        }
        for (int t = 0; t < tj; t++)
            for (int v = 0; v < NV; v++) best[v] = vmax(best[v], acc[t][v]);
    }
    for (int v = 0; v < NV; v++) st(m + v * VL, best[v]);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

/* Tiles: 0..3 scores of up to 4 blocks of 16 query rows, 4 the token tile, 5 a query-row block. */
#define DOT_BLOCK(t)                                                                                        \
    if (nb > t) {                                                                                         \
        _tile_loadd(5, qp + ((c * nrb + rb0 + t) * 16) * 32, 64);                                         \
        _tile_dpbf16ps(t, 4, 5);                                                                          \
    }
#define STORE_BLOCK(t)                                                                                      \
    if (nb > t) _tile_stored(t, cs + t * 256, 64);

/* scratch for a document's bf16 rows inside `base` (4 KB of slack): at the address bits 11:0 of its source, so
 * that no load of the conversion can wait on an earlier store of it to the same bits 11:0 (4K aliasing). A
 * precaution: on one AMX host a copy of the old scheme with its own scratch ran 1.4-2x slower than the kernel,
 * on another not, and placing the scratch so measured no difference there (bench/NOTES.md); it costs nothing. */
static inline uint16_t* scratch_for(uint16_t* base, const void* src) {
    const uintptr_t b = (uintptr_t)base, want = (uintptr_t)src & 4095 & ~(uintptr_t)63;
    return (uint16_t*)(b + ((want - b) & 4095));
}

/* One document's values e0..e0+cnt-1 (cnt a multiple of 16, D % 16 == 0) of the codes from token t0 -> bf16 in dst,
 * rounded to nearest even from the fp32 values decode_rows gives (int8: code * row scale * dimension scale, in
 * that order), so the fp32 rescoring and the bf16 bound see the same x. */
static inline void codes_to_bf16(uint16_t* dst, const void* codes, int kind, const float* row_scales,
                                 const float* dim_scales, int64_t D, int64_t t0, int64_t e0, int64_t cnt) {
    const int width = kind == 0 ? 4 : kind == 1 ? 2 : 1;
    const char* src = (const char*)codes + t0 * D * width;
    for (int64_t e = e0; e < e0 + cnt; e += 16) {
        /* 8 KB ahead: one stream per thread does not keep enough loads in flight alone */
        if ((e * width & 63) == 0) __builtin_prefetch(src + e * width + 8192, 0, 2);
        vf v;
        if (kind == 0) {
            v = ld((const float*)src + e);
        } else if (kind == 1) {
            v = half_vec((const uint16_t*)src + e);
        } else {
            __m128i c;
            memcpy(&c, src + e, 16);
            v = (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)) * row_scales[t0 + e / D] * ld(dim_scales + e % D);
        }
        store_bf16(dst + e, v);
    }
}

/* bf16 path, one document: row maxima m[rp] (rp a multiple of 16). xb: the document's tokens as bf16 rows,
 * zero-padded to a multiple of 16 tokens; qp: queries packed [D/32][rp/16][16 pairs][16 rows][2].
 * nx: the next document's conversion (nn tokens from token nt0 of codes nc of the call's kind), a slice after each
 * step's tile products, so the vector units convert while the tile unit multiplies (a whole-document pass before
 * the tiles left each unit idle half the time: bench/NOTES.md); nn = 0: none. */
static void doc_max_amx(const uint16_t* qp, int64_t rp, int64_t D, const uint16_t* xb, int64_t n, float* m,
                        float* cs, uint16_t* nx, const void* ncodes, int kind, const float* row_scales,
                        const float* dim_scales, int64_t nt0, int64_t nn) {
    const int64_t nrb = rp / 16, nc = D / 32;
    const int64_t steps = (n + 15) / 16 * nc * ((nrb + 3) / 4), total = nn * D;
    const int64_t slice = (total / 16 + steps - 1) / steps * 16; /* values converted per step */
    int64_t done = 0;
    for (int64_t r = 0; r < rp; r++) m[r] = -3.0e38f;
    for (int64_t rb0 = 0; rb0 < nrb; rb0 += 4) {
        const int nb = nrb - rb0 < 4 ? (int)(nrb - rb0) : 4;
        for (int64_t j = 0; j < n; j += 16) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t c = 0; c < nc; c++) {
                _tile_loadd(4, xb + j * D + c * 32, D * 2);
                DOT_BLOCK(0)
                DOT_BLOCK(1)
                DOT_BLOCK(2)
                DOT_BLOCK(3)
                if (done < total) {
                    const int64_t cnt = total - done < slice ? total - done : slice;
                    codes_to_bf16(nx, ncodes, kind, row_scales, dim_scales, D, nt0, done, cnt);
                    done += cnt;
                }
            }
            STORE_BLOCK(0)
            STORE_BLOCK(1)
            STORE_BLOCK(2)
            STORE_BLOCK(3)
            const int64_t valid = n - j < 16 ? n - j : 16;
            for (int b = 0; b < nb; b++) {
                vf best = ld(m + (rb0 + b) * 16);
                for (int64_t t = 0; t < valid; t++) best = vmax(best, ld(cs + b * 256 + t * 16));
                st(m + (rb0 + b) * 16, best);
            }
        }
    }
    if (done < total) codes_to_bf16(nx, ncodes, kind, row_scales, dim_scales, D, nt0, done, total - done);
}
#endif

#if defined(__AVX512F__) && !(defined(__AMX_TILE__) && defined(__AMX_BF16__)) && \
    (defined(__clang__) || __GNUC__ >= 10)
#define HAVE_DPBF16 1
#define TJB 8 /* tokens per step of the AVX512-BF16 path: 16 accumulators (measured ~5% faster than 6 on Zen 4) */
#define DP_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16,f16c")))

/* tokens t..t+cnt-1 of the codes -> bf16 rows of out ([cnt, D], D a multiple of 32), rounded to nearest even as
 * f32_to_bf16 from the fp32 values decode_rows gives (int8: code * row scale * dimension scale, in that order),
 * so the fp32 rescoring and the bf16 bound see the same x */
DP_TARGET static inline void tokens_to_bf16(const void* codes, int kind, const float* row_scales,
                                            const float* dim_scales, int64_t D, int64_t t, int64_t cnt,
                                            uint16_t* out) {
    if (kind == 0) {
        const float* x = (const float*)codes + t * D;
        for (int64_t e = 0; e < cnt * D; e += 32)
            _mm512_storeu_si512(out + e, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + e + 16),
                                                                      _mm512_loadu_ps(x + e)));
    } else if (kind == 1) {
        const uint16_t* h = (const uint16_t*)codes + t * D;
        for (int64_t e = 0; e < cnt * D; e += 32) {
            const __m512 lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + e)));
            const __m512 hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + e + 16)));
            _mm512_storeu_si512(out + e, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    } else {
        for (int64_t k = 0; k < cnt; k++) {
            const int8_t* c = (const int8_t*)codes + (t + k) * D;
            const __m512 s = _mm512_set1_ps(row_scales[t + k]);
            for (int64_t d = 0; d < D; d += 32) {
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(c + d))));
                const __m512 hi =
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(c + d + 16))));
                _mm512_storeu_si512(out + k * D + d,
                                    (__m512i)_mm512_cvtne2ps_pbh(
                                        _mm512_mul_ps(_mm512_mul_ps(hi, s), _mm512_loadu_ps(dim_scales + d + 16)),
                                        _mm512_mul_ps(_mm512_mul_ps(lo, s), _mm512_loadu_ps(dim_scales + d))));
            }
        }
    }
}

/* AVX512-BF16 path, one document (tokens t0..t0+n-1 of the codes): row maxima m[rp] (rp a multiple of 32).
 * qp: queries as bf16 pairs [D/2][rp] (the low half the even dimension). The tokens are converted TJB at a time
 * into xb ([TJB, D] bf16, in L1) just before their products, so the conversion overlaps the arithmetic (a
 * whole-document pass first measured ~20% of the kernel's time with one query).
 * `next`: the codes of a document this thread scores soon, fetched into L2 a little per step while this one
 * computes (otherwise its first reads wait on DRAM with the arithmetic waiting on them); 128 bytes a step cover
 * a same-length fp32 document in half the steps. */
DP_TARGET static void doc_max_dpbf16(const uint32_t* qp, int64_t rp, int64_t D, const void* codes, int kind,
                                     const float* row_scales, const float* dim_scales, int64_t t0, int64_t n,
                                     float* m, uint16_t* xb, const char* next, int64_t next_bytes) {
    int64_t ahead = 0;
    const int64_t np = D / 2;
    const uint32_t* xw = (const uint32_t*)xb;
    for (int64_t r = 0; r < rp; r++) m[r] = -3.0e38f;
    for (int64_t j = 0; j < n; j += TJB) {
        const int tj = n - j < TJB ? (int)(n - j) : TJB;
        tokens_to_bf16(codes, kind, row_scales, dim_scales, D, t0 + j, tj, xb);
        for (int64_t rb = 0; rb < rp; rb += 32) {
            __m512 acc0[TJB], acc1[TJB];
            for (int t = 0; t < TJB; t++) acc0[t] = acc1[t] = _mm512_setzero_ps();
            for (int64_t p = 0; p < np; p++) {
                if (ahead < next_bytes) {
                    __builtin_prefetch(next + ahead, 0, 2);
                    __builtin_prefetch(next + ahead + 64, 0, 2);
                    ahead += 128;
                }
                const __m512bh q0 = (__m512bh)_mm512_loadu_si512(qp + p * rp + rb);
                const __m512bh q1 = (__m512bh)_mm512_loadu_si512(qp + p * rp + rb + 16);
                for (int t = 0; t < TJB; t++) {
                    const __m512bh b = (__m512bh)_mm512_set1_epi32((int)xw[(t < tj ? t : 0) * np + p]);
                    acc0[t] = _mm512_dpbf16_ps(acc0[t], q0, b);
                    acc1[t] = _mm512_dpbf16_ps(acc1[t], q1, b);
                }
            }
            __m512 best0 = _mm512_loadu_ps(m + rb), best1 = _mm512_loadu_ps(m + rb + 16);
            for (int t = 0; t < tj; t++) {
                best0 = _mm512_max_ps(best0, acc0[t]);
                best1 = _mm512_max_ps(best1, acc1[t]);
            }
            _mm512_storeu_ps(m + rb, best0);
            _mm512_storeu_ps(m + rb + 16, best1);
        }
    }
}
#endif

/* The documents scored by one call: those of n_segments segments in order (first[s] = the documents before
 * segment s), all of them or the selection `docs` (positions in that order). */
typedef struct {
    int64_t n_segments;
    const void* const* codes;
    const float* const* row_scales;
    const int64_t* const* offsets;
    const int64_t* first; /* [n_segments + 1] */
    const int64_t* docs;  /* NULL: every document */
} doc_set;

/* document j of the set: its segment and position there */
static inline void locate(const doc_set* set, int64_t j, int64_t* s, int64_t* i) {
    const int64_t g = set->docs ? set->docs[j] : j;
    int64_t lo = 0, hi = set->n_segments - 1; /* the last segment whose first document is <= g */
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (set->first[mid] <= g) lo = mid;
        else hi = mid - 1;
    }
    *s = lo;
    *i = g - set->first[lo];
}

/* All segments in one parallel region: one call per segment left the threads idle at each segment's end and
 * paid a fork and join each. n_docs: the number of positions in docs (ignored without docs). */
int tp_maxsim(const float* q, int64_t rows, int64_t D, const int32_t* row_query, int64_t n_queries, int64_t n_segments,
              const void* const* codes, int kind, const float* const* row_scales, const float* dim_scales,
              const int64_t* const* offsets, const int64_t* first, const int64_t* docs, int64_t n_docs, float* out,
              int bf16, int num_threads) {
    if (rows <= 0 || D <= 0 || n_queries <= 0 || n_segments <= 0 || kind < 0 || kind > 2) return 1;
    const doc_set all = {n_segments, codes, row_scales, offsets, first, docs}, *set = &all;
    if (!docs) n_docs = first[n_segments];
    if (n_docs <= 0) return 0;
    int64_t max_len = 0;
    for (int64_t j = 0; j < n_docs; j++) {
        int64_t s, i;
        locate(set, j, &s, &i);
        const int64_t len = set->offsets[s][i + 1] - set->offsets[s][i];
        if (len < 0) return 2;
        if (len > max_len) max_len = len;
    }
    int use_amx = 0;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    use_amx = bf16 && D % 32 == 0 && amx_ready();
#endif
    int use_dp = 0;
#ifdef HAVE_DPBF16
    use_dp = bf16 && D % 32 == 0; /* the caller checked the CPU's flags */
#endif
    if (bf16 && !use_amx && !use_dp) return 4; /* the caller asked for a path this build or CPU does not have */
    const int64_t rp = use_amx ? (rows + 15) / 16 * 16 : (rows + RB - 1) / RB * RB;
    /* queries, packed once: fp32 transposed [D, rp] (zero columns past rows), or bf16 pairs for the tiles */
    float* qt = NULL;
    uint16_t* qp = NULL;
    if (use_amx) {
        qp = calloc((size_t)D * rp, sizeof(uint16_t));
        if (!qp) return 3;
        const int64_t nrb = rp / 16;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t d = 0; d < D; d++) {
                const int64_t c = d / 32, p = (d % 32) / 2, e = d % 2, b = r / 16, rr = r % 16;
                qp[(((c * nrb + b) * 16 + p) * 16 + rr) * 2 + e] = f32_to_bf16(q[r * D + d]);
            }
    } else if (use_dp) {
        qp = calloc((size_t)D * rp, sizeof(uint16_t)); /* [D/2][rp] pairs */
        if (!qp) return 3;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t d = 0; d < D; d++) qp[((d / 2) * rp + r) * 2 + d % 2] = f32_to_bf16(q[r * D + d]);
    } else {
        qt = calloc((size_t)D * rp, sizeof(float));
        if (!qt) return 3;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t d = 0; d < D; d++) qt[d * rp + r] = q[r * D + d];
    }
    const int64_t width = kind == 0 ? 4 : kind == 1 ? 2 : 1; /* bytes per stored value */
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        /* scratch each path reads: fp32 rows (the fp32 path), bf16 rows (AMX: two whole documents, each with 4 KB
         * of slack for scratch_for; AVX512-BF16: two blocks of TJB tokens) */
        const int need_x = !use_dp && !use_amx;
        float* x = need_x ? malloc((size_t)(max_len + 16) * D * sizeof(float)) : NULL;
        float* m = malloc((size_t)rp * sizeof(float));
        float* cs = malloc(4 * 256 * sizeof(float));
#ifdef HAVE_DPBF16
        const int64_t xb_rows = use_dp ? 2 * TJB : max_len + 16;
#else
        const int64_t xb_rows = max_len + 16;
#endif
        const size_t xb_bytes = (size_t)xb_rows * D * sizeof(uint16_t) + 4096;
        uint16_t* xb = use_amx || use_dp ? malloc(xb_bytes) : NULL;
        uint16_t* xb2 = use_amx ? malloc(xb_bytes) : NULL;
        const int ok = (!need_x || x) && m && cs && (!(use_amx || use_dp) || xb) && (!use_amx || xb2);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
        if (ok && use_amx) amx_configure();
#endif
        /* chunks of DOC_CHUNK documents, each chunk's in order on one thread (the AMX path converts the next
         * document of its chunk while it scores this one) */
#pragma omp for schedule(dynamic, 1)
        for (int64_t c0 = 0; c0 < n_docs; c0 += DOC_CHUNK) {
            const int64_t c1 = c0 + DOC_CHUNK < n_docs ? c0 + DOC_CHUNK : n_docs;
            uint16_t* ready = NULL; /* AMX: this document's bf16 rows, converted during the last one's tiles */
            int side = 0;
            for (int64_t j = c0; j < c1; j++) {
                if (!ok) continue;
                int64_t s, i;
                locate(set, j, &s, &i);
                const void* codes = set->codes[s];
                const float* row_scales = set->row_scales[s];
                const int64_t* offsets = set->offsets[s];
                const int64_t t0 = offsets[i], n = offsets[i + 1] - t0;
                float* o = out + j * n_queries;
                for (int64_t qi = 0; qi < n_queries; qi++) o[qi] = 0.0f;
                if (n == 0) continue;
                if (use_amx) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
                    const int64_t np = (n + 15) / 16 * 16;
                    /* codes -> bf16 in registers (D % 32 == 0); the chunk's next document during this one's tiles */
                    uint16_t* bufs[2] = {xb, xb2};
                    uint16_t* cur = ready;
                    if (!cur) {
                        cur = scratch_for(bufs[side], (const char*)codes + t0 * D * width);
                        codes_to_bf16(cur, codes, kind, row_scales, dim_scales, D, t0, 0, n * D);
                    }
                    memset(cur + n * D, 0, (size_t)(np - n) * D * sizeof(uint16_t));
                    const void* ncodes = NULL;
                    const float* nscales = NULL;
                    int64_t nt0 = 0, nn = 0;
                    ready = NULL;
                    if (j + 1 < c1) {
                        int64_t s2, i2;
                        locate(set, j + 1, &s2, &i2);
                        const int64_t* offsets2 = set->offsets[s2];
                        nt0 = offsets2[i2];
                        nn = offsets2[i2 + 1] - nt0;
                        ncodes = set->codes[s2];
                        nscales = set->row_scales[s2];
                        if (nn > 0) ready = scratch_for(bufs[1 - side], (const char*)ncodes + nt0 * D * width);
                    }
                    doc_max_amx(qp, rp, D, cur, n, m, cs, ready, ncodes, kind, nscales, dim_scales, nt0,
                                nn > 0 ? nn : 0);
                    side = 1 - side;
#endif
                } else if (use_dp) {
#ifdef HAVE_DPBF16
                    const char* next = NULL; /* two documents ahead (measured: one ahead left ~10% more waiting) */
                    int64_t next_bytes = 0;
                    if (j + 2 < n_docs) {
                        int64_t s2, i2;
                        locate(set, j + 2, &s2, &i2);
                        const int64_t* offsets2 = set->offsets[s2];
                        next = (const char*)set->codes[s2] + offsets2[i2] * D * width;
                        next_bytes = (offsets2[i2 + 1] - offsets2[i2]) * D * width;
                    }
                    doc_max_dpbf16((const uint32_t*)qp, rp, D, codes, kind, row_scales, dim_scales, t0, n, m, xb,
                                   next, next_bytes);
#endif
                } else {
                    decode_rows(codes, kind, row_scales, dim_scales, D, t0, t0 + n, x);
                    for (int64_t rb = 0; rb < rp; rb += RB) row_block_max(qt, rp, D, x, n, rb, m + rb);
                }
                for (int64_t r = 0; r < rows; r++) o[row_query[r]] += m[r];
            }
        }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
        if (ok && use_amx) _tile_release();
#endif
        free(x);
        free(m);
        free(cs);
        free(xb);
        free(xb2);
    }
    free(qt);
    free(qp);
    return failed ? 3 : 0;
}
