/* Centroid MaxSim of (query, document) pairs: the residual index's candidate ranking on the CPU.
 *
 * For one query of `mp` rows (its transposed centroid-score table `st` [n_centroids][mp] float32, rows past the
 * query's own zero, which add exactly 0 to a sum of maxima) and documents `docs` of a segment (token offsets
 * `offsets` [docs + 1], centroid id per token `cids`, uint16 (kind 0) or int32 (kind 1)):
 *
 *     out[i] = sum over rows r of max over the tokens t of docs[i] of st[cids[t]][r]
 *
 * A token costs one gathered row of mp floats (from the cache: the table is n_centroids * mp * 4 bytes) and mp
 * maxima; the compiler vectorizes the row loop. Documents are split over `num_threads` OpenMP threads. Returns
 * 0, or 1 for a bad argument. */
#include <math.h>
#include <stdint.h>

#define MAX_ROWS 256

int tp_centroid_maxsim(const float* st, int64_t n_centroids, int64_t mp, const void* cids, int kind,
                    const int64_t* offsets, const int64_t* docs, int64_t n_docs, float* out, int num_threads) {
    if (mp < 1 || mp > MAX_ROWS || n_centroids < 1 || (kind != 0 && kind != 1)) return 1;
#pragma omp parallel for schedule(dynamic, 64) num_threads(num_threads)
    for (int64_t i = 0; i < n_docs; i++) {
        float best[MAX_ROWS];
        for (int64_t r = 0; r < mp; r++) best[r] = -INFINITY;
        const int64_t t0 = offsets[docs[i]], t1 = offsets[docs[i] + 1];
        for (int64_t t = t0; t < t1; t++) {
            const int64_t c = kind == 0 ? (int64_t)((const uint16_t*)cids)[t] : (int64_t)((const int32_t*)cids)[t];
            const float* row = st + c * mp;
            for (int64_t r = 0; r < mp; r++) best[r] = best[r] > row[r] ? best[r] : row[r];
        }
        float total = 0.0f;
        for (int64_t r = 0; r < mp; r++) total += best[r];
        out[i] = total;
    }
    return 0;
}
