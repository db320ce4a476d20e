/* The residual codec's codes -> the quantized residual coordinates, for the CPU (tokenpool/index/residual.py).
 *
 * codes [n, B] uint8 (a token's fields packed big-endian, as np.packbits); per axis d of D: the field starts in
 * byte first[d], and the 16-bit word (byte first[d] << 8 | byte second[d]) shifted right by shift[d] and masked
 * with mask[d] is the level index; levels [D, L] float32. Out: y [n, D] float32, y[t, d] = levels[d, index]
 * (a 0-bit axis: mask 0, index 0, its one level). One pass over the codes, every token's row written in order:
 * what took torch a transpose, two gathers of bytes, shifts, a gather of levels and a transpose back. Tokens
 * are split over `num_threads` OpenMP threads. Returns 0, or 1 for a bad argument. */
#include <stdint.h>

int tp_residual_unpack(const uint8_t* codes, int64_t n, int64_t B, int64_t D, const int64_t* first,
                       const int64_t* second, const int32_t* shift, const int32_t* mask, const float* levels,
                       int64_t L, float* y, int num_threads) {
    if (n < 0 || B < 1 || D < 1 || L < 1) return 1;
    for (int64_t d = 0; d < D; d++)
        if (first[d] < 0 || first[d] >= B || second[d] < 0 || second[d] >= B || shift[d] < 0 || shift[d] > 16 ||
            mask[d] < 0 || mask[d] >= L)
            return 1;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < n; t++) {
        const uint8_t* c = codes + t * B;
        float* out = y + t * D;
        for (int64_t d = 0; d < D; d++) {
            const uint32_t word = (uint32_t)c[first[d]] << 8 | c[second[d]];
            out[d] = levels[d * L + ((word >> shift[d]) & (uint32_t)mask[d])];
        }
    }
    return 0;
}
