/* Q4_1 and Q8_0 weights x fp32 activations on CPU: y[M, N] = x[M, K] . W[N, K]^T with fp32 accumulation.
 *
 * Weights stay quantized in memory; every product is the fp32 GEMV of the dequantized weights up to the
 * order of the fp32 additions. Each output row is computed by the same operations in the same order for
 * any M and any thread count, so a verify step's rows equal the bs1 decode step's bit for bit.
 *
 * Q4_1 (w = d*q + m per block of 32 along K), repacked at load (kernels/cpu_quant/layout.py): a row is
 * ceil(K / 64) chunks of 32 bytes; nibble i (bits 4i..4i+3) of 32-bit word L of chunk c holds
 * q[64c + 8i + L], so masking the chunk's 8 words gives 8 consecutive weights in 8 int32 lanes with no
 * shuffle (see nibbles). Block b = 2c + (i >= 4). d, m: fp16 [N, K / 32], as GGUF stores them (fp32 would
 * add a quarter to the bytes a token streams). The m term is folded through per-block sums of each
 * activation row: sum_b m_b * sum_{j in b} x_j (computed once per call).
 *
 * Q8_0 (w = d*q, q int8, per block of 32): q int8 [N, K] as GGUF stores it, d fp32 [N, K / 32].
 * Per row: sum_b d_b * (sum_{j in b} x_j q_j); d_b * q_j is exact in fp32 (11 + 8 bits).
 *
 * Built with -mavx2 -mfma -mf16c where the CPU has AVX2 (kernels/cpu_quant/library.py), else the scalar
 * path below (same layouts, same math, its own summation order).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_quant.h"

#define QK 32

/* Per-block sums of each activation row: xs[r * nb + b] = sum of x[r, 32b .. 32b + 31]. */
static void block_sums(const float *x, int64_t m_rows, int64_t k, float *xs) {
    int64_t nb = k / QK;
    for (int64_t r = 0; r < m_rows; r++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *p = x + r * k + b * QK;
            float s = 0.0f;
            for (int j = 0; j < QK; j++) s += p[j];
            xs[r * nb + b] = s;
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)

/* Weights of nibble slot i of a chunk as 8 fp32 lanes, times 16^i for slots 1..6: masking in place and
 * converting skips a shift (the kernel is bound by the vector ALU ops per weight, not by memory). q * 16^i
 * is exact in fp32, and so is the activation x * 16^-i it meets (scaled_activations), so every product
 * equals x * q. Slot 7 is shifted down instead (masked in place it would read as a negative int32). */
static inline __m256 nibbles(__m256i chunk, int i) {
    if (i == 7) return _mm256_cvtepi32_ps(_mm256_srli_epi32(chunk, 28));
    return _mm256_cvtepi32_ps(_mm256_and_si256(chunk, _mm256_set1_epi32(0xF << (4 * i))));
}

/* x with element 64c + 8i + L multiplied by 16^-i for slots i = 1..6 (powers of two: exact). */
static float *scaled_activations(const float *x, int64_t m_rows, int64_t k) {
    static const float slot_scale[8] = {1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.0f};
    float *out = malloc(sizeof(float) * (size_t)(m_rows * k));
    for (int64_t j = 0; j < m_rows * k; j += 8) {  /* k is a multiple of 32: rows start on a slot */
        __m256 scale = _mm256_broadcast_ss(slot_scale + (j % k % 64) / 8);
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), scale));
    }
    return out;
}

static inline __m256 halves8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* A row's fp16 scales as fp32 (broadcast per block from here: one F16C conversion per 8 blocks). */
static inline void row_scales(const uint16_t *d, int64_t nb, float *out) {
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) _mm256_storeu_ps(out + b, halves8(d + b));
    for (; b < nb; b++) out[b] = _cvtsh_ss(d[b]);
}

/* A row's result: its block sums (sum) plus the m term sum_b m_b * xs_b, 8 blocks a vector. */
static inline float q4_1_result(__m256 sum, const uint16_t *mins, const float *xs, int64_t nb) {
    __m256 mv = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) mv = _mm256_fmadd_ps(halves8(mins + b), _mm256_loadu_ps(xs + b), mv);
    float out = hsum(_mm256_add_ps(sum, mv));
    for (; b < nb; b++) out += _cvtsh_ss(mins[b]) * xs[b];
    return out;
}

/* One block's 4 weight vectors (slots base..base + 3 of its chunk) into M rows' sums. */
#define Q4_1_BLOCK(M, chunk, base, b)                                                              \
    do {                                                                                          \
        __m256 q0 = nibbles(chunk, base), q1 = nibbles(chunk, base + 1);                          \
        __m256 q2 = nibbles(chunk, base + 2), q3 = nibbles(chunk, base + 3);                      \
        __m256 db = _mm256_broadcast_ss(d + (b));                                                 \
        const float *xb = x + (b) * QK;                                                           \
        for (int r = 0; r < M; r++) {                                                             \
            const float *xr = xb + r * k;                                                         \
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(xr), q0);                                  \
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), q1, acc);                              \
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), q2, acc);                             \
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), q3, acc);                             \
            sum[r] = _mm256_fmadd_ps(acc, db, sum[r]);                                            \
        }                                                                                         \
    } while (0)

/* M activation rows x one Q4_1 weight row: y[r * ldy] for r < M. M is a literal at every call site so
 * the row loops unroll and the accumulators stay in registers; the masks are constants. */
static inline __attribute__((always_inline)) void q4_1_row(
    int M, const float *x, int64_t k, const uint8_t *w, const uint16_t *d16, const uint16_t *mins,
    const float *xs, float *y, int64_t ldy) {
    int64_t nb = k / QK, full = nb / 2;
    float d[nb];
    row_scales(d16, nb, d);
    __m256 sum[8];
    for (int r = 0; r < M; r++) sum[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < full; c++) {
        __m256i chunk = _mm256_loadu_si256((const __m256i *)(w + c * 32));
        Q4_1_BLOCK(M, chunk, 0, 2 * c);
        Q4_1_BLOCK(M, chunk, 4, 2 * c + 1);
    }
    if (nb & 1) {  /* a last half chunk: block nb - 1 in slots 0..3 */
        __m256i chunk = _mm256_loadu_si256((const __m256i *)(w + full * 32));
        Q4_1_BLOCK(M, chunk, 0, nb - 1);
    }
    for (int r = 0; r < M; r++) y[r * ldy] = q4_1_result(sum[r], mins, xs + r * nb, nb);
}

/* One block of 4 Q4_1 weight rows against one activation row (M = 1): the per-row operations of
 * Q4_1_BLOCK at M = 1, in the same order, for 4 rows at once (4 independent FMA chains). */
#define Q4_1_BLOCK4(base, b)                                                                       \
    do {                                                                                          \
        const float *xb = x + (b) * QK;                                                           \
        __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);                            \
        __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);                      \
        __m256 a0 = _mm256_mul_ps(x0, nibbles(c0, base));                                         \
        __m256 a1 = _mm256_mul_ps(x0, nibbles(c1, base));                                         \
        __m256 a2 = _mm256_mul_ps(x0, nibbles(c2, base));                                         \
        __m256 a3 = _mm256_mul_ps(x0, nibbles(c3, base));                                         \
        a0 = _mm256_fmadd_ps(x1, nibbles(c0, base + 1), a0);                                      \
        a1 = _mm256_fmadd_ps(x1, nibbles(c1, base + 1), a1);                                      \
        a2 = _mm256_fmadd_ps(x1, nibbles(c2, base + 1), a2);                                      \
        a3 = _mm256_fmadd_ps(x1, nibbles(c3, base + 1), a3);                                      \
        a0 = _mm256_fmadd_ps(x2, nibbles(c0, base + 2), a0);                                      \
        a1 = _mm256_fmadd_ps(x2, nibbles(c1, base + 2), a1);                                      \
        a2 = _mm256_fmadd_ps(x2, nibbles(c2, base + 2), a2);                                      \
        a3 = _mm256_fmadd_ps(x2, nibbles(c3, base + 2), a3);                                      \
        a0 = _mm256_fmadd_ps(x3, nibbles(c0, base + 3), a0);                                      \
        a1 = _mm256_fmadd_ps(x3, nibbles(c1, base + 3), a1);                                      \
        a2 = _mm256_fmadd_ps(x3, nibbles(c2, base + 3), a2);                                      \
        a3 = _mm256_fmadd_ps(x3, nibbles(c3, base + 3), a3);                                      \
        s0 = _mm256_fmadd_ps(a0, _mm256_broadcast_ss(d + (b)), s0);                               \
        s1 = _mm256_fmadd_ps(a1, _mm256_broadcast_ss(d + nb + (b)), s1);                          \
        s2 = _mm256_fmadd_ps(a2, _mm256_broadcast_ss(d + 2 * nb + (b)), s2);                      \
        s3 = _mm256_fmadd_ps(a3, _mm256_broadcast_ss(d + 3 * nb + (b)), s3);                      \
    } while (0)

#define PREFETCH_ROWS 8

/* 4 consecutive Q4_1 weight rows x one activation row: y[0..3]. */
static void q4_1_rows4(const float *x, int64_t k, const uint8_t *w, int64_t row_bytes, const uint16_t *d16,
                       const uint16_t *mins, const float *xs, float *y) {
    int64_t nb = k / QK, full = nb / 2;
    float d[4 * nb];  /* the 4 rows' scales, contiguous as in d16 */
    row_scales(d16, 4 * nb, d);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t c = 0; c < full; c++) {
        const uint8_t *p = w + c * 32;
        /* The next passes' rows, ahead of the hardware prefetcher (which alone reached ~8 GB/s here);
         * a prefetch never faults, so running past the last row is harmless. */
        _mm_prefetch((const char *)(p + PREFETCH_ROWS * row_bytes), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + (PREFETCH_ROWS + 1) * row_bytes), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + (PREFETCH_ROWS + 2) * row_bytes), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + (PREFETCH_ROWS + 3) * row_bytes), _MM_HINT_T0);
        __m256i c0 = _mm256_loadu_si256((const __m256i *)p);
        __m256i c1 = _mm256_loadu_si256((const __m256i *)(p + row_bytes));
        __m256i c2 = _mm256_loadu_si256((const __m256i *)(p + 2 * row_bytes));
        __m256i c3 = _mm256_loadu_si256((const __m256i *)(p + 3 * row_bytes));
        Q4_1_BLOCK4(0, 2 * c);
        Q4_1_BLOCK4(4, 2 * c + 1);
    }
    if (nb & 1) {
        const uint8_t *p = w + full * 32;
        __m256i c0 = _mm256_loadu_si256((const __m256i *)p);
        __m256i c1 = _mm256_loadu_si256((const __m256i *)(p + row_bytes));
        __m256i c2 = _mm256_loadu_si256((const __m256i *)(p + 2 * row_bytes));
        __m256i c3 = _mm256_loadu_si256((const __m256i *)(p + 3 * row_bytes));
        Q4_1_BLOCK4(0, nb - 1);
    }
    y[0] = q4_1_result(s0, mins, xs, nb);
    y[1] = q4_1_result(s1, mins + nb, xs, nb);
    y[2] = q4_1_result(s2, mins + 2 * nb, xs, nb);
    y[3] = q4_1_result(s3, mins + 3 * nb, xs, nb);
}

static inline __m256 int8s(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline __attribute__((always_inline)) void q8_0_row(
    int M, const float *x, int64_t k, const int8_t *w, const float *d, float *y, int64_t ldy) {
    int64_t nb = k / QK;
    __m256 sum[8];
    for (int r = 0; r < M; r++) sum[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *wb = w + b * QK;
        __m256 q0 = int8s(wb), q1 = int8s(wb + 8), q2 = int8s(wb + 16), q3 = int8s(wb + 24);
        __m256 db = _mm256_broadcast_ss(d + b);
        const float *xb = x + b * QK;
        for (int r = 0; r < M; r++) {
            const float *xr = xb + r * k;
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(xr), q0);
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), q1, acc);
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), q2, acc);
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), q3, acc);
            sum[r] = _mm256_fmadd_ps(acc, db, sum[r]);
        }
    }
    for (int r = 0; r < M; r++) y[r * ldy] = hsum(sum[r]);
}

#else /* scalar: CPUs without AVX2 + FMA */

static float *scaled_activations(const float *x, int64_t m_rows, int64_t k) {
    float *out = malloc(sizeof(float) * (size_t)(m_rows * k));
    memcpy(out, x, sizeof(float) * (size_t)(m_rows * k));
    return out;
}

static void q4_1_row(int M, const float *x, int64_t k, const uint8_t *w, const uint16_t *d,
                     const uint16_t *mins, const float *xs, float *y, int64_t ldy) {
    int64_t nb = k / QK;
    for (int r = 0; r < M; r++) {
        float sum = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *chunk = w + (b >> 1) * 32;
            int base = (int)(b & 1) * 4;
            float acc = 0.0f;
            for (int j = 0; j < QK; j++) {
                int slot = base + j / 8, lane = j % 8;
                uint32_t word;
                memcpy(&word, chunk + 4 * lane, 4);
                acc += x[r * k + b * QK + j] * (float)((word >> (4 * slot)) & 0xF);
            }
            sum += acc * half_to_float(d[b]);
        }
        float mterm = 0.0f;
        for (int64_t b = 0; b < nb; b++) mterm += half_to_float(mins[b]) * xs[r * nb + b];
        y[r * ldy] = sum + mterm;
    }
}

static void q8_0_row(int M, const float *x, int64_t k, const int8_t *w, const float *d, float *y,
                     int64_t ldy) {
    int64_t nb = k / QK;
    for (int r = 0; r < M; r++) {
        float sum = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            float acc = 0.0f;
            for (int j = 0; j < QK; j++) acc += x[r * k + b * QK + j] * (float)w[b * QK + j];
            sum += acc * d[b];
        }
        y[r * ldy] = sum;
    }
}
#endif

int cpu_quant_has_avx2(void) {
#if defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}

/* y[M, N] = x[M, K] . dequant(W)^T for one tile of M <= 8 rows (the callers tile larger M, or dequantize
 * and GEMM); output rows split over `threads`. */
void q4_1_linear(const float *x, int64_t m_rows, int64_t k, const uint8_t *packed, const uint16_t *d,
                 const uint16_t *mins, int64_t n, float *y, int threads) {
    int64_t nb = k / QK, chunk_bytes = (k + 63) / 64 * 32;
    float *xs = malloc(sizeof(float) * (size_t)(m_rows * nb));
    block_sums(x, m_rows, k, xs);
    float *xk = scaled_activations(x, m_rows, k);
    int M = (int)m_rows;
#if defined(__AVX2__) && defined(__FMA__)
    if (M == 1) {  /* bs1 decode: 4 weight rows a pass, then the leftover rows one by one */
        int64_t quads = n / 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (int64_t g = 0; g < quads + n % 4; g++) {
            int64_t row = g < quads ? 4 * g : 4 * quads + (g - quads);
            const uint8_t *w = packed + row * chunk_bytes;
            if (g < quads)
                q4_1_rows4(xk, k, w, chunk_bytes, d + row * nb, mins + row * nb, xs, y + row);
            else
                q4_1_row(1, xk, k, w, d + row * nb, mins + row * nb, xs, y + row, n);
        }
        free(xs);
        free(xk);
        return;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *w = packed + row * chunk_bytes;
        const uint16_t *dr = d + row * nb, *mr = mins + row * nb;
        switch (M) {
            case 1: q4_1_row(1, xk, k, w, dr, mr, xs, y + row, n); break;
            case 2: q4_1_row(2, xk, k, w, dr, mr, xs, y + row, n); break;
            case 3: q4_1_row(3, xk, k, w, dr, mr, xs, y + row, n); break;
            case 4: q4_1_row(4, xk, k, w, dr, mr, xs, y + row, n); break;
            case 5: q4_1_row(5, xk, k, w, dr, mr, xs, y + row, n); break;
            case 6: q4_1_row(6, xk, k, w, dr, mr, xs, y + row, n); break;
            case 7: q4_1_row(7, xk, k, w, dr, mr, xs, y + row, n); break;
            default: q4_1_row(8, xk, k, w, dr, mr, xs, y + row, n); break;
        }
    }
    free(xs);
    free(xk);
}

void q8_0_linear(const float *x, int64_t m_rows, int64_t k, const int8_t *q, const float *d, int64_t n,
                 float *y, int threads) {
    int64_t nb = k / QK;
    int M = (int)m_rows;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t row = 0; row < n; row++) {
        const int8_t *w = q + row * k;
        const float *dr = d + row * nb;
        switch (M) {
            case 1: q8_0_row(1, x, k, w, dr, y + row, n); break;
            case 2: q8_0_row(2, x, k, w, dr, y + row, n); break;
            case 3: q8_0_row(3, x, k, w, dr, y + row, n); break;
            case 4: q8_0_row(4, x, k, w, dr, y + row, n); break;
            case 5: q8_0_row(5, x, k, w, dr, y + row, n); break;
            case 6: q8_0_row(6, x, k, w, dr, y + row, n); break;
            case 7: q8_0_row(7, x, k, w, dr, y + row, n); break;
            default: q8_0_row(8, x, k, w, dr, y + row, n); break;
        }
    }
}

void q4_1_dequantize(const uint8_t *packed, const uint16_t *d, const uint16_t *mins, int64_t n, int64_t k,
                     float *out, int threads) {
    int64_t nb = k / QK, chunk_bytes = (k + 63) / 64 * 32;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t row = 0; row < n; row++) {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *chunk = packed + row * chunk_bytes + (b >> 1) * 32;
            float db = half_to_float(d[row * nb + b]), mb = half_to_float(mins[row * nb + b]);
            float *o = out + row * k + b * QK;
            uint32_t words[8];
            memcpy(words, chunk, sizeof(words));
            for (int s = 0; s < 4; s++) {
                int shift = 4 * ((int)(b & 1) * 4 + s);
                for (int lane = 0; lane < 8; lane++) o[8 * s + lane] = (float)((words[lane] >> shift) & 0xF) * db + mb;
            }
        }
    }
}

void q8_0_dequantize(const int8_t *q, const float *d, int64_t n, int64_t k, float *out, int threads) {
    int64_t nb = k / QK;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t row = 0; row < n; row++)
        for (int64_t b = 0; b < nb; b++) {
            float db = d[row * nb + b];
            for (int j = 0; j < QK; j++) out[row * k + b * QK + j] = (float)q[row * k + b * QK + j] * db;
        }
}
