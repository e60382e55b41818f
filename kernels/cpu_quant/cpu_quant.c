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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* IEEE half -> float (the dequantize functions and the scalar path; the AVX2 path uses F16C). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000 | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  /* subnormal half: normalize */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

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

/* ---- The bs1 decode step of quantized layers in one call (engine/cpu_decode.py FlatDecoder) ----------
 *
 * At one sequence and one token a layer is 4 GEMVs and ~35 tiny ops (RMSNorm, RoPE, KV store, attention
 * over the context, silu * up, residual adds); as torch calls those cost more than the GEMVs at 2 threads.
 * Here they run in C between the GEMVs above (which alone use `threads`; the rest is one core's work of a
 * few microseconds a layer). Same math as FlatDecoder's torch path up to the order of fp32 roundings
 * (tests/kernels/cpu_quant/test_cpu_quant_step.py). */

typedef struct {  /* one projection: kind 0 = Q4_1 (w packed, d and m fp16), 1 = Q8_0 (w int8, d fp32) */
    int64_t kind, n, k;
    const void *w, *d, *m;
} cq_linear;

typedef struct {  /* one layer's weights and KV cache ([slots, Hk * D] fp32, slot-major as KVCache) */
    const float *norm_in, *norm_post;
    cq_linear qkv, o, gate_up, down;
    float *k_cache, *v_cache;
} cq_layer;

static void cq_gemv(const cq_linear *l, const float *x, float *y, int threads) {
    if (l->kind == 0)
        q4_1_linear(x, 1, l->k, l->w, l->d, l->m, l->n, y, threads);
    else
        q8_0_linear(x, 1, l->k, l->w, l->d, l->n, y, threads);
}

static float dot(const float *a, const float *b, int64_t n) {
    int64_t j = 0;
    float out = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps(), acc2 = acc;  /* two chains: a head's 8 FMAs are latency-bound */
    for (; j + 16 <= n; j += 16) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc2);
    }
    for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    out = hsum(_mm256_add_ps(acc, acc2));
#endif
    for (; j < n; j++) out += a[j] * b[j];
    return out;
}

/* y += a * x over n floats. */
static void axpy(float a, const float *x, float *y, int64_t n) {
    int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 av = _mm256_set1_ps(a);
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
#endif
    for (; j < n; j++) y[j] += a * x[j];
}

/* out = s / sqrt(mean(s^2) + eps) * w (rms_norm_ref; the sum of squares in double). */
static void rms_norm(const float *s, const float *w, int64_t h, float eps, float *out) {
    double ss = 0.0;
    for (int64_t j = 0; j < h; j++) ss += (double)s[j] * s[j];
    float r = 1.0f / sqrtf(eps + (float)(ss / (double)h));
    for (int64_t j = 0; j < h; j++) out[j] = s[j] * r * w[j];
}

/* Rotate-half RoPE of one head in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), c and s times `scale`. */
static void rope(float *x, const float *cos, const float *sin, int64_t half, float scale) {
    for (int64_t j = 0; j < half; j++) {
        float c = cos[j] * scale, sn = sin[j] * scale, x1 = x[j], x2 = x[j + half];
        x[j] = x1 * c - x2 * sn;
        x[j + half] = x2 * c + x1 * sn;
    }
}

/* One query head (already scaled) over the first seq_len positions of a block table: softmax(q . k_t) . v_t.
 * keys, values: the cache at this head's offset; position t sits in slot blocks[t / bs] * bs + t % bs. */
static void attend(const float *q, const float *keys, const float *values, const int64_t *blocks, int64_t bs,
                   int64_t row, int64_t seq_len, int64_t d, float *scores, float *out) {
    float max = -INFINITY;
    for (int64_t t = 0; t < seq_len; t++) {
        scores[t] = dot(q, keys + (blocks[t / bs] * bs + t % bs) * row, d);
        if (scores[t] > max) max = scores[t];
    }
    float sum = 0.0f;
    for (int64_t t = 0; t < seq_len; t++) sum += scores[t] = expf(scores[t] - max);
    float inv = 1.0f / sum;
    memset(out, 0, sizeof(float) * (size_t)d);
    for (int64_t t = 0; t < seq_len; t++)
        axpy(scores[t] * inv, values + (blocks[t / bs] * bs + t % bs) * row, out, d);
}

/* The residual stream s [H] of one token at position seq_len - 1 through n_layers layers: its KV stored in
 * every layer, then attention over positions 0 .. seq_len - 1 (its own included), which sit in the cache
 * blocks `blocks` of `block_size` slots. cos, sin: [D / 2] rotary tables of its position; q_scale: the
 * softmax scale, folded into the query rotation. */
void cq_decode_step(const cq_layer *layers, int64_t n_layers, int64_t hq, int64_t hk, int64_t d,
                    float eps, float q_scale, const float *cos, const float *sin, const int64_t *blocks,
                    int64_t block_size, int64_t seq_len, float *s, int threads) {
    int64_t h = layers[0].qkv.k, inter = layers[0].down.k, row = hk * d, group = hq / hk, half = d / 2;
    int64_t last = seq_len - 1, slot = blocks[last / block_size] * block_size + last % block_size;
    size_t floats = (size_t)(h + (hq + 2 * hk) * d + hq * d + h + 3 * inter + hq * seq_len);
    float *xn = malloc(sizeof(float) * floats);
    float *qkv = xn + h, *attn = qkv + (hq + 2 * hk) * d, *proj = attn + hq * d, *gate_up = proj + h;
    float *act = gate_up + 2 * inter, *scores = act + inter;
    for (int64_t i = 0; i < n_layers; i++) {
        const cq_layer *L = layers + i;
        rms_norm(s, L->norm_in, h, eps, xn);
        cq_gemv(&L->qkv, xn, qkv, threads);
        for (int64_t j = 0; j < hq; j++) rope(qkv + j * d, cos, sin, half, q_scale);
        for (int64_t j = hq; j < hq + hk; j++) rope(qkv + j * d, cos, sin, half, 1.0f);
        memcpy(L->k_cache + slot * row, qkv + hq * d, sizeof(float) * (size_t)row);
        memcpy(L->v_cache + slot * row, qkv + (hq + hk) * d, sizeof(float) * (size_t)row);
        /* Heads over the threads (a head's operations are the same on any thread count): ~30 ns a head
         * and position on one core; left serial, 1.5 of a 2-thread step's 4.8 ms at 200 positions. */
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (int64_t j = 0; j < hq; j++)
            attend(qkv + j * d, L->k_cache + j / group * d, L->v_cache + j / group * d, blocks, block_size,
                   row, seq_len, d, scores + j * seq_len, attn + j * d);
        cq_gemv(&L->o, attn, proj, threads);
        for (int64_t j = 0; j < h; j++) s[j] = proj[j] + s[j];
        rms_norm(s, L->norm_post, h, eps, xn);
        cq_gemv(&L->gate_up, xn, gate_up, threads);
        for (int64_t j = 0; j < inter; j++) {
            float g = gate_up[j];
            act[j] = g / (1.0f + expf(-g)) * gate_up[inter + j];
        }
        cq_gemv(&L->down, act, proj, threads);
        for (int64_t j = 0; j < h; j++) s[j] = proj[j] + s[j];
    }
    free(xn);
}

/* Dequantize whole weights to fp32 [N, K] (w = d*q + m, w = d*q): the prefill path's GEMM operand.
 * Per block, so d and m convert once and the 8-lane inner loops vectorize. d*q is exact in fp32, so w
 * equals the reference's d*q + m bit for bit (contracted to an FMA or not). */
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
