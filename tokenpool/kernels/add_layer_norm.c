/* Residual add + LayerNorm for the CPU, one pass over memory: x <- LayerNorm(y + x), and optionally the result
 * rounded to bf16 for the next GEMM's input (which would otherwise be a second pass).
 *
 * x: [rows, n] fp32, the residual stream, overwritten with the result. y: the sublayer's output, fp32 or bf16
 * (y_bf16 != 0), y_stride elements between rows. w, b: [n] fp32. out_bf16: [rows, n], or NULL. n must be a
 * multiple of VL (simd.h). Per row, in fp32: s = y + x (PyTorch's bf16 + fp32 add promotes to fp32), mean, then
 * variance as the mean of (s - mean)^2 (two passes over a row in cache, as F.layer_norm), and
 * (s - mean) / sqrt(var + eps) * w + b. Rows are spread over the OpenMP threads (torch's runtime).
 */
#include <math.h>

#include "simd.h"

int tp_add_layer_norm(float* x, const void* y, int64_t y_stride, int y_bf16, const float* w, const float* b,
                      uint16_t* out_bf16, int64_t rows, int64_t n, float eps, int num_threads) {
    if (n <= 0 || n % VL != 0) return 1;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t i = 0; i < rows; i++) {
        float* xr = x + i * n;
        vf sum = splat(0.0f);
        for (int64_t j = 0; j < n; j += VL) {
            const vf s = ld(xr + j) + load_vec(y, i * y_stride + j, y_bf16);
            st(xr + j, s);
            sum += s;
        }
        const float mean = hsum(sum) / (float)n;
        vf var = splat(0.0f);
        for (int64_t j = 0; j < n; j += VL) {
            const vf d = ld(xr + j) - mean;
            var += d * d;
        }
        const float rstd = 1.0f / sqrtf(hsum(var) / (float)n + eps);
        for (int64_t j = 0; j < n; j += VL) {
            const vf o = (ld(xr + j) - mean) * rstd * ld(w + j) + ld(b + j);
            st(xr + j, o);
            if (out_bf16) store_bf16(out_bf16 + i * n + j, o);
        }
    }
    return 0;
}
