/* One decode token's KV rows into a quantized cache, and one query head's attention over such a cache: the
 * formats of kernels/store_kv/quant.py (its torch code is the reference), for the fused bs1 step
 * (decode_step.c).
 *
 * int8: per (token, KV head) symmetric codes, one fp16 scale. int4: per group of `group` values of a
 * (token, KV head) row, codes 0..15 two a byte (value 2j low nibble) on the grid code * scale + zero (fp16
 * scale and zero), the grid refitted INT4_REFIT_STEPS times by least squares; int4 rows are rotated by the
 * normalized Hadamard matrix H before quantizing (keys minus their calibrated offset first), and since H is
 * symmetric with H H = I, a reader rotates the query (q . (s H) = (q H) . s) and the attention output
 * (sum p (s H) = (sum p s) H) once instead of every cached row. Same math as the reference up to the order
 * of fp32 roundings in its sums and its matmul with H (tests/kernels/cpu_quant/test_cpu_kv_quant.py). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_quant.h"

#define INT8_MAX_CODE 127.0f
#define INT4_MAX_CODE 15.0f
#define MIN_SCALE 0x1p-14f   /* kernels/store_kv/quant.py MIN_SCALE: float16's smallest normal */
#define INT4_REFIT_STEPS 5   /* kernels/store_kv/quant.py INT4_REFIT_STEPS */

/* float -> IEEE half, rounded to nearest even (torch's .half()), subnormals and overflow included. */
static uint16_t float_to_half(float f) {
    uint32_t u, sign, magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    memcpy(&u, &f, 4);
    sign = u & 0x80000000u;
    u ^= sign;
    uint16_t out;
    if (u >= (127u + 16u) << 23) {  /* >= 65536 (or inf / nan) */
        out = u > 255u << 23 ? 0x7E00 : 0x7C00;
    } else if (u < 113u << 23) {  /* below 2^-14: a half subnormal (the FP add rounds it) or zero */
        float magic, x;
        memcpy(&magic, &magic_bits, 4);
        memcpy(&x, &u, 4);
        x += magic;
        memcpy(&u, &x, 4);
        out = (uint16_t)(u - magic_bits);
    } else {
        uint32_t odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xFFFu + odd;
        out = (uint16_t)(u >> 13);
    }
    return (uint16_t)(out | (sign >> 16));
}

/* x [d] (a power of two) times the normalized Sylvester Hadamard matrix, in place: butterflies, then
 * 1/sqrt(d). */
static void hadamard(float *x, int64_t d) {
    for (int64_t h = 1; h < d; h *= 2)
        for (int64_t i = 0; i < d; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    float norm = 1.0f / sqrtf((float)d);
    for (int64_t j = 0; j < d; j++) x[j] *= norm;
}

static void int4_codes(const float *x, int64_t n, float scale, float zero, float *q) {
    for (int64_t j = 0; j < n; j++) {
        float c = floorf((x[j] - zero) / scale + 0.5f);
        q[j] = c < 0.0f ? 0.0f : (c > INT4_MAX_CODE ? INT4_MAX_CODE : c);
    }
}

/* One group of n <= 256 values: codes q [n] (as floats) and the fp16 scale and zero (quantize_int4). */
static void int4_group(const float *x, int64_t n, float *q, uint16_t *scale16, uint16_t *zero16) {
    float low = x[0], high = x[0], sum = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        low = x[j] < low ? x[j] : low;
        high = x[j] > high ? x[j] : high;
        sum += x[j];
    }
    float scale_f = (high - low) / INT4_MAX_CODE;
    uint16_t s16 = float_to_half(scale_f < MIN_SCALE ? MIN_SCALE : scale_f), z16 = float_to_half(low);
    int4_codes(x, n, half_to_float(s16), half_to_float(z16), q);
    float mean = sum / (float)n;
    for (int step = 0; step < INT4_REFIT_STEPS; step++) {
        float q_sum = 0.0f;
        for (int64_t j = 0; j < n; j++) q_sum += q[j];
        float q_mean = q_sum / (float)n, var = 0.0f, cov = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            float dq = q[j] - q_mean;
            var += dq * dq;
            cov += dq * (x[j] - mean);
        }
        /* A group of one code (constant values) keeps its scale: any scale fits it. */
        float fitted = var > 0.0f ? cov / (var > 1e-9f ? var : 1e-9f) : half_to_float(s16);
        fitted = fitted < MIN_SCALE ? MIN_SCALE : fitted;
        s16 = float_to_half(fitted);
        z16 = float_to_half(mean - fitted * q_mean);
        int4_codes(x, n, half_to_float(s16), half_to_float(z16), q);
    }
    *scale16 = s16;
    *zero16 = z16;
}

void cq_kv_store(const cq_kv *c, int64_t slot, const float *rows, int64_t hk, int64_t d) {
    float x[256], q[256];
    for (int64_t head = 0; head < hk; head++) {
        const float *src = rows + head * d;
        int64_t row = slot * hk + head;
        if (c->kind == KV_F32) {
            memcpy((float *)c->codes + row * d, src, sizeof(float) * (size_t)d);
        } else if (c->kind == KV_INT8) {
            float amax = 0.0f;
            for (int64_t j = 0; j < d; j++) amax = fabsf(src[j]) > amax ? fabsf(src[j]) : amax;
            float scale_f = amax / INT8_MAX_CODE;
            uint16_t s16 = float_to_half(scale_f < MIN_SCALE ? MIN_SCALE : scale_f);
            float scale = half_to_float(s16);
            int8_t *codes = (int8_t *)c->codes + row * d;
            for (int64_t j = 0; j < d; j++) {
                float code = floorf(src[j] / scale + 0.5f);
                code = code < -INT8_MAX_CODE ? -INT8_MAX_CODE : code;
                codes[j] = (int8_t)(code > INT8_MAX_CODE ? INT8_MAX_CODE : code);
            }
            c->scale[row] = s16;
        } else {
            for (int64_t j = 0; j < d; j++) x[j] = c->offset ? src[j] - c->offset[head * d + j] : src[j];
            if (c->hadamard) hadamard(x, d);
            int64_t groups = d / c->group;
            for (int64_t g = 0; g < groups; g++)
                int4_group(x + g * c->group, c->group, q + g * c->group, c->scale + row * groups + g,
                           c->zero + row * groups + g);
            uint8_t *codes = (uint8_t *)c->codes + row * (d / 2);
            for (int64_t j = 0; j < d / 2; j++)
                codes[j] = (uint8_t)((int)q[2 * j] | ((int)q[2 * j + 1] << 4));
        }
    }
}

/* Row (slot, head) of a quantized cache as d floats, as stored (int4: still rotated). */
static void kv_row(const cq_kv *c, int64_t slot, int64_t head, int64_t hk, int64_t d, float *out) {
    int64_t row = slot * hk + head;
    if (c->kind == KV_INT8) {
        const int8_t *codes = (const int8_t *)c->codes + row * d;
        float scale = half_to_float(c->scale[row]);
        for (int64_t j = 0; j < d; j++) out[j] = (float)codes[j] * scale;
        return;
    }
    int64_t groups = d / c->group;
    const uint8_t *codes = (const uint8_t *)c->codes + row * (d / 2);
    for (int64_t g = 0; g < groups; g++) {
        float scale = half_to_float(c->scale[row * groups + g]);
        float zero = half_to_float(c->zero[row * groups + g]);
        for (int64_t j = g * c->group / 2; j < (g + 1) * c->group / 2; j++) {
            out[2 * j] = (float)(codes[j] & 0xF) * scale + zero;
            out[2 * j + 1] = (float)(codes[j] >> 4) * scale + zero;
        }
    }
}

/* The `group` query heads q [group, d] (softmax scale folded in) of KV head `head` over positions
 * 0 .. seq_len - 1 of a quantized cache, position t in slot blocks[t / bs] * bs + t % bs: softmax(q . k) . v
 * into out [group, d]. Each cached row is dequantized once for the group. scores: [group, seq_len]. */
void cq_kv_attend(const float *q_in, int64_t group, const cq_kv *k, const cq_kv *v, int64_t head,
                  const int64_t *blocks, int64_t bs, int64_t hk, int64_t seq_len, int64_t d, float *scores,
                  float *out) {
    float *q = malloc(sizeof(float) * (size_t)(group * d + d));
    float *row = q + group * d;
    memcpy(q, q_in, sizeof(float) * (size_t)(group * d));
    for (int64_t g = 0; g < group; g++)
        if (k->kind == KV_INT4 && k->hadamard) hadamard(q + g * d, d);
    for (int64_t t = 0; t < seq_len; t++) {
        kv_row(k, blocks[t / bs] * bs + t % bs, head, hk, d, row);
        for (int64_t g = 0; g < group; g++) scores[g * seq_len + t] = dot(q + g * d, row, d);
    }
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * seq_len, max = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < seq_len; t++) max = s[t] > max ? s[t] : max;
        for (int64_t t = 0; t < seq_len; t++) sum += s[t] = expf(s[t] - max);
        float inv = 1.0f / sum;
        for (int64_t t = 0; t < seq_len; t++) s[t] *= inv;
    }
    memset(out, 0, sizeof(float) * (size_t)(group * d));
    for (int64_t t = 0; t < seq_len; t++) {
        kv_row(v, blocks[t / bs] * bs + t % bs, head, hk, d, row);
        for (int64_t g = 0; g < group; g++) axpy(scores[g * seq_len + t], row, out + g * d, d);
    }
    for (int64_t g = 0; g < group; g++)
        if (v->kind == KV_INT4 && v->hadamard) hadamard(out + g * d, d);
    free(q);
}

/* n tokens' rows [n, hk, d] into slots[n] (FlatDecoder's batch rows; kernels/cpu_quant/kv_rows.py). */
void cq_kv_store_rows(const cq_kv *c, const int64_t *slots, int64_t n, const float *rows, int64_t hk,
                      int64_t d) {
    for (int64_t i = 0; i < n; i++) cq_kv_store(c, slots[i], rows + i * hk * d, hk, d);
}

/* One sequence's hk * group query heads q [hk * group, d] over positions 0 .. seq_len - 1 of its blocks: out
 * [hk * group, d]; KV heads over the threads. */
void cq_kv_attend_heads(const float *q, int64_t group, const cq_kv *k, const cq_kv *v, const int64_t *blocks,
                        int64_t bs, int64_t hk, int64_t seq_len, int64_t d, float *out, int threads) {
    float *scores = malloc(sizeof(float) * (size_t)(hk * group * seq_len));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t j = 0; j < hk; j++)
        cq_kv_attend(q + j * group * d, group, k, v, j, blocks, bs, hk, seq_len, d,
                     scores + j * group * seq_len, out + j * group * d);
    free(scores);
}
