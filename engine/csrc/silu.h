/* silu(gate) * up on bf16 values with the bits of transformers' `act_fn(gate) * up` on torch 2.13.

   torch's CPU SiLU on bf16 computes, in float32, x / (1 + exp(-x)) with exp = SLEEF's expf_u10 (its
   vectorized path, in its AVX2 and AVX-512 builds alike), rounds to bf16 (nearest even; any NaN to
   0xffff); the multiply widens both bf16 factors (their product is exact in float32) and rounds the
   same way. sleef_expf below is SLEEF's algorithm operation for operation, its multiply-adds fused
   (fmaf), as SLEEF's builds for FMA CPUs compute them; no other multiply meets an add, so the
   compiler's contraction cannot change a rounding. Checked against torch on all 65,536 bf16 gate
   values (engine/native_linear.py, at load and in tests/engine/test_native_linear.py). */
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

/* out[r][i] = silu(gate[r][i]) * up[r][i] for rows r < rows, i < n; row strides ldg, ldu, ldo */
/* (512-bit vectors where the CPU has them: the compiler picks 256 by default) */
__attribute__((noinline, target("prefer-vector-width=512"))) static void silu_mul_rows(
    const uint16_t *gate, int64_t ldg, const uint16_t *up, int64_t ldu, int64_t rows, int64_t n, uint16_t *out,
    int64_t ldo) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gate + r * ldg, *v = up + r * ldu;
        uint16_t *o = out + r * ldo;
        for (int64_t i = 0; i < n; i++) {
            const float x = bf16_to_f32(g[i]);
            const float silu = bf16_to_f32(f32_to_bf16_vec(x / (1.0f + sleef_expf(-x))));
            o[i] = f32_to_bf16_vec(silu * bf16_to_f32(v[i]));
        }
    }
}

#endif
