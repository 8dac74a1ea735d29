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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAVE_AVX512_ROTARY 1

/* v rounded to bf16 as f32_to_bf16 rounds (nearest even, NaN kept NaN), as float32 again. */
static inline __m512 round_bf16x16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(f32x16_to_bf16(v), 16));
}

static inline void store_bf16x16(uint16_t *dst, __m512 rounded) {
    _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16)));
}

static inline __m512 negate(__m512 v) {  /* the sign bit flipped, as -x is (0 - x would turn -0 into +0) */
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32((int)0x80000000u)));
}

/* rotate_head, sixteen lanes at a time (half a multiple of 16): the same roundings, the same bits. */
static inline void rotate_head_avx512(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t head_dim) {
    const int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; i += 16) {
        const __m512 lo = bf16x16_to_f32(x + i), hi = bf16x16_to_f32(x + i + half);
        const __m512 a = round_bf16x16(_mm512_mul_ps(lo, bf16x16_to_f32(cos + i)));
        const __m512 b = round_bf16x16(_mm512_mul_ps(negate(hi), bf16x16_to_f32(sin + i)));
        const __m512 c = round_bf16x16(_mm512_mul_ps(hi, bf16x16_to_f32(cos + i + half)));
        const __m512 d = round_bf16x16(_mm512_mul_ps(lo, bf16x16_to_f32(sin + i + half)));
        store_bf16x16(x + i, round_bf16x16(_mm512_add_ps(a, b)));
        store_bf16x16(x + i + half, round_bf16x16(_mm512_add_ps(c, d)));
    }
}
#endif

const char *rotary_kv_isa(void) {
#ifdef HAVE_AVX512_ROTARY
    return "avx512f";
#else
    return "generic";
#endif
}

int rotary_kv(const uint16_t *cos, const uint16_t *sin, uint16_t *qkv, int64_t num_tokens, int64_t row_stride,
              int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, const int64_t *slots,
              uint16_t *k_cache, uint16_t *v_cache) {
    if (head_dim > MAX_HEAD_DIM || head_dim % 2) return -1;
    const int64_t kv_width = num_kv_heads * head_dim;
#pragma omp parallel for schedule(static) if (num_tokens >= 64)
    for (int64_t t = 0; t < num_tokens; t++) {
        uint16_t *row = qkv + t * row_stride;
        const uint16_t *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < num_q_heads + num_kv_heads; h++) {
#ifdef HAVE_AVX512_ROTARY
            if (head_dim % 32 == 0) {
                rotate_head_avx512(row + h * head_dim, c, s, head_dim);
                continue;
            }
#endif
            rotate_head(row + h * head_dim, c, s, head_dim);
        }
        const uint16_t *k = row + num_q_heads * head_dim, *v = k + kv_width;
        memcpy(k_cache + slots[t] * kv_width, k, sizeof(uint16_t) * (size_t)kv_width);
        memcpy(v_cache + slots[t] * kv_width, v, sizeof(uint16_t) * (size_t)kv_width);
    }
    return 0;
}
