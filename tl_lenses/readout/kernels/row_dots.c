/* Dot products of residual-stream rows read in place: tl_lenses' per-sublayer DLA.
 *
 * For each tensor t of n (all of one layout, the caller checks), each row r and each
 * direction k:
 *   out[t, r, k] = sum_j values[t][offsets[r] + j] * u[k, j],   j < d
 *
 * Rows are read where they lie (offsets in elements from each tensor's data pointer), so
 * DLA reads one position of sixty cached [batch, pos, d_model] tensors without a view,
 * a copy or a matmul dispatch per tensor. Products of two floats are exact in double, and
 * the sums run in double over 8 fixed lanes, then in lane order: the result is the float
 * nearest the exact dot up to the double sum's rounding (within 1 ulp of a float64
 * reference), the same on every run and thread count. Plain C: compiled once by
 * tl_lenses/readout/_native.py.
 */
#include <stdint.h>

#define LANES 8

void tl_row_dots(const int64_t *pointers, int64_t n, const int64_t *offsets, int64_t rows,
                 const float *u, int64_t n_dir, int64_t d, int threads, float *out) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t t = 0; t < n; t++) {
        const float *base = (const float *)(intptr_t)pointers[t];
        for (int64_t r = 0; r < rows; r++) {
            const float *x = base + offsets[r];
            for (int64_t k = 0; k < n_dir; k++) {
                const float *w = u + k * d;
                double lane[LANES] = {0.0};
                int64_t j = 0;
                for (; j + LANES <= d; j += LANES)
                    for (int l = 0; l < LANES; l++) lane[l] += (double)x[j + l] * (double)w[j + l];
                double total = 0.0;
                for (; j < d; j++) total += (double)x[j] * (double)w[j];
                for (int l = 0; l < LANES; l++) total += lane[l];
                out[(t * rows + r) * n_dir + k] = (float)total;
            }
        }
    }
}
