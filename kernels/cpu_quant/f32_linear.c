/* fp32-weight products that stream each weight once for any row count (kernels/cpu_quant/f32_ops.py). */
#include <stdint.h>

#include "cpu_quant.h"

/* ---- fp32 weights: y[M, N] = x[M, K] . W[N, K]^T (+ residual[M, N]) --------------------------------
 *
 * Decode is memory-bound (every weight streamed once a token), so a verify step's extra rows should cost
 * little: each weight row is read from memory once and multiplied into every activation row while it sits
 * in L1 (the x rows stay in L1 / L2: K <= 1536 floats each). The weight is packed in pairs of rows, 8 floats
 * of one then 8 of the other ([N / 2][K / 8][2][8], kernels/cpu_quant/f32_ops.py), so a pair is one
 * sequential stream; a tile reads S pairs a region apart (S = 4 at one row, 2 above), S streams in
 * different pages at once: one core's memory bandwidth needs several streams in flight.
 * Output (r, n) is always one 8-lane accumulator over K in order, then hsum, then + residual: the same
 * operations for any M, any tile and any thread count, so a verify row equals the bs1 step's row bit for
 * bit. K must be a multiple of 8 and N even. */

#if defined(__AVX2__) && defined(__FMA__)
/* R activation rows x S pairs, pair s at wp + s * gap (R, S literal at every call site: the loops unroll
 * into registers). Output columns of pair s start at y + s * gap_cols. */
static inline __attribute__((always_inline)) void f32_tile(
    int R, int S, const float *x, int64_t k, const float *wp, int64_t gap, const float *res, float *y,
    int64_t gap_cols, int64_t ldy) {
    __m256 acc[6][8];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 2 * S; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; j += 8) {
        __m256 wv[8];
        for (int s = 0; s < S; s++) {
            const float *p = wp + s * gap + 2 * j;
            wv[2 * s] = _mm256_loadu_ps(p);
            wv[2 * s + 1] = _mm256_loadu_ps(p + 8);
        }
        for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_loadu_ps(x + r * k + j);
            for (int c = 0; c < 2 * S; c++) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 2 * S; c++) {
            int64_t at = r * ldy + c / 2 * gap_cols + c % 2;
            float v = hsum(acc[r][c]);
            y[at] = res ? v + res[at] : v;
        }
}
#else
static void f32_tile(int R, int S, const float *x, int64_t k, const float *wp, int64_t gap, const float *res,
                     float *y, int64_t gap_cols, int64_t ldy) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 2 * S; c++) {
            const float *w = wp + c / 2 * gap + c % 2 * 8;
            float v = 0.0f;
            for (int64_t j = 0; j < k; j++) v += x[r * k + j] * w[j / 8 * 16 + j % 8];
            int64_t at = r * ldy + c / 2 * gap_cols + c % 2;
            y[at] = res ? v + res[at] : v;
        }
}
#endif

/* One pair (S = 1, 6 rows a register tile) or two (S = 2, 3 rows a tile) against all M activation rows, the
 * pairs staying in L1 between row tiles. */
static void f32_rows(int S, const float *x, int64_t m_rows, int64_t k, const float *wp, int64_t gap,
                     const float *res, float *y, int64_t gap_cols, int64_t n) {
    for (int64_t r = 0; r < m_rows;) {
        int64_t left = m_rows - r, step = S == 1 ? (left < 6 ? left : 6) : (left < 3 ? left : 3);
        const float *xr = x + r * k, *rr = res ? res + r * n : 0;
        float *yr = y + r * n;
        switch (S * 8 + step) {
            case 8 + 6: f32_tile(6, 1, xr, k, wp, gap, rr, yr, gap_cols, n); break;
            case 8 + 5: f32_tile(5, 1, xr, k, wp, gap, rr, yr, gap_cols, n); break;
            case 8 + 4: f32_tile(4, 1, xr, k, wp, gap, rr, yr, gap_cols, n); break;
            case 8 + 3: f32_tile(3, 1, xr, k, wp, gap, rr, yr, gap_cols, n); break;
            case 8 + 2: f32_tile(2, 1, xr, k, wp, gap, rr, yr, gap_cols, n); break;
            case 8 + 1: f32_tile(1, 1, xr, k, wp, gap, rr, yr, gap_cols, n); break;
            case 16 + 3: f32_tile(3, 2, xr, k, wp, gap, rr, yr, gap_cols, n); break;
            case 16 + 2: f32_tile(2, 2, xr, k, wp, gap, rr, yr, gap_cols, n); break;
            default: f32_tile(1, 2, xr, k, wp, gap, rr, yr, gap_cols, n); break;
        }
        r += step;
    }
}

/* Rows of activations a weight pass takes at most: a prefill-sized product walks its rows in chunks that stay
 * in L2 (96 rows of K = 1536 floats: 576 KB) while the weights stream once per chunk; one pass over all
 * 512 rows of a prompt re-read them from L3 for every column tile (25-35% slower than MKL's sgemm there). */
#define F32_ROW_CHUNK 96

/* Any M (a decode batch, a verify chunk, a prompt): the weights stream once per F32_ROW_CHUNK rows. Output
 * columns split over `threads` in whole tiles. residual may be NULL. A row's outputs do not depend on M. */
void f32_linear(const float *x, int64_t m_rows, int64_t k, const float *packed, int64_t n,
                const float *residual, float *y, int threads) {
    for (int64_t r0 = 0; r0 < m_rows; r0 += F32_ROW_CHUNK) {
        int64_t rows = m_rows - r0 < F32_ROW_CHUNK ? m_rows - r0 : F32_ROW_CHUNK;
        const float *xs = x + r0 * k, *res = residual ? residual + r0 * n : 0;
        float *ys = y + r0 * n;
        int64_t pairs = n / 2, S = rows == 1 ? 4 : 2, region = pairs / S, tiles = region + pairs % S;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (int64_t t = 0; t < tiles; t++) {
            int64_t pair = t < region ? t : S * region + (t - region), col = 2 * pair;
            const float *wp = packed + pair * 2 * k, *rc = res ? res + col : 0;
            float *yc = ys + col;
            int64_t gap = region * 2 * k, gap_cols = 2 * region;
            if (t >= region)
                f32_rows(1, xs, rows, k, wp, gap, rc, yc, gap_cols, n);
            else if (S == 4)
                f32_tile(1, 4, xs, k, wp, gap, rc, yc, gap_cols, n);
            else
                f32_rows(2, xs, rows, k, wp, gap, rc, yc, gap_cols, n);
        }
    }
}
