/* Per-row softmax statistics of float32 logits, two sweeps per row: tl_lenses' lens readout.
 *
 * For each row r of logits z [rows, vocab]:
 *   block_max[r, b]  max of z over the 128-logit block b (full blocks only)
 *   row_max[r]       max of z
 *   sum_exp[r]       sum_v exp(z_v - max)
 *   e_z[r]           sum_v exp(z_v - max) * z_v
 *   n_above[r]       count of z_v > chosen[r]
 *
 * A row (192 KB for a 49k vocabulary) stays in the core's L2 cache between the max sweep and
 * the sums sweep, so the logits come from memory once. Sums run in float within a 128-logit
 * block (vectorised) and in double across blocks. Plain C: compiled once by tl_lenses/native.py.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 128

/* exp(x) for x <= 0, within ~1 ulp: Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, a
 * degree-7 Taylor polynomial (truncation error r^8 / 8! < 6e-9 relative), times 2^k built in
 * the exponent bits. x below -87 is clamped there (exp(-87) = 1.6e-38: nothing next to 1). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float k = floorf(fmaf(x, 1.44269504088896341f, 0.5f));
    float r = fmaf(k, -0.693359375f, x);        /* ln2 = 0.693359375 - 2.12194440e-4; k * hi exact */
    r = fmaf(k, 2.12194440054690583e-4f, r);
    float p = 1.0f / 5040.0f;
    p = fmaf(p, r, 1.0f / 720.0f);
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    const int32_t bits = ((int32_t)k + 127) << 23;  /* k in [-126, 0]: a normal float */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

void tl_row_stats(const float *logits, const float *chosen, int64_t rows, int64_t vocab,
                  int threads, float *block_max, float *row_max, float *sum_exp, float *e_z,
                  float *n_above) {
    const int64_t n_blocks = vocab / BLOCK, split = n_blocks * BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *z = logits + r * vocab;
        const float c = chosen[r];
        float m = -INFINITY;
        for (int64_t b = 0; b < n_blocks; b++) {
            const float *zb = z + b * BLOCK;
            float mb = -INFINITY;
#pragma omp simd reduction(max : mb)
            for (int j = 0; j < BLOCK; j++) mb = zb[j] > mb ? zb[j] : mb;
            block_max[r * n_blocks + b] = mb;
            m = mb > m ? mb : m;
        }
        for (int64_t j = split; j < vocab; j++) m = z[j] > m ? z[j] : m;
        double s = 0.0, sz = 0.0, count = 0.0;
        for (int64_t start = 0; start < vocab; start += BLOCK) {
            const int64_t stop = start + BLOCK < vocab ? start + BLOCK : vocab;
            float bs = 0.0f, bz = 0.0f, bc = 0.0f;
#pragma omp simd reduction(+ : bs, bz, bc)
            for (int64_t j = start; j < stop; j++) {
                const float x = z[j];
                const float e = exp_nonpositive(x - m);
                bs += e;
                bz += e * x;
                bc += x > c ? 1.0f : 0.0f;
            }
            s += bs;
            sz += bz;
            count += bc;
        }
        row_max[r] = m;
        sum_exp[r] = (float)s;
        e_z[r] = (float)sz;
        n_above[r] = (float)count;
    }
}
