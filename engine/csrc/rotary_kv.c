/* Rotary position embedding on a step's fused q/k/v product, and its k and v written into the paged
   KV cache: one call a layer in place of torch's five rotary operations and two cache writes.

   qkv: (num_tokens rows, row_stride bf16 values apart), each row num_q_heads + 2 * num_kv_heads heads of
   head_dim values: q heads, then k heads, then v heads. cos and sin: (num_tokens, head_dim) bf16. The q
   and k heads are rotated in place as transformers' apply_rotary_pos_emb computes them in bf16:
   x * cos + rotate_half(x) * sin, each product rounded to bf16 and then their sum, so the bits are
   torch's (engine/native_rotary.py checks that at load). Each token's rotated k heads and its v heads
   are then copied to slot slots[t] of k_cache and v_cache ((num_slots, num_kv_heads, head_dim) bf16).
   Built without FMA contraction (a product must round before the sum). Returns 0. */

#include <stdint.h>
#include <string.h>

#include "bf16.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_HEAD_DIM 512

static inline void rotate_head(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t head_dim) {
    const int64_t half = head_dim / 2;
    float lo[MAX_HEAD_DIM / 2], hi[MAX_HEAD_DIM / 2];
    for (int64_t i = 0; i < half; i++) {
        lo[i] = bf16_to_f32(x[i]);
        hi[i] = bf16_to_f32(x[i + half]);
    }
    for (int64_t i = 0; i < half; i++) {
        /* rotate_half(x) = cat(-x[half:], x[:half]) */
        const float a = bf16_to_f32(f32_to_bf16(lo[i] * bf16_to_f32(cos[i])));
        const float b = bf16_to_f32(f32_to_bf16(-hi[i] * bf16_to_f32(sin[i])));
        const float c = bf16_to_f32(f32_to_bf16(hi[i] * bf16_to_f32(cos[i + half])));
        const float d = bf16_to_f32(f32_to_bf16(lo[i] * bf16_to_f32(sin[i + half])));
        x[i] = f32_to_bf16(a + b);
        x[i + half] = f32_to_bf16(c + d);
    }
}

const char *rotary_kv_isa(void) { return "generic"; }

int rotary_kv(const uint16_t *cos, const uint16_t *sin, uint16_t *qkv, int64_t num_tokens, int64_t row_stride,
              int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, const int64_t *slots,
              uint16_t *k_cache, uint16_t *v_cache) {
    if (head_dim > MAX_HEAD_DIM || head_dim % 2) return -1;
    const int64_t kv_width = num_kv_heads * head_dim;
#pragma omp parallel for schedule(static) if (num_tokens >= 64)
    for (int64_t t = 0; t < num_tokens; t++) {
        uint16_t *row = qkv + t * row_stride;
        const uint16_t *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < num_q_heads + num_kv_heads; h++) rotate_head(row + h * head_dim, c, s, head_dim);
        const uint16_t *k = row + num_q_heads * head_dim, *v = k + kv_width;
        memcpy(k_cache + slots[t] * kv_width, k, sizeof(uint16_t) * (size_t)kv_width);
        memcpy(v_cache + slots[t] * kv_width, v, sizeof(uint16_t) * (size_t)kv_width);
    }
    return 0;
}
