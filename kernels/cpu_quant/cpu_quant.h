/* What the kernels/cpu_quant sources share: the quantized products (cpu_quant.c) that the fused decode step
 * (decode_step.c) calls, and the AVX2 horizontal sum. */
#ifndef CPU_QUANT_H
#define CPU_QUANT_H

#include <stdint.h>

void q4_1_linear(const float *x, int64_t m_rows, int64_t k, const uint8_t *packed, const uint16_t *d,
                 const uint16_t *mins, int64_t n, float *y, int threads);
void q8_0_linear(const float *x, int64_t m_rows, int64_t k, const int8_t *q, const float *d, int64_t n,
                 float *y, int threads);

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#endif
