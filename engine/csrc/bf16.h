/* bfloat16 <-> float32 for the engine's C kernels: exact widening, and rounding to nearest even
   (NaN kept NaN) as torch rounds. */
#ifndef LLMSERVE_BF16_H
#define LLMSERVE_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* float32 -> bf16 as torch's vectorized CPU kernels round (SiLU, a bf16 add): nearest even, any NaN as
   0xffff (f32_to_bf16 keeps the NaN's sign and payload, as torch's scalar conversion does) */
static inline uint16_t f32_to_bf16_vec(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0xffffu : rounded;
}

/* residual[r][i] = bf16(residual[r][i] + y[r][i]) as torch adds two bf16 tensors in its vectorized
   kernel: the float32 sum, rounded by f32_to_bf16_vec (the products' residual-add epilogue) */
static inline void add_rows(const uint16_t *y, int64_t ldy, uint16_t *residual, int64_t ldr, int64_t rows,
                            int64_t n) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *a = y + r * ldy;
        uint16_t *o = residual + r * ldr;
        for (int64_t i = 0; i < n; i++) o[i] = f32_to_bf16_vec(bf16_to_f32(o[i]) + bf16_to_f32(a[i]));
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* 16 bf16 values -> 16 float32 (exact) */
static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* 16 float32 rounded to bf16, nearest even, each in the low half of its 32-bit lane; NaN lanes as the
   two functions below say */
static inline __m512i f32x16_round_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
}

/* f32_to_bf16 on 16 lanes (NaN kept NaN, quieted), each result in the low half of its 32-bit lane */
static inline __m512i f32x16_to_bf16(__m512 v) {
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x40));
    return _mm512_mask_mov_epi32(f32x16_round_bits(v), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet);
}

/* f32_to_bf16_vec on 16 lanes (any NaN 0xffff), each result in the low half of its 32-bit lane */
static inline __m512i f32x16_to_bf16_vec(__m512 v) {
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), f32x16_round_bits(v),
                                   _mm512_set1_epi32(0xffff));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* y[n .. min(n + 16, N)) = v rounded to bf16 as f32_to_bf16 rounds (nearest even, NaN kept NaN), for
   CPUs without AVX512-BF16's conversion; nothing when n >= N. */
static inline void f32x16_store_bf16(__m512 v, uint16_t *y, int64_t n, int64_t N) {
    const int64_t left = N - n;
    if (left <= 0) return;
    const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
    _mm256_mask_storeu_epi16(y + n, mask, _mm512_cvtepi32_epi16(f32x16_to_bf16(v)));
}
#endif

#if defined(__AVX2__)
#include <immintrin.h>

/* 8 bf16 values -> 8 float32 (exact) */
static inline __m256 bf16x8_to_f32(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif

#endif
