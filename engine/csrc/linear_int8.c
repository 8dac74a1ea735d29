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
#include "silu.h"

#define BLOCK 16
#define GROUP 32 /* k per activation scale (engine/native_int8.py: GROUP) */
#define MAX_K 65536

/* Rows quantized once a call: q (M, Kp) int8 and a = |q| (the AVX2 path's unsigned side), per (row,
   group) its scale and 128 * its sum. */
typedef struct {
    int8_t *q;
    uint8_t *a;
    float *scale;
    int32_t *comp;
    int64_t ld, groups;
} rows_t;

static void release_rows(rows_t *rows) {
    free(rows->q);
    free(rows->a);
    free(rows->scale);
    free(rows->comp);
}

static int alloc_rows(int64_t M, int64_t K, rows_t *rows) {
    const int64_t groups = (K + GROUP - 1) / GROUP, ld = groups * GROUP;
    rows->q = malloc((size_t)(M * ld));
    rows->a = malloc((size_t)(M * ld));
    rows->scale = malloc((size_t)(M * groups) * sizeof(float));
    rows->comp = malloc((size_t)(M * groups) * sizeof(int32_t));
    rows->ld = ld;
    rows->groups = groups;
    return rows->q && rows->a && rows->scale && rows->comp ? 0 : -1;
}

/* Group g of row m in plain C: any group, the last one short of GROUP included (zeros after K). */
static void quantize_group(const uint16_t *xr, int64_t K, int64_t m, int64_t g, rows_t *rows) {
    const int64_t k0 = g * GROUP, k1 = k0 + GROUP < K ? k0 + GROUP : K;
    float top = 0.0f;
    int finite = 1;
    for (int64_t k = k0; k < k1; k++) {
        const float a = fabsf(bf16_to_f32(xr[k]));
        finite &= a <= FLT_MAX; /* false for infinity and NaN */
        top = a > top ? a : top;
    }
    /* a NaN or infinity: the group's scale is NaN, so the row's outputs are NaN (as a float product's
       would be); its bytes are zeros */
    const float inv = finite && top > 0.0f ? 127.0f / top : 0.0f;
    int8_t *q = rows->q + m * rows->ld;
    uint8_t *a = rows->a + m * rows->ld;
    int32_t sum = 0;
    for (int64_t k = k0; k < k0 + GROUP; k++) {
        float v = k < k1 && finite ? rintf(bf16_to_f32(xr[k]) * inv) : 0.0f;
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        q[k] = (int8_t)v;
        a[k] = (uint8_t)(q[k] < 0 ? -q[k] : q[k]);
        sum += q[k];
    }
    rows->scale[m * rows->groups + g] = finite ? top / 127.0f : NAN;
    rows->comp[m * rows->groups + g] = 128 * sum;
}

#if defined(__AVX2__)
#include <immintrin.h>

/* A whole group of row m with AVX2: the same bytes, scale and sum as quantize_group (the same float
   products rounded to the nearest, ties to even, as rintf in the default mode). */
static void quantize_group_avx2(const uint16_t *xr, int64_t m, int64_t g, rows_t *rows) {
    const int64_t k0 = g * GROUP;
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(FLT_MAX);
    __m256 v[4], top4 = _mm256_setzero_ps();
    int finite = 1;
    for (int i = 0; i < 4; i++) {
        v[i] = bf16x8_to_f32(xr + k0 + 8 * i);
        const __m256 a = _mm256_and_ps(v[i], magnitude);
        finite &= _mm256_movemask_ps(_mm256_cmp_ps(a, big, _CMP_LE_OQ)) == 0xff; /* NaN: false */
        top4 = _mm256_max_ps(top4, a);
    }
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(top4), _mm256_extractf128_ps(top4, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    t = _mm_max_ss(t, _mm_movehdup_ps(t));
    const float top = _mm_cvtss_f32(t);
    const float inv = finite && top > 0.0f ? 127.0f / top : 0.0f;
    const __m256 scale = _mm256_set1_ps(inv), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    __m256i n[4];
    for (int i = 0; i < 4; i++) {
        __m256 p = _mm256_round_ps(_mm256_mul_ps(v[i], scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        p = _mm256_min_ps(_mm256_max_ps(p, lo), hi);
        n[i] = finite ? _mm256_cvtps_epi32(p) : _mm256_setzero_si256();
    }
    /* packs work within 128-bit lanes: restore the order of the 32 bytes */
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3])),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)(rows->q + m * rows->ld + k0), bytes);
    _mm256_storeu_si256((__m256i *)(rows->a + m * rows->ld + k0), _mm256_abs_epi8(bytes));
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    rows->scale[m * rows->groups + g] = finite ? top / 127.0f : NAN;
    rows->comp[m * rows->groups + g] = 128 * _mm_cvtsi128_si32(s4);
}
#endif

static void quantize_row(const uint16_t *xr, int64_t K, int64_t m, rows_t *rows) {
    for (int64_t g = 0; g < rows->groups; g++) {
#if defined(__AVX2__)
        if ((g + 1) * GROUP <= K) {
            quantize_group_avx2(xr, m, g, rows);
            continue;
        }
#endif
        quantize_group(xr, K, m, g, rows);
    }
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

/* AVX2 without VNNI: vpmaddubsw multiplies unsigned by signed bytes, 32 pairs an instruction, summing
   neighbours into int16. The unsigned side is |q| and the signed side the weight with q's sign
   (vpsignb), so each pair sum is at most 2 * 127 * 127 and never saturates; vpmaddwd by ones adds the
   pairs into int32. Each group's sum is exact, as VNNI's (after its 128 correction), so the bits are
   the same. The weights are stored as wq + 128: flipping the top bit gives wq as a signed byte. Per
   4 k and 8 columns of a row: four instructions (sign, two multiplies, an add), against one float32
   FMA per k and 8 columns. On AMD Zen 3 (2026-12-06) a SmolLM2 step's products ran 1.6-1.8x as fast
   as with the weights widened to int16 for vpmaddwd (the path this replaced), ~1.1x the bf16 kernel
   from 16 rows and ~1.4x at one row; vpmaddwd on zero-extended weights with int16 rows (no sign step)
   was slower in the kernel. Tiles: up to ROWS (4) rows by MAX_BLOCKS (1) 16-column blocks, settable
   with -D (benchmarks/linear_bench.py --int8-define). */
#define ISA_NAME "avx2"
#ifndef UNIT
#define UNIT 6
#endif
#ifndef ROWS
#define ROWS 4
#endif
#ifndef MAX_BLOCKS
#define MAX_BLOCKS 1
#endif
#ifndef TILE_BLOCKS_1
#define TILE_BLOCKS_1 1
#define TILE_BLOCKS_2 1
#define TILE_BLOCKS_3 1
#define TILE_BLOCKS_4 1
#endif

static inline __attribute__((always_inline)) void tile(const int R, const int C, const rows_t *rows, int64_t m0,
                                                       const uint8_t *w, int64_t K4, const float *sw,
                                                       int64_t ldw, const float *bias, uint16_t *y, int64_t ldy,
                                                       int64_t n0, int64_t N) {
    /* the float sums live in memory between groups: the registers hold the group's int32 sums, the
       weight vectors and the row's bytes */
    float acc[ROWS][MAX_BLOCKS * BLOCK];
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    const int64_t block_stride = K4 * 4 * BLOCK;
    memset(acc, 0, sizeof acc);
    for (int64_t g = 0; g < rows->groups; g++) {
        __m256i sums[ROWS][2 * MAX_BLOCKS];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int v = 0; v < 2 * C; v++) sums[r][v] = _mm256_setzero_si256();
        const uint8_t *wg = w + g * (GROUP / 4) * 4 * BLOCK;
        const int64_t k0 = g * GROUP;
        /* not unrolled: unrolled, GCC computed all eight steps' products before adding them up and
           spilled them */
#pragma GCC unroll 1
        for (int k4 = 0; k4 < GROUP / 4; k4++) {
            /* 32 bytes: 8 columns, each a 32-bit lane of its 4 k */
            __m256i wv[2 * MAX_BLOCKS];
#pragma GCC unroll 4
            for (int v = 0; v < 2 * C; v++)
                wv[v] = _mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(wg + (v / 2) * block_stride + k4 * 4 * BLOCK + 32 * (v % 2))), flip);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                int32_t quad, mag;
                memcpy(&quad, rows->q + (m0 + r) * rows->ld + k0 + 4 * k4, sizeof quad);
                memcpy(&mag, rows->a + (m0 + r) * rows->ld + k0 + 4 * k4, sizeof mag);
                const __m256i xv = _mm256_set1_epi32(quad), av = _mm256_set1_epi32(mag);
#pragma GCC unroll 4
                for (int v = 0; v < 2 * C; v++) {
                    const __m256i p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(wv[v], xv));
                    sums[r][v] = _mm256_add_epi32(sums[r][v], _mm256_madd_epi16(p, ones));
                }
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m256 sx = _mm256_set1_ps(rows->scale[(m0 + r) * rows->groups + g]);
#pragma GCC unroll 4
            for (int v = 0; v < 2 * C; v++) {
                const __m256 scale = _mm256_mul_ps(sx, _mm256_loadu_ps(sw + g * ldw + n0 + 8 * v));
                const __m256 sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][v]), scale, _mm256_loadu_ps(acc[r] + 8 * v));
                _mm256_storeu_ps(acc[r] + 8 * v, sum);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < C * BLOCK; j++) {
            const int64_t n = n0 + j;
            if (n < N) y[r * ldy + n] = f32_to_bf16(finish(acc[r][j], bias, n));
        }
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

/* What a unit does with the columns it just wrote, before it takes the next unit (as in linear_bf16.c). */
enum after_unit { WRITE_ONLY, SILU_MUL, ADD };

/* The product in units of UNIT column blocks taken by the threads as they come free. `pair` > 0 (a
   [gate; up] product of 2 x pair blocks): a unit takes gate blocks [b0, b1) and up blocks
   [pair + b0, pair + b1), then writes silu(gate) * up of its columns into `out` (SILU_MUL); or a unit
   adds its columns into `out` in place (ADD): linear_bf16.c's epilogues, with torch's bits.
   Returns as linear_int8. */
static int run_units(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *w, const float *sw,
                     int64_t N, const float *bias, uint16_t *y, int64_t ldy, int64_t pair, enum after_unit after,
                     uint16_t *out, int64_t ldo) {
    if (M < 0 || N < 0 || K < 1 || K > MAX_K) return -1;
    if (M == 0 || N == 0) return 0;
    const int64_t K4 = (K + GROUP - 1) / GROUP * GROUP / 4, all_blocks = (N + BLOCK - 1) / BLOCK;
    const int64_t num_blocks = pair > 0 ? pair : all_blocks, width = pair > 0 ? pair * BLOCK : N;
    const int64_t num_units = (num_blocks + UNIT - 1) / UNIT, ldw = all_blocks * BLOCK;
    rows_t rows = {0};
    if (alloc_rows(M, K, &rows) != 0) {
        release_rows(&rows);
        return -2;
    }
#pragma omp parallel if (num_units > 1 && M * N * K > 65536)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) quantize_row(x + m * ldx, K, m, &rows);
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < num_units; unit++) {
            const int64_t b0 = unit * UNIT, b1 = b0 + UNIT < num_blocks ? b0 + UNIT : num_blocks;
            for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
                const int R = M - m0 < ROWS ? (int)(M - m0) : ROWS;
                unit_rows(R, &rows, m0, w, K4, sw, ldw, bias, y + m0 * ldy, ldy, b0, b1, N);
                if (pair > 0) unit_rows(R, &rows, m0, w, K4, sw, ldw, bias, y + m0 * ldy, ldy, pair + b0, pair + b1, N);
            }
            const int64_t n0 = b0 * BLOCK, n1 = b1 * BLOCK < width ? b1 * BLOCK : width;
            if (after == SILU_MUL) silu_mul_rows(y + n0, ldy, y + width + n0, ldy, M, n1 - n0, out + n0, ldo);
            if (after == ADD) add_rows(y + n0, ldy, out + n0, ldo, M, n1 - n0);
        }
    }
    release_rows(&rows);
    return 0;
}

/* The entry points, with linear_bf16.c's signatures (csrc/llama_layers.c calls either kernel's): where
   those take the packed bf16 weight, these take a struct int8_weight (engine/native_int8.py: the
   Int8Weight's handle). */
struct int8_weight {
    const uint8_t *packed; /* the weight's blocks, layout above */
    const float *scales;   /* (Kp / GROUP, Np) */
};

/* y = x W^T (+ bias). Returns 0, -1 for shapes it does not take, -2 when memory for the quantized rows
   ran out. */
int linear_int8(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *weight, int64_t N,
                const float *bias, uint16_t *y, int64_t ldy) {
    const struct int8_weight *w = (const struct int8_weight *)(const void *)weight;
    return run_units(x, M, K, ldx, w->packed, w->scales, N, bias, y, ldy, 0, WRITE_ONLY, NULL, 0);
}

/* silu(gate) * up into h (M, n) for a [gate; up] weight of 2n outputs (n a multiple of BLOCK); y (M, 2n)
   receives both products, as linear_bf16_silu_mul. */
int linear_int8_silu_mul(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *weight, int64_t n,
                         const float *bias, uint16_t *y, int64_t ldy, uint16_t *h, int64_t ldh) {
    const struct int8_weight *w = (const struct int8_weight *)(const void *)weight;
    if (n < 0 || n % BLOCK != 0) return -1;
    return run_units(x, M, K, ldx, w->packed, w->scales, 2 * n, bias, y, ldy, n / BLOCK, SILU_MUL, h, ldh);
}

/* residual (M, N) += the product (rounded to bf16 first, in y), in place, as linear_bf16_add. */
int linear_int8_add(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *weight, int64_t N,
                    const float *bias, uint16_t *y, int64_t ldy, uint16_t *residual, int64_t ldr) {
    const struct int8_weight *w = (const struct int8_weight *)(const void *)weight;
    return run_units(x, M, K, ldx, w->packed, w->scales, N, bias, y, ldy, 0, ADD, residual, ldr);
}

/* The two epilogues alone, for the checks against torch (engine/product_kernel.py). */
void silu_mul_bf16(const uint16_t *gate, int64_t ldg, const uint16_t *up, int64_t ldu, int64_t rows, int64_t n,
                   uint16_t *out, int64_t ldo) {
    silu_mul_rows(gate, ldg, up, ldu, rows, n, out, ldo);
}

void add_bf16(const uint16_t *y, int64_t ldy, uint16_t *residual, int64_t ldr, int64_t rows, int64_t n) {
    add_rows(y, ldy, residual, ldr, rows, n);
}
