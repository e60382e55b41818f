/* The bs1 decode step of Q4_1 / Q8_0 / fp32 layers in one call (kernels/cpu_quant/step.py). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_quant.h"

/* ---- The bs1 decode step of quantized layers in one call (engine/cpu_decode.py FlatDecoder) ----------
 *
 * At one sequence and one token a layer is 4 GEMVs and ~35 tiny ops (RMSNorm, RoPE, KV store, attention
 * over the context, silu * up, residual adds); as torch calls those cost more than the GEMVs at 2 threads.
 * Here they run in C between the GEMVs above (which alone use `threads`; the rest is one core's work of a
 * few microseconds a layer). Same math as FlatDecoder's torch path up to the order of fp32 roundings
 * (tests/kernels/cpu_quant/test_cpu_quant_step.py). */

typedef struct {  /* one projection: kind 0 = Q4_1 (w packed, d and m fp16), 1 = Q8_0 (w int8, d fp32),
                   * 2 = fp32 (w packed in row pairs for f32_linear) */
    int64_t kind, n, k;
    const void *w, *d, *m;
} cq_linear;

typedef struct {  /* one layer's weights and KV cache (cq_kv: fp32, int8 or int4, as KVCache holds it) */
    const float *norm_in, *norm_post;
    cq_linear qkv, o, gate_up, down;
    cq_kv k_cache, v_cache;
} cq_layer;

static void cq_gemv(const cq_linear *l, const float *x, float *y, int threads) {
    if (l->kind == 0)
        q4_1_linear(x, 1, l->k, l->w, l->d, l->m, l->n, y, threads);
    else if (l->kind == 1)
        q8_0_linear(x, 1, l->k, l->w, l->d, l->n, y, threads);
    else
        f32_linear(x, 1, l->k, l->w, l->n, NULL, y, threads);
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
        cq_kv_store(&L->k_cache, slot, qkv + hq * d, hk, d);
        cq_kv_store(&L->v_cache, slot, qkv + (hq + hk) * d, hk, d);
        /* Heads over the threads (a head's operations are the same on any thread count): ~30 ns a head
         * and position on one core; left serial, 1.5 of a 2-thread step's 4.8 ms at 200 positions. A
         * quantized cache goes by KV head: each cached row is dequantized once for its query heads. */
        if (L->k_cache.kind == KV_F32) {
            const float *keys = L->k_cache.codes, *values = L->v_cache.codes;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
            for (int64_t j = 0; j < hq; j++)
                attend(qkv + j * d, keys + j / group * d, values + j / group * d, blocks, block_size, row,
                       seq_len, d, scores + j * seq_len, attn + j * d);
        } else {
            cq_kv_attend_heads(qkv, group, &L->k_cache, &L->v_cache, blocks, block_size, hk, seq_len, d, attn,
                               threads);
        }
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
