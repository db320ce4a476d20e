/* Experimental variants of maxsim.c's AMX scan as it was at 57f9cab (fp16 codes; bf16 codes read in place as an
 * upper bound), one segment, timed by bench/amx_ab/ab.py (bench/NOTES.md has the tables); not shipped. Each
 * variant computes out[j * nq + row_query[r]] += max over document order[j]'s tokens of q_r . x with bf16
 * products, in the tile operations' order of that kernel, so outputs are bit-identical to it. */
#include <stdlib.h>
#include "simd.h"
#include <immintrin.h>

static inline void conv16(uint16_t* dst, const uint16_t* src) {
    __m256i v;
    memcpy(&v, src, 32);
    store_bf16(dst, (vf)_mm512_cvtph_ps(v));
}

/* scratch inside base (4 KB of slack) with the same address bits 11:0 as src: the conversion's loads never meet an
 * earlier store of it at a 4 KB distance (4K aliasing: a load waits for a store that shares its low 12 bits) */
static inline uint16_t* same_page_offset(uint16_t* base, const void* src) {
    const uintptr_t b = (uintptr_t)base, want = (uintptr_t)src & 4095 & ~(uintptr_t)63;
    return (uint16_t*)(b + ((want - b) & 4095));
}

#define DOT_BLOCK(t)                                                                                        \
    if (nb > t) {                                                                                         \
        _tile_loadd(5, qp + ((c * nrb + rb0 + t) * 16) * 32, 64);                                         \
        _tile_dpbf16ps(t, 4, 5);                                                                          \
    }
#define STORE_BLOCK(t)                                                                                      \
    if (nb > t) _tile_stored(t, cs + t * 256, 64);

static inline void maxima(float* m, const float* cs, int64_t row0, int nb, int64_t valid) {
    for (int b = 0; b < nb; b++) {
        vf best = ld(m + (row0 + b) * 16);
        for (int64_t t = 0; t < valid; t++) best = vmax(best, ld(cs + b * 256 + t * 16));
        st(m + (row0 + b) * 16, best);
    }
}

/* pf: the next document's codes to prefetch into L2 a little per chunk step (NULL: none); bytes. v7: nh (nn
 * tokens of fp16) converted into nx, a slice per chunk step, while this document's tiles run (nn = 0: none). */
static void doc_tiles(const uint16_t* qp, int64_t rp, int64_t D, const uint16_t* xb, int64_t stride, int64_t n,
                      float* m, float* cs, const char* pf, int64_t pf_bytes, const uint16_t* nh, int64_t nn,
                      uint16_t* nx) {
    const int64_t nrb = rp / 16, nc = D / 32;
    const int64_t steps = (n + 15) / 16 * nc * ((nrb + 3) / 4);
    const int64_t per = pf ? (pf_bytes / 64 + steps - 1) / steps : 0;
    const int64_t total = nn * D, slice = (total / 16 + steps - 1) / steps * 16;
    int64_t line = 0, e = 0;
    for (int64_t r = 0; r < rp; r++) m[r] = -3.0e38f;
    for (int64_t rb0 = 0; rb0 < nrb; rb0 += 4) {
        const int nb = nrb - rb0 < 4 ? (int)(nrb - rb0) : 4;
        for (int64_t j = 0; j < n; j += 16) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t c = 0; c < nc; c++) {
                _tile_loadd(4, xb + j * stride + c * 32, stride * 2);
                DOT_BLOCK(0)
                DOT_BLOCK(1)
                DOT_BLOCK(2)
                DOT_BLOCK(3)
                for (int64_t p = 0; p < per && line * 64 < pf_bytes; p++, line++) _mm_prefetch(pf + line * 64, _MM_HINT_T1);
                for (int64_t stop = e + slice < total ? e + slice : total; e < stop; e += 16) {
                    if ((e & 31) == 0) __builtin_prefetch(nh + e + 4096, 0, 2);
                    conv16(nx + e, nh + e);
                }
            }
            STORE_BLOCK(0)
            STORE_BLOCK(1)
            STORE_BLOCK(2)
            STORE_BLOCK(3)
            maxima(m, cs, rb0, nb, n - j < 16 ? n - j : 16);
        }
    }
    for (; e < total; e += 16) conv16(nx + e, nh + e);
}

/* two token tiles a step (rp <= 32): scores tiles 0-3 (token tile k/2... : 0,1 = tile j rows 0-15/16-31; 2,3 = tile
 * j+16), token tiles 4 and 5, query blocks 6 and 7 */
static void doc_tiles2(const uint16_t* qp, int64_t rp, int64_t D, const uint16_t* xb, int64_t stride, int64_t n,
                       float* m, float* cs, const char* pf, int64_t pf_bytes) {
    const int64_t nrb = rp / 16, nc = D / 32;
    const int64_t steps = (n + 31) / 32 * nc;
    const int64_t per = pf ? (pf_bytes / 64 + steps - 1) / steps : 0;
    int64_t line = 0;
    for (int64_t r = 0; r < rp; r++) m[r] = -3.0e38f;
    for (int64_t j = 0; j < n; j += 32) {
        const int two = j + 16 < n;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t c = 0; c < nc; c++) {
            _tile_loadd(4, xb + j * stride + c * 32, stride * 2);
            _tile_loadd(6, qp + ((c * nrb + 0) * 16) * 32, 64);
            _tile_dpbf16ps(0, 4, 6);
            if (two) {
                _tile_loadd(5, xb + (j + 16) * stride + c * 32, stride * 2);
                _tile_dpbf16ps(2, 5, 6);
            }
            if (nrb > 1) {
                _tile_loadd(7, qp + ((c * nrb + 1) * 16) * 32, 64);
                _tile_dpbf16ps(1, 4, 7);
                if (two) _tile_dpbf16ps(3, 5, 7);
            }
            for (int64_t p = 0; p < per && line * 64 < pf_bytes; p++, line++) _mm_prefetch(pf + line * 64, _MM_HINT_T1);
        }
        _tile_stored(0, cs, 64);
        if (nrb > 1) _tile_stored(1, cs + 256, 64);
        maxima(m, cs, 0, (int)nrb, n - j < 16 ? n - j : 16);
        if (two) {
            _tile_stored(2, cs, 64);
            if (nrb > 1) _tile_stored(3, cs + 256, 64);
            maxima(m, cs, 0, (int)nrb, n - j - 16 < 16 ? n - j - 16 : 16);
        }
    }
}

/* variant: 0 committed scheme; 1 + next document prefetched during the tiles; 2 bf16 codes in place; 3 bf16 in
 * place + prefetch; 4 two token tiles a step + prefetch; 5 conversion only (no tiles: out stays 0);
 * 6 conversion without the 8 KB-ahead prefetch + next-document prefetch during the tiles; 7 the next document
 * converted while this one's tiles run (two buffers, chunks of 64 documents); 8 = 0, 9 = 7, 10 = 5 with the
 * scratch at the source's address bits 11:0 */
int ab_scan(int variant, const float* q, int64_t rows, int64_t D, const int32_t* row_query, int64_t nq,
            const uint16_t* codes, const int64_t* offsets, const int64_t* order, int64_t n_docs, float* out,
            int threads) {
    if (!amx_ready() || D % 32) return 4;
    const int64_t rp = (rows + 15) / 16 * 16, nrb = rp / 16;
    if (variant == 4 && nrb > 2) return 1;
    uint16_t* qp = calloc((size_t)D * rp, sizeof(uint16_t));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t d = 0; d < D; d++) {
            const int64_t c = d / 32, p = (d % 32) / 2, e = d % 2, b = r / 16, rr = r % 16;
            qp[(((c * nrb + b) * 16 + p) * 16 + rr) * 2 + e] = f32_to_bf16(q[r * D + d]);
        }
    int64_t max_len = 0;
    for (int64_t j = 0; j < n_docs; j++) {
        const int64_t len = offsets[order[j] + 1] - offsets[order[j]];
        if (len > max_len) max_len = len;
    }
    const int inplace = variant == 2 || variant == 3;
    const int samepage = variant >= 8;
    const int prefetch_next = variant == 1 || variant == 3 || variant == 4 || variant == 6;
    const int conv_only = variant == 5 || variant == 10;
#pragma omp parallel num_threads(threads)
    {
        uint16_t* xb0 = aligned_alloc(64, (size_t)(max_len + 32) * D * 2 + 4096);
        uint16_t* xb = xb0;
        float* m = malloc((size_t)rp * sizeof(float));
        float* cs = aligned_alloc(64, 4 * 256 * sizeof(float));
        amx_configure();
        if (variant == 7 || variant == 9) {
            uint16_t* base[2] = {xb0, aligned_alloc(64, (size_t)(max_len + 32) * D * 2 + 4096)};
            uint16_t* buf[2] = {base[0], base[1]};
#pragma omp for schedule(dynamic, 1)
            for (int64_t c0 = 0; c0 < n_docs; c0 += 64) {
                const int64_t c1 = c0 + 64 < n_docs ? c0 + 64 : n_docs;
                int cur = 0;
                {
                    const int64_t t0 = offsets[order[c0]], n = offsets[order[c0] + 1] - t0;
                    if (variant == 9) buf[0] = same_page_offset(base[0], codes + t0 * D);
                    for (int64_t e = 0; e < n * D; e += 16) conv16(buf[0] + e, codes + t0 * D + e);
                }
                for (int64_t j = c0; j < c1; j++) {
                    const int64_t t0 = offsets[order[j]], n = offsets[order[j] + 1] - t0;
                    const int64_t np = (n + 15) / 16 * 16;
                    float* o = out + j * nq;
                    for (int64_t qi = 0; qi < nq; qi++) o[qi] = 0.0f;
                    memset(buf[cur] + n * D, 0, (size_t)(np - n) * D * sizeof(uint16_t));
                    const int64_t nt0 = j + 1 < c1 ? offsets[order[j + 1]] : 0;
                    const int64_t nn = j + 1 < c1 ? offsets[order[j + 1] + 1] - nt0 : 0;
                    if (variant == 9) buf[1 - cur] = same_page_offset(base[1 - cur], codes + nt0 * D);
                    doc_tiles(qp, rp, D, buf[cur], D, n, m, cs, NULL, 0, codes + nt0 * D, nn, buf[1 - cur]);
                    for (int64_t r = 0; r < rows; r++) o[row_query[r]] += m[r];
                    cur = 1 - cur;
                }
            }
            free(base[1]);
        } else
#pragma omp for schedule(dynamic, 64)
        for (int64_t j = 0; j < n_docs; j++) {
            const int64_t t0 = offsets[order[j]], n = offsets[order[j] + 1] - t0;
            const uint16_t* h = codes + t0 * D;
            const char* pf = NULL;
            int64_t pf_bytes = 0;
            if (prefetch_next && j + 1 < n_docs) {
                pf = (const char*)(codes + offsets[order[j + 1]] * D);
                pf_bytes = (offsets[order[j + 1] + 1] - offsets[order[j + 1]]) * D * 2;
            }
            float* o = out + j * nq;
            for (int64_t qi = 0; qi < nq; qi++) o[qi] = 0.0f;
            if (n == 0) continue;
            if (inplace) {
                doc_tiles(qp, rp, D, h, D, n, m, cs, pf, pf_bytes, NULL, 0, NULL);
            } else {
                const int64_t np = (n + 15) / 16 * 16;
                if (samepage) xb = same_page_offset(xb0, h);
                if (variant == 6) {
                    for (int64_t e = 0; e < n * D; e += 16) conv16(xb + e, h + e);
                } else {
                    for (int64_t e = 0; e < n * D; e += 16) {
                        if ((e & 31) == 0) __builtin_prefetch(h + e + 4096, 0, 2);
                        conv16(xb + e, h + e);
                    }
                }
                memset(xb + n * D, 0, (size_t)(np - n) * D * sizeof(uint16_t));
                if (conv_only) continue;
                if (variant == 4) doc_tiles2(qp, rp, D, xb, D, n, m, cs, pf, pf_bytes);
                else doc_tiles(qp, rp, D, xb, D, n, m, cs, pf, pf_bytes, NULL, 0, NULL);
            }
            for (int64_t r = 0; r < rows; r++) o[row_query[r]] += m[r];
        }
        _tile_release();
        free(xb0);
        free(m);
        free(cs);
    }
    free(qp);
    return 0;
}
