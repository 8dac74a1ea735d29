/* y = x W^T (+ bias) with int8 weights and int8 activations, for CPUs: bf16 rows in, bf16 rows out.

   Why: on a CPU without a bf16 dot product (Intel before Sapphire Rapids' AMX / Cooper Lake, AMD before
   Zen 4) the bf16 kernel (linear_bf16.c) widens every weight to float32 and runs at the float32 FMA
   peak. AVX512-VNNI's vpdpbusd multiplies 64 byte pairs an instruction, twice the float32 FMA's 32
   products a cycle here, and int8 weights are half the bytes of bf16 for the memory-bound one-row steps.

   Numbers: each weight row n (output column) is quantized once at load, symmetric, to int8 with one
   float32 scale sw[n] = max|W[n,:]| / 127 (engine/native_int8.py: pack). Each input row is quantized
   here at every call, symmetric, with its own scale sx = max|x| / 127: q = rint(x * (127 / max|x|)) in
   [-127, 127]. Then y[r][n] = float(sum_k q[r][k] * wq[n][k]) * (sx[r] * sw[n]) + bias[n], rounded to
   bf16 as torch rounds. The sum is exact in int32 (|sum| <= K * 127 * 127, K <= 65536 here), so its
   order does not matter: every path below (VNNI, AVX2, plain C) gives the same bits, and a row's
   bits never depend on the batch, since its scale is its own.

   VNNI multiplies unsigned by signed bytes, so the rows are stored as q + 128 (1..255) and the kernel
   subtracts 128 * colsum[n] (colsum[n] = sum_k wq[n][k], computed at pack) from each int32 sum.

   Layouts: x (M, K) bf16 with row stride ldx; y (M, N) bf16 with row stride ldy; bias float32 (N) or
   NULL. The weight: [ceil(N/16) blocks][K4 = ceil(K/4)][16 columns][4 k] int8, k and N padded with zeros;
   scales float32 and colsum int32, N padded to 16. Work is split in units of UNIT column blocks taken
   by the threads as they come free, tiles of up to ROWS rows x TILE_BLOCKS blocks inside. */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define BLOCK 16
#define MAX_K 65536 /* |sum| <= MAX_K * 255 * 127 < 2^31 */

/* Rows quantized once a call: q (M, K4 * 4) bytes (q + 128 on the VNNI path, else q as int8), scales. */
typedef struct {
    uint8_t *q;
    float *scale;
    int64_t ld;
} rows_t;

static int quantize_rows(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, int offset, rows_t *rows) {
    const int64_t ld = (K + 3) / 4 * 4;
    rows->q = malloc((size_t)(M * ld));
    rows->scale = malloc((size_t)M * sizeof(float));
    rows->ld = ld;
    if (!rows->q || !rows->scale) return -1;
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xr = x + m * ldx;
        float top = 0.0f;
        int finite = 1;
        for (int64_t k = 0; k < K; k++) {
            const float a = fabsf(bf16_to_f32(xr[k]));
            finite &= a <= FLT_MAX; /* false for infinity and NaN */
            top = a > top ? a : top;
        }
        /* a NaN or infinity in the row: its scale is NaN, so its outputs are NaN (as a float product's) */
        const float inv = finite && top > 0.0f ? 127.0f / top : 0.0f;
        rows->scale[m] = finite ? top / 127.0f : NAN;
        uint8_t *q = rows->q + m * ld;
        for (int64_t k = 0; k < K; k++) {
            float v = rintf(bf16_to_f32(xr[k]) * inv);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            q[k] = (uint8_t)((int)v + offset);
        }
        for (int64_t k = K; k < ld; k++) q[k] = (uint8_t)offset;
    }
    return 0;
}

static void release_rows(rows_t *rows) {
    free(rows->q);
    free(rows->scale);
}

/* y[r][n] from the exact int32 sum */
static inline float dequantize(int32_t sum, float sx, float sw, const float *bias, int64_t n) {
    const float v = (float)sum * (sx * sw);
    return bias ? v + bias[n] : v;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#define ISA_NAME "avx512vnni"
#define OFFSET 128 /* rows stored as q + 128: vpdpbusd takes them unsigned */
#ifndef UNIT
#define UNIT 6
#endif
#ifndef ROWS
#define ROWS 8
#endif
#define MAX_BLOCKS 6
#ifndef TILE_BLOCKS_1
#define TILE_BLOCKS_1 6
#define TILE_BLOCKS_2 6
#define TILE_BLOCKS_3 6
#define TILE_BLOCKS_4 6
#define TILE_BLOCKS_5 3
#define TILE_BLOCKS_6 3
#define TILE_BLOCKS_7 3
#define TILE_BLOCKS_8 3
#endif

static inline void store_bf16x16(__m512 v, uint16_t *y, int64_t n, int64_t N) {
    const int64_t left = N - n;
    if (left <= 0) return;
    const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet);
    _mm256_mask_storeu_epi16(y + n, mask, _mm512_cvtepi32_epi16(rounded));
}

static inline __attribute__((always_inline)) void tile(const int R, const int C, const rows_t *rows, int64_t m0,
                                                       const int8_t *w, int64_t K4, const float *sw,
                                                       const int32_t *colsum, const float *bias, uint16_t *y,
                                                       int64_t ldy, int64_t n0, int64_t N) {
    __m512i acc[ROWS][MAX_BLOCKS];
    const int64_t block_stride = K4 * 4 * BLOCK;
    const uint8_t *q = rows->q + m0 * rows->ld;
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_si512();
    for (int64_t k4 = 0; k4 < K4; k4++) {
        __m512i wv[MAX_BLOCKS];
#pragma GCC unroll 6
        for (int c = 0; c < C; c++) wv[c] = _mm512_loadu_si512(w + c * block_stride + k4 * 4 * BLOCK);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            int32_t quad;
            memcpy(&quad, q + r * rows->ld + 4 * k4, sizeof quad);
            const __m512i xv = _mm512_set1_epi32(quad);
#pragma GCC unroll 6
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], xv, wv[c]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        const __m512 sx = _mm512_set1_ps(rows->scale[m0 + r]);
#pragma GCC unroll 6
        for (int c = 0; c < C; c++) {
            const int64_t n = n0 + c * BLOCK;
            if (n >= N) break;
            const __m512i comp = _mm512_slli_epi32(_mm512_loadu_si512(colsum + n), 7); /* 128 * colsum */
            const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], comp));
            __m512 v = _mm512_mul_ps(sum, _mm512_mul_ps(sx, _mm512_loadu_ps(sw + n)));
            if (bias) {
                const int64_t left = N - n;
                const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + n));
            }
            store_bf16x16(v, y + r * ldy, n, N);
        }
    }
}

#define HAVE_TILES 1

#elif defined(__AVX2__)
#include <immintrin.h>

/* AVX2 without VNNI: the weights widened to int16 (vpmovsxbw) and multiplied by the int16 rows in pairs
   (vpmaddwd), 8 int32 sums a vector: the same exact sums as VNNI's. */
#define ISA_NAME "avx2"
#define OFFSET 0
#define UNIT 6
#define ROWS 4
#define MAX_BLOCKS 2
#define TILE_BLOCKS_1 2
#define TILE_BLOCKS_2 2
#define TILE_BLOCKS_3 1
#define TILE_BLOCKS_4 1

static inline __attribute__((always_inline)) void tile(const int R, const int C, const rows_t *rows, int64_t m0,
                                                       const int8_t *w, int64_t K4, const float *sw,
                                                       const int32_t *colsum, const float *bias, uint16_t *y,
                                                       int64_t ldy, int64_t n0, int64_t N) {
    (void)colsum;
    /* a block's 16 columns as two halves of 8, each 8 int32 sums */
    __m256i acc[ROWS][MAX_BLOCKS][2];
    const int64_t block_stride = K4 * 4 * BLOCK;
    const int8_t *q = (const int8_t *)rows->q + m0 * rows->ld;
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 2
        for (int c = 0; c < C; c++) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_si256();
    for (int64_t k4 = 0; k4 < K4; k4++) {
        /* 32 bytes: 8 columns, each a 32-bit lane of its 4 k (bytes k0 k1 k2 k3). As int16 pairs:
           w02 = (k0, k2) and w13 = (k1, k3), sign-extended in place. */
        __m256i w02[MAX_BLOCKS][2], w13[MAX_BLOCKS][2];
#pragma GCC unroll 2
        for (int c = 0; c < C; c++)
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const __m256i raw =
                    _mm256_loadu_si256((const __m256i *)(w + c * block_stride + k4 * 4 * BLOCK + 32 * h));
                w02[c][h] = _mm256_srai_epi16(_mm256_slli_epi16(raw, 8), 8);
                w13[c][h] = _mm256_srai_epi16(raw, 8);
            }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const int8_t *qr = q + r * rows->ld + 4 * k4;
            const __m256i x02 = _mm256_set1_epi32((int32_t)((uint32_t)(uint16_t)qr[0] | ((uint32_t)(uint16_t)qr[2] << 16)));
            const __m256i x13 = _mm256_set1_epi32((int32_t)((uint32_t)(uint16_t)qr[1] | ((uint32_t)(uint16_t)qr[3] << 16)));
#pragma GCC unroll 2
            for (int c = 0; c < C; c++)
#pragma GCC unroll 2
                for (int h = 0; h < 2; h++) {
                    const __m256i both = _mm256_add_epi32(_mm256_madd_epi16(x02, w02[c][h]),
                                                          _mm256_madd_epi16(x13, w13[c][h]));
                    acc[r][c][h] = _mm256_add_epi32(acc[r][c][h], both);
                }
        }
    }
    for (int r = 0; r < R; r++) {
        const float sx = rows->scale[m0 + r];
        for (int c = 0; c < C; c++)
            for (int h = 0; h < 2; h++) {
                int32_t sums[8];
                _mm256_storeu_si256((__m256i *)sums, acc[r][c][h]);
                for (int j = 0; j < 8; j++) {
                    const int64_t n = n0 + c * BLOCK + 8 * h + j;
                    if (n < N) y[r * ldy + n] = f32_to_bf16(dequantize(sums[j], sx, sw[n], bias, n));
                }
            }
    }
}

#define HAVE_TILES 1

#else /* plain C: the same exact sums */
#define ISA_NAME "generic"
#define OFFSET 0
#define UNIT 6
#define ROWS 1
#define TILE_BLOCKS_1 1

static void tile(const int R, const int C, const rows_t *rows, int64_t m0, const int8_t *w, int64_t K4,
                 const float *sw, const int32_t *colsum, const float *bias, uint16_t *y, int64_t ldy,
                 int64_t n0, int64_t N) {
    (void)colsum;
    const int64_t block_stride = K4 * 4 * BLOCK;
    for (int r = 0; r < R; r++) {
        const int8_t *q = (const int8_t *)rows->q + (m0 + r) * rows->ld;
        for (int c = 0; c < C; c++)
            for (int j = 0; j < BLOCK; j++) {
                const int64_t n = n0 + c * BLOCK + j;
                if (n >= N) continue;
                const int8_t *wb = w + c * block_stride + 4 * j;
                int32_t sum = 0;
                for (int64_t k4 = 0; k4 < K4; k4++)
                    for (int i = 0; i < 4; i++) sum += (int32_t)q[4 * k4 + i] * wb[k4 * 4 * BLOCK + i];
                y[r * ldy + n] = f32_to_bf16(dequantize(sum, rows->scale[m0 + r], sw[n], bias, n));
            }
    }
}

#define HAVE_TILES 1
#endif

/* Blocks [b0, b1) for R rows, B blocks a tile, then the blocks left one at a time. */
#define TILES(R, B)                                                                                    \
    do {                                                                                               \
        int64_t b = b0;                                                                                \
        for (; b + (B) <= b1; b += (B))                                                                \
            tile(R, B, rows, m0, w + b * K4 * 4 * BLOCK, K4, sw, colsum, bias, y, ldy, b * BLOCK, N);  \
        for (; b < b1; b++) tile(R, 1, rows, m0, w + b * K4 * 4 * BLOCK, K4, sw, colsum, bias, y, ldy, b * BLOCK, N); \
    } while (0)

static void unit_rows(int R, const rows_t *rows, int64_t m0, const int8_t *w, int64_t K4, const float *sw,
                      const int32_t *colsum, const float *bias, uint16_t *y, int64_t ldy, int64_t b0,
                      int64_t b1, int64_t N) {
    switch (R) {
#if ROWS >= 2
    case 1: TILES(1, TILE_BLOCKS_1); break;
    case 2: TILES(2, TILE_BLOCKS_2); break;
    case 3: TILES(3, TILE_BLOCKS_3); break;
#if ROWS > 4
    case 4: TILES(4, TILE_BLOCKS_4); break;
    case 5: TILES(5, TILE_BLOCKS_5); break;
    case 6: TILES(6, TILE_BLOCKS_6); break;
    case 7: TILES(7, TILE_BLOCKS_7); break;
    default: TILES(8, TILE_BLOCKS_8); break;
#else
    default: TILES(4, TILE_BLOCKS_4); break;
#endif
#else
    default: TILES(1, TILE_BLOCKS_1); break;
#endif
    }
}

const char *linear_int8_isa(void) { return ISA_NAME; }

/* Returns 0, -1 for shapes it does not take, -2 when memory for the quantized rows ran out. */
int linear_int8(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const int8_t *w, const float *sw,
                const int32_t *colsum, int64_t N, const float *bias, uint16_t *y, int64_t ldy) {
    if (M < 0 || N < 0 || K < 1 || K > MAX_K) return -1;
    if (M == 0 || N == 0) return 0;
    const int64_t K4 = (K + 3) / 4, num_blocks = (N + BLOCK - 1) / BLOCK;
    const int64_t num_units = (num_blocks + UNIT - 1) / UNIT;
    rows_t rows;
    if (quantize_rows(x, M, K, ldx, OFFSET, &rows) != 0) {
        release_rows(&rows);
        return -2;
    }
#pragma omp parallel for schedule(dynamic, 1) if (num_units > 1 && M * N * K > 65536)
    for (int64_t unit = 0; unit < num_units; unit++) {
        const int64_t b0 = unit * UNIT, b1 = b0 + UNIT < num_blocks ? b0 + UNIT : num_blocks;
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const int R = M - m0 < ROWS ? (int)(M - m0) : ROWS;
            unit_rows(R, &rows, m0, w, K4, sw, colsum, bias, y + m0 * ldy, ldy, b0, b1, N);
        }
    }
    release_rows(&rows);
    return 0;
}
