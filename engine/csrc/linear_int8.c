/* y = x W^T (+ bias) with int8 weights and int8 activations, for CPUs: bf16 rows in, bf16 rows out.

   Why: on a CPU without a bf16 dot product (Intel before Sapphire Rapids' AMX / Cooper Lake, AMD before
   Zen 4) the bf16 kernel (linear_bf16.c) widens every weight to float32 and runs at the float32 FMA
   peak. AVX512-VNNI's vpdpbusd multiplies 64 byte pairs an instruction, twice the float32 FMA's 32
   products a cycle here, and int8 weights are half the bytes of bf16 for the memory-bound one-row steps.

   Numbers: weights and inputs are quantized in groups of GROUP consecutive k, symmetric, each group
   with its own float32 scale max|group| / 127: the weights once at load (engine/native_int8.py: pack;
   sw[g][n] for column n), each input row here at every call, q = rint(x * (127 / max|x_g|)) in
   [-127, 127] with scale sx[r][g] (one scale per row, or per column, lost too much: one large value
   flattens the rest of its row to a few levels). Then
       y[r][n] = sum over groups g, in order, of float(sum_{k in g} q[r][k] * wq[n][k]) * (sx[r][g] * sw[g][n])
                 (+ bias[n]),
   each group's sum exact in int32, the float sum over the groups by fused multiply-adds in ascending
   order, then rounded to bf16 as torch rounds. Every path below (VNNI, AVX2, plain C) computes exactly
   this: the same bits in every build, and a row's bits never depend on the batch (its scales are its own).

   VNNI multiplies unsigned by signed bytes: the weights are stored as wq + 128 (1..255) and each
   group's sum is corrected by 128 * sum_{k in g} q[r][k], computed with the row's quantization.

   Layouts: x (M, K) bf16 with row stride ldx; y (M, N) bf16 with row stride ldy; bias float32 (N) or
   NULL. The weight: [ceil(N/16) blocks][Kp/4][16 columns][4 k] uint8 = wq + 128, with K padded to Kp, a
   multiple of GROUP, and N to a multiple of 16 (padding: 128, a zero weight); scales float32
   (Kp / GROUP, Np) with Np = N padded to 16.
   Work is split in units of UNIT column blocks taken by the threads as they come free, tiles of up to
   ROWS rows x TILE_BLOCKS blocks inside. */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define BLOCK 16
#define GROUP 32 /* k per activation scale (engine/native_int8.py: GROUP) */
#define MAX_K 65536

/* Rows quantized once a call: q (M, Kp) int8, per (row, group) its scale and 128 * its sum. */
typedef struct {
    int8_t *q;
    float *scale;
    int32_t *comp;
    int64_t ld, groups;
} rows_t;

static void release_rows(rows_t *rows) {
    free(rows->q);
    free(rows->scale);
    free(rows->comp);
}

static int quantize_rows(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, rows_t *rows) {
    const int64_t groups = (K + GROUP - 1) / GROUP, ld = groups * GROUP;
    rows->q = malloc((size_t)(M * ld));
    rows->scale = malloc((size_t)(M * groups) * sizeof(float));
    rows->comp = malloc((size_t)(M * groups) * sizeof(int32_t));
    rows->ld = ld;
    rows->groups = groups;
    if (!rows->q || !rows->scale || !rows->comp) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t k0 = g * GROUP, k1 = k0 + GROUP < K ? k0 + GROUP : K;
            const uint16_t *xr = x + m * ldx;
            float top = 0.0f;
            int finite = 1;
            for (int64_t k = k0; k < k1; k++) {
                const float a = fabsf(bf16_to_f32(xr[k]));
                finite &= a <= FLT_MAX; /* false for infinity and NaN */
                top = a > top ? a : top;
            }
            /* a NaN or infinity: the group's scale is NaN, so the row's outputs are NaN (as a float
               product's would be) */
            const float inv = finite && top > 0.0f ? 127.0f / top : 0.0f;
            int8_t *q = rows->q + m * ld;
            int32_t sum = 0;
            for (int64_t k = k0; k < k0 + GROUP; k++) {
                float v = k < k1 ? rintf(bf16_to_f32(xr[k]) * inv) : 0.0f;
                v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
                q[k] = (int8_t)v;
                sum += q[k];
            }
            rows->scale[m * groups + g] = finite ? top / 127.0f : NAN;
            rows->comp[m * groups + g] = 128 * sum;
        }
    return 0;
}

/* y[r][n] from the float sum over the groups */
static inline float finish(float acc, const float *bias, int64_t n) { return bias ? acc + bias[n] : acc; }

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#define ISA_NAME "avx512vnni"
#ifndef UNIT
#define UNIT 6
#endif
#ifndef ROWS
#define ROWS 4
#endif
#define MAX_BLOCKS 6
#ifndef TILE_BLOCKS_1
#define TILE_BLOCKS_1 6
#define TILE_BLOCKS_2 6
#define TILE_BLOCKS_3 3
#define TILE_BLOCKS_4 3
#endif

static inline __attribute__((always_inline)) void tile(const int R, const int C, const rows_t *rows, int64_t m0,
                                                       const uint8_t *w, int64_t K4, const float *sw,
                                                       int64_t ldw, const float *bias, uint16_t *y, int64_t ldy,
                                                       int64_t n0, int64_t N) {
    __m512 acc[ROWS][MAX_BLOCKS];
    const int64_t block_stride = K4 * 4 * BLOCK;
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < rows->groups; g++) {
        __m512i sums[ROWS][MAX_BLOCKS];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 6
            for (int c = 0; c < C; c++) sums[r][c] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int64_t k4 = g * (GROUP / 4); k4 < (g + 1) * (GROUP / 4); k4++) {
            __m512i wv[MAX_BLOCKS];
#pragma GCC unroll 6
            for (int c = 0; c < C; c++) wv[c] = _mm512_loadu_si512(w + c * block_stride + k4 * 4 * BLOCK);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                int32_t quad;
                memcpy(&quad, rows->q + (m0 + r) * rows->ld + 4 * k4, sizeof quad);
                const __m512i xv = _mm512_set1_epi32(quad);
#pragma GCC unroll 6
                for (int c = 0; c < C; c++) sums[r][c] = _mm512_dpbusd_epi32(sums[r][c], wv[c], xv);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const int64_t i = (m0 + r) * rows->groups + g;
            const __m512i comp = _mm512_set1_epi32(rows->comp[i]);
            const __m512 sx = _mm512_set1_ps(rows->scale[i]);
#pragma GCC unroll 6
            for (int c = 0; c < C; c++) {
                const __m512 scale = _mm512_mul_ps(sx, _mm512_loadu_ps(sw + g * ldw + n0 + c * BLOCK));
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sums[r][c], comp)), scale, acc[r][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int c = 0; c < C; c++) {
            const int64_t n = n0 + c * BLOCK;
            if (n >= N) break;
            const int64_t left = N - n;
            const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
            __m512 v = acc[r][c];
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + n));
            f32x16_store_bf16(v, y + r * ldy, n, N);
        }
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* AVX2 without VNNI: the weights widened to int16 (wq + 128 - 128) and multiplied by the int16 rows in
   pairs (vpmaddwd), 8 int32 sums a vector: each group's exact sum, as VNNI's. */
#define ISA_NAME "avx2"
#define UNIT 6
#define ROWS 2
#define MAX_BLOCKS 1
#define TILE_BLOCKS_1 1
#define TILE_BLOCKS_2 1

static inline __attribute__((always_inline)) void tile(const int R, const int C, const rows_t *rows, int64_t m0,
                                                       const uint8_t *w, int64_t K4, const float *sw,
                                                       int64_t ldw, const float *bias, uint16_t *y, int64_t ldy,
                                                       int64_t n0, int64_t N) {
    (void)C; /* one block a tile */
    __m256 acc[ROWS][2];
    const __m256i low = _mm256_set1_epi16(0xff), offset = _mm256_set1_epi16(128);
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < rows->groups; g++) {
        __m256i sums[ROWS][2];
        for (int r = 0; r < R; r++) sums[r][0] = sums[r][1] = _mm256_setzero_si256();
        for (int64_t k4 = g * (GROUP / 4); k4 < (g + 1) * (GROUP / 4); k4++) {
            /* 32 bytes: 8 columns, each a 32-bit lane of its 4 k (bytes k0 k1 k2 k3), as int16 pairs:
               w02 = (k0, k2) and w13 = (k1, k3), minus the offset */
            __m256i w02[2], w13[2];
            for (int h = 0; h < 2; h++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + k4 * 4 * BLOCK + 32 * h));
                w02[h] = _mm256_sub_epi16(_mm256_and_si256(raw, low), offset);
                w13[h] = _mm256_sub_epi16(_mm256_srli_epi16(raw, 8), offset);
            }
            for (int r = 0; r < R; r++) {
                const int8_t *qr = rows->q + (m0 + r) * rows->ld + 4 * k4;
                const __m256i x02 = _mm256_set1_epi32((int32_t)((uint32_t)(uint16_t)qr[0] | ((uint32_t)(uint16_t)qr[2] << 16)));
                const __m256i x13 = _mm256_set1_epi32((int32_t)((uint32_t)(uint16_t)qr[1] | ((uint32_t)(uint16_t)qr[3] << 16)));
                for (int h = 0; h < 2; h++)
                    sums[r][h] = _mm256_add_epi32(sums[r][h], _mm256_add_epi32(_mm256_madd_epi16(x02, w02[h]),
                                                                                _mm256_madd_epi16(x13, w13[h])));
            }
        }
        for (int r = 0; r < R; r++) {
            const __m256 sx = _mm256_set1_ps(rows->scale[(m0 + r) * rows->groups + g]);
            for (int h = 0; h < 2; h++) { /* no offset to undo: the weights were widened without it */
                const __m256 scale = _mm256_mul_ps(sx, _mm256_loadu_ps(sw + g * ldw + n0 + 8 * h));
                acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][h]), scale, acc[r][h]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++) {
            float out[8];
            _mm256_storeu_ps(out, acc[r][h]);
            for (int j = 0; j < 8; j++) {
                const int64_t n = n0 + 8 * h + j;
                if (n < N) y[r * ldy + n] = f32_to_bf16(finish(out[j], bias, n));
            }
        }
    (void)K4;
}

#else /* plain C: the same sums */
#define ISA_NAME "generic"
#define UNIT 6
#define ROWS 1
#define TILE_BLOCKS_1 1

static void tile(const int R, const int C, const rows_t *rows, int64_t m0, const uint8_t *w, int64_t K4,
                 const float *sw, int64_t ldw, const float *bias, uint16_t *y, int64_t ldy, int64_t n0, int64_t N) {
    const int64_t block_stride = K4 * 4 * BLOCK;
    for (int r = 0; r < R; r++) {
        const int8_t *q = rows->q + (m0 + r) * rows->ld;
        for (int c = 0; c < C; c++)
            for (int j = 0; j < BLOCK; j++) {
                const int64_t n = n0 + c * BLOCK + j;
                if (n >= N) continue;
                const uint8_t *wb = w + c * block_stride + 4 * j;
                float acc = 0.0f;
                for (int64_t g = 0; g < rows->groups; g++) {
                    int32_t sum = 0;
                    for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k++)
                        sum += (int32_t)q[k] * ((int32_t)wb[(k / 4) * 4 * BLOCK + k % 4] - 128);
                    acc = fmaf((float)sum, rows->scale[(m0 + r) * rows->groups + g] * sw[g * ldw + n], acc);
                }
                y[r * ldy + n] = f32_to_bf16(finish(acc, bias, n));
            }
    }
}
#endif

/* Blocks [b0, b1) for R rows, B blocks a tile, then the blocks left one at a time. */
#define TILES(R, B)                                                                                    \
    do {                                                                                               \
        int64_t b = b0;                                                                                \
        for (; b + (B) <= b1; b += (B))                                                                \
            tile(R, B, rows, m0, w + b * K4 * 4 * BLOCK, K4, sw, ldw, bias, y, ldy, b * BLOCK, N);    \
        for (; b < b1; b++) tile(R, 1, rows, m0, w + b * K4 * 4 * BLOCK, K4, sw, ldw, bias, y, ldy, b * BLOCK, N); \
    } while (0)

static void unit_rows(int R, const rows_t *rows, int64_t m0, const uint8_t *w, int64_t K4, const float *sw,
                      int64_t ldw, const float *bias, uint16_t *y, int64_t ldy, int64_t b0, int64_t b1, int64_t N) {
    switch (R) {
#if ROWS >= 4
    case 1: TILES(1, TILE_BLOCKS_1); break;
    case 2: TILES(2, TILE_BLOCKS_2); break;
    case 3: TILES(3, TILE_BLOCKS_3); break;
    default: TILES(4, TILE_BLOCKS_4); break;
#elif ROWS == 2
    case 1: TILES(1, TILE_BLOCKS_1); break;
    default: TILES(2, TILE_BLOCKS_2); break;
#else
    default: TILES(1, TILE_BLOCKS_1); break;
#endif
    }
}

const char *linear_int8_isa(void) { return ISA_NAME; }

int linear_int8_group(void) { return GROUP; }

/* Returns 0, -1 for shapes it does not take, -2 when memory for the quantized rows ran out. */
int linear_int8(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *w, const float *sw,
                int64_t N, const float *bias, uint16_t *y, int64_t ldy) {
    if (M < 0 || N < 0 || K < 1 || K > MAX_K) return -1;
    if (M == 0 || N == 0) return 0;
    const int64_t K4 = (K + GROUP - 1) / GROUP * GROUP / 4, num_blocks = (N + BLOCK - 1) / BLOCK;
    const int64_t num_units = (num_blocks + UNIT - 1) / UNIT, ldw = num_blocks * BLOCK;
    rows_t rows = {0};
    if (quantize_rows(x, M, K, ldx, &rows) != 0) {
        release_rows(&rows);
        return -2;
    }
#pragma omp parallel for schedule(dynamic, 1) if (num_units > 1 && M * N * K > 65536)
    for (int64_t unit = 0; unit < num_units; unit++) {
        const int64_t b0 = unit * UNIT, b1 = b0 + UNIT < num_blocks ? b0 + UNIT : num_blocks;
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const int R = M - m0 < ROWS ? (int)(M - m0) : ROWS;
            unit_rows(R, &rows, m0, w, K4, sw, ldw, bias, y + m0 * ldy, ldy, b0, b1, N);
        }
    }
    release_rows(&rows);
    return 0;
}
