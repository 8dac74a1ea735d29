/* RMSNorm of bf16 rows in one pass, with the very bits of transformers' op-by-op version on torch.

   transformers computes (LlamaRMSNorm) w * (x * rsqrt(mean(x^2) + eps)).to(bf16), or (Gemma3RMSNorm)
   (x * rsqrt(mean(x^2) + eps) * (1 + w)).to(bf16), all in float32: eight torch operations and as many
   tensors per norm, ~70 us each at decode sizes, 61 norms a step. Every step of it is one correctly
   rounded float32 operation except the sum, whose order is torch's: its CPU sum kernel (SumKernel.cpp:
   vectorized_inner_sum -> row_sum -> multi_row_sum) adds a contiguous row as 8-float vectors
   in 4 interleaved columns with a 4-level cascade, then the columns, then the tail, then the lanes.
   This is not trusted blindly: engine/native_norm.py compares the kernel with
   torch on random rows at load and keeps torch when a single bit differs (another torch, another
   vector width). Built with -ffp-contract=off: a fused multiply-add would round differently.

   x (rows, n) bf16, row stride ldx; out (rows, n) bf16, contiguous. kind 0: weight bf16 (n), applied
   after the rounding to bf16 (Llama); kind 1: scale float32 (n) = 1 + weight, applied before (Gemma 3). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define LANES 8 /* torch 2.13 sums float32 rows in 8-float vectors here, even on AVX-512: measured */
#define ILP 4
#define LEVELS 4

static int64_t ceil_log2(int64_t n) {
    int64_t log = 0;
    while (((int64_t)1 << log) < n) log++;
    return log;
}

/* acc[k] += vector (i * ILP + k) of sq, lane by lane */
static inline void add_vectors(float acc[ILP][LANES], const float *sq, int64_t i) {
    for (int k = 0; k < ILP; k++)
        for (int l = 0; l < LANES; l++) acc[k][l] += sq[(i * ILP + k) * LANES + l];
}

/* torch's float32 sum of sq[0..n) (contiguous), in its order */
static float torch_sum(const float *sq, int64_t n) {
    const int64_t num_vectors = n / LANES, size = num_vectors / ILP;
    const int64_t level_power = ceil_log2(size) / LEVELS > 4 ? ceil_log2(size) / LEVELS : 4;
    const int64_t level_step = (int64_t)1 << level_power, level_mask = level_step - 1;
    float acc[LEVELS][ILP][LANES];
    memset(acc, 0, sizeof acc);
    int64_t i = 0;
    while (i + level_step <= size) {
        for (int64_t j = 0; j < level_step; j++, i++) add_vectors(acc[0], sq, i);
        for (int j = 1; j < LEVELS; j++) {
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < LANES; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if ((i & (level_mask << (j * level_power))) != 0) break;
        }
    }
    for (; i < size; i++) add_vectors(acc[0], sq, i);
    for (int j = 1; j < LEVELS; j++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < LANES; l++) acc[0][k][l] += acc[j][k][l];
    for (int64_t v = size * ILP; v < num_vectors; v++)
        for (int l = 0; l < LANES; l++) acc[0][0][l] += sq[v * LANES + l];
    for (int k = 1; k < ILP; k++)
        for (int l = 0; l < LANES; l++) acc[0][0][l] += acc[0][k][l];
    float total = 0.0f;
    for (int64_t e = num_vectors * LANES; e < n; e++) total += sq[e];
    for (int l = 0; l < LANES; l++) total += acc[0][0][l];
    return total;
}

/* The vector width the compiler targeted (the code is plain C, vectorized by the compiler). */
const char *rms_norm_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "generic";
#endif
}

/* One row: the float32 row and its squares in `xf` and `sq` (n floats each, the caller's scratch). */
static void norm_row(int kind, const uint16_t *xr, int64_t n, const void *weight, float eps, uint16_t *o,
                     float *xf, float *sq) {
    for (int64_t e = 0; e < n; e++) {
        xf[e] = bf16_to_f32(xr[e]);
        sq[e] = xf[e] * xf[e];
    }
    const float variance = torch_sum(sq, n) / (float)n;
    const float inv = 1.0f / sqrtf(variance + eps);
    if (kind == 0) {
        const uint16_t *w = (const uint16_t *)weight;
        for (int64_t e = 0; e < n; e++) {
            const float normed = bf16_to_f32(f32_to_bf16(xf[e] * inv));
            o[e] = f32_to_bf16(bf16_to_f32(w[e]) * normed);
        }
    } else {
        const float *scale = (const float *)weight;
        for (int64_t e = 0; e < n; e++) o[e] = f32_to_bf16((xf[e] * inv) * scale[e]);
    }
}

/* Rows are independent (each is the same arithmetic whichever thread runs it), so a batch of at least
   PARALLEL_ROWS rows is split over the threads; fewer rows are not worth waking them. */
#define PARALLEL_ROWS 16

int rms_norm(int kind, const uint16_t *x, int64_t rows, int64_t n, int64_t ldx, const void *weight,
             float eps, uint16_t *out) {
    int failed = 0;
#pragma omp parallel if (rows >= PARALLEL_ROWS) reduction(| : failed)
    {
        float *xf = malloc(2 * (size_t)n * sizeof(float));
        if (xf == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            if (xf != NULL) norm_row(kind, x + r * ldx, n, weight, eps, out + r * n, xf, xf + n);
        free(xf);
    }
    return failed ? -1 : 0;
}
