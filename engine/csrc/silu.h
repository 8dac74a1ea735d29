/* silu(gate) * up on bf16 values with the bits of transformers' `act_fn(gate) * up` on torch 2.13.

   torch's CPU SiLU on bf16 computes, in float32, x / (1 + exp(-x)) with exp = SLEEF's expf_u10 (its
   vectorized path, in its AVX2 and AVX-512 builds alike), rounds to bf16 (nearest even; any NaN to
   0xffff); the multiply widens both bf16 factors (their product is exact in float32) and rounds the
   same way. sleef_expf below is SLEEF's algorithm operation for operation, its multiply-adds fused
   (fmaf), as SLEEF's builds for FMA CPUs compute them; no other multiply meets an add, so the
   compiler's contraction cannot change a rounding. Checked against torch on all 65,536 bf16 gate
   values (engine/product_kernel.py, at load and in tests/engine/test_native_linear.py). */
#ifndef LLMSERVE_SILU_H
#define LLMSERVE_SILU_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

static inline float silu_as_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* SLEEF 3.x xexpf (u10): e^d */
static inline float sleef_expf(float d) {
    const float q = rintf(d * 1.442695040888963407359924681001892137426645954152985934135449406931f);
    const int32_t qi = (int32_t)q;
    float s = fmaf(q, -0.693145751953125f, d);
    s = fmaf(q, -1.428606765330187045e-06f, s);
    float u = 0.000198527617612853646278381f;
    u = fmaf(u, s, 0.00139304355252534151077271f);
    u = fmaf(u, s, 0.00833336077630519866943359f);
    u = fmaf(u, s, 0.0416664853692054748535156f);
    u = fmaf(u, s, 0.166666671633720397949219f);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    /* ldexp in two halves, as SLEEF's vldexp2: u * 2^(q >> 1) * 2^(q - (q >> 1)) */
    const int32_t half = qi >> 1;
    u = u * silu_as_float((uint32_t)(half + 0x7f) << 23) * silu_as_float((uint32_t)(qi - half + 0x7f) << 23);
    u = d < -104.0f ? 0.0f : u;
    u = 100.0f < d ? INFINITY : u;
    return d != d ? silu_as_float(0xffffffffu) : u;
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(SILU_SCALAR) /* -DSILU_SCALAR: the scalar loop only (A/B) */
#include <immintrin.h>

/* sleef_expf on 8 lanes: the same operations in the same order (GCC leaves the scalar loop below
   unvectorized: ~7 ns an element on one Zen 3 core, a tenth of a 252-token prefill step's time) */
static inline __m256 sleef_expf8(__m256 d) {
    const __m256 q = _mm256_round_ps(
        _mm256_mul_ps(d, _mm256_set1_ps(1.442695040888963407359924681001892137426645954152985934135449406931f)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i qi = _mm256_cvttps_epi32(q);
    __m256 s = _mm256_fmadd_ps(q, _mm256_set1_ps(-0.693145751953125f), d);
    s = _mm256_fmadd_ps(q, _mm256_set1_ps(-1.428606765330187045e-06f), s);
    __m256 u = _mm256_set1_ps(0.000198527617612853646278381f);
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00139304355252534151077271f));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00833336077630519866943359f));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.0416664853692054748535156f));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.166666671633720397949219f));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.5f));
    u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
    const __m256i half = _mm256_srai_epi32(qi, 1), bias = _mm256_set1_epi32(0x7f);
    const __m256 low = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(qi, half), bias), 23));
    u = _mm256_mul_ps(_mm256_mul_ps(u, low), high);
    u = _mm256_blendv_ps(u, _mm256_setzero_ps(), _mm256_cmp_ps(d, _mm256_set1_ps(-104.0f), _CMP_LT_OQ));
    u = _mm256_blendv_ps(u, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(_mm256_set1_ps(100.0f), d, _CMP_LT_OQ));
    return _mm256_blendv_ps(u, _mm256_castsi256_ps(_mm256_set1_epi32(-1)), _mm256_cmp_ps(d, d, _CMP_UNORD_Q));
}

/* f32_to_bf16_vec on 8 lanes, each result in the low half of its 32-bit lane */
static inline __m256i f32x8_to_bf16_vec(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0xffff), _mm256_castps_si256(nan));
}

/* elements [0, n - n % 8) of one row; returns how many it did */
static inline int64_t silu_mul_row8(const uint16_t *g, const uint16_t *v, uint16_t *o, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 x = bf16x8_to_f32(g + i);
        const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, sleef_expf8(_mm256_xor_ps(x, sign))));
        const __m256 rounded = _mm256_castsi256_ps(_mm256_slli_epi32(f32x8_to_bf16_vec(silu), 16));
        const __m256i product = f32x8_to_bf16_vec(_mm256_mul_ps(rounded, bf16x8_to_f32(v + i)));
        const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(product), _mm256_extracti128_si256(product, 1));
        _mm_storeu_si128((__m128i *)(o + i), packed);
    }
    return i;
}
#else
static inline int64_t silu_mul_row8(const uint16_t *g, const uint16_t *v, uint16_t *o, int64_t n) {
    (void)g; (void)v; (void)o; (void)n;
    return 0;
}
#endif

#if defined(__AVX512F__) && !defined(SILU_SCALAR) && !defined(SILU_AVX2) /* -DSILU_AVX2: 8 lanes at most (A/B) */
/* sleef_expf8's operations on 16 lanes (512-bit registers: twice the elements an instruction where the
   CPU runs them at full width, as AMD Zen 5 and Intel's AVX-512 server cores do) */
static inline __m512 sleef_expf16(__m512 d) {
    const __m512 q = _mm512_roundscale_ps(
        _mm512_mul_ps(d, _mm512_set1_ps(1.442695040888963407359924681001892137426645954152985934135449406931f)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i qi = _mm512_cvttps_epi32(q);
    __m512 s = _mm512_fmadd_ps(q, _mm512_set1_ps(-0.693145751953125f), d);
    s = _mm512_fmadd_ps(q, _mm512_set1_ps(-1.428606765330187045e-06f), s);
    __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00139304355252534151077271f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00833336077630519866943359f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.0416664853692054748535156f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.166666671633720397949219f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
    u = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
    const __m512i half = _mm512_srai_epi32(qi, 1), bias = _mm512_set1_epi32(0x7f);
    const __m512 low = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(half, bias), 23));
    const __m512 high = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(qi, half), bias), 23));
    u = _mm512_mul_ps(_mm512_mul_ps(u, low), high);
    u = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.0f), _CMP_LT_OQ), u, _mm512_setzero_ps());
    u = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_set1_ps(100.0f), d, _CMP_LT_OQ), u, _mm512_set1_ps(INFINITY));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q), u, _mm512_castsi512_ps(_mm512_set1_epi32(-1)));
}

/* elements [0, n - n % 16) of one row, as silu_mul_row8; returns how many it did */
static inline int64_t silu_mul_row16(const uint16_t *g, const uint16_t *v, uint16_t *o, int64_t n) {
    int64_t i = 0;
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    for (; i + 16 <= n; i += 16) {
        const __m512 x = bf16x16_to_f32(g + i);
        const __m512 minus_x = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), sign));
        const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(one, sleef_expf16(minus_x)));
        const __m512 rounded = _mm512_castsi512_ps(_mm512_slli_epi32(f32x16_to_bf16_vec(silu), 16));
        const __m512i product = f32x16_to_bf16_vec(_mm512_mul_ps(rounded, bf16x16_to_f32(v + i)));
        _mm256_storeu_si256((__m256i *)(o + i), _mm512_cvtepi32_epi16(product));
    }
    return i;
}
#else
static inline int64_t silu_mul_row16(const uint16_t *g, const uint16_t *v, uint16_t *o, int64_t n) {
    (void)g; (void)v; (void)o; (void)n;
    return 0;
}
#endif

/* out[r][i] = silu(gate[r][i]) * up[r][i] for rows r < rows, i < n; row strides ldg, ldu, ldo: 16 lanes
   at a time with AVX-512, then 8 with AVX2, the rest (and everything without them) one at a time */
__attribute__((noinline)) static void silu_mul_rows(const uint16_t *gate, int64_t ldg, const uint16_t *up,
                                                    int64_t ldu, int64_t rows, int64_t n, uint16_t *out,
                                                    int64_t ldo) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gate + r * ldg, *v = up + r * ldu;
        uint16_t *o = out + r * ldo;
        int64_t i = silu_mul_row16(g, v, o, n);
        for (i += silu_mul_row8(g + i, v + i, o + i, n - i); i < n; i++) {
            const float x = bf16_to_f32(g[i]);
            const float silu = bf16_to_f32(f32_to_bf16_vec(x / (1.0f + sleef_expf(-x))));
            o[i] = f32_to_bf16_vec(silu * bf16_to_f32(v[i]));
        }
    }
}

#endif
