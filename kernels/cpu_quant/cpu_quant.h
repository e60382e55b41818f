/* What the kernels/cpu_quant sources share: the products (cpu_quant.c, f32_linear.c) and the KV cache
 * stores and attention (kv_quant.c) that the fused decode step (decode_step.c) calls, fp16 -> fp32, and the
 * AVX2 horizontal sum, dot product and axpy. */
#ifndef CPU_QUANT_H
#define CPU_QUANT_H

#include <stdint.h>
#include <string.h>

/* IEEE half -> float (dequantizing, the scalar paths, quantized KV scales; AVX2 loops use F16C). */
static inline float half_to_float(uint16_t h) {
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

void q4_1_linear(const float *x, int64_t m_rows, int64_t k, const uint8_t *packed, const uint16_t *d,
                 const uint16_t *mins, int64_t n, float *y, int threads);
void q8_0_linear(const float *x, int64_t m_rows, int64_t k, const int8_t *q, const float *d, int64_t n,
                 float *y, int threads);
void f32_linear(const float *x, int64_t m_rows, int64_t k, const float *packed, int64_t n,
                const float *residual, float *y, int threads);

/* One layer's k (or v) cache as KVCache stores it, slot-major ([slots, Hk, ...]): kind KV_F32 (codes: fp32
 * values [slots, Hk, D]), KV_INT8 (int8 codes [slots, Hk, D], fp16 scale [slots, Hk]) or KV_INT4 (uint8
 * nibble pairs [slots, Hk, D / 2], fp16 scale and zero [slots, Hk, D / group]; `hadamard`: rows stored
 * rotated; `offset` [Hk, D]: keys stored minus it, else NULL). kernels/store_kv/quant.py is the format. */
enum { KV_F32 = 0, KV_INT8 = 1, KV_INT4 = 2 };
#define KV_MAX_HEAD_DIM 256  /* the quantized store's and reader's row buffers (step.py refuses more) */
typedef struct {
    int64_t kind, group, hadamard;
    void *codes;
    uint16_t *scale, *zero;
    const float *offset;
} cq_kv;

void cq_kv_store(const cq_kv *c, int64_t slot, const float *rows, int64_t hk, int64_t d);
void cq_kv_attend(const float *q, int64_t group, const cq_kv *k, const cq_kv *v, int64_t head,
                  const int64_t *blocks, int64_t bs, int64_t hk, int64_t seq_len, int64_t d, float *scores,
                  float *out);
void cq_kv_attend_heads(const float *q, int64_t group, const cq_kv *k, const cq_kv *v, const int64_t *blocks,
                        int64_t bs, int64_t hk, int64_t seq_len, int64_t d, float *out, int threads);

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* a . b over n floats (two AVX2 chains where built with them). */
static inline float dot(const float *a, const float *b, int64_t n) {
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
static inline void axpy(float a, const float *x, float *y, int64_t n) {
    int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 av = _mm256_set1_ps(a);
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
#endif
    for (; j < n; j++) y[j] += a * x[j];
}

#endif
