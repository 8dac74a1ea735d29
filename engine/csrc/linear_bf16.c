/* y = x W^T (+ bias) in bfloat16 on x86 CPUs, for every row count: with AVX512-BF16 (below), with
   AVX-512F (bf16 widened to float32 in 512-bit registers), or with AVX2 + FMA (the last path).

   Why: oneDNN's packed bf16 product loses most at the row counts a decode step has (1-32 rows: it
   runs at ~25 % of this CPU's bf16 peak for one row and ~65 % at 16), and its sums run in an order
   that depends on the row count (one row differs from two). Here every output is one float32 sum over
   k in ascending pairs (vdpbf16ps), whatever the row count and wherever the row sits in the batch: a
   row's bits never depend on the batch, with no padding.

   Layouts: x (M, K) bf16 with row stride ldx (elements), K even; y (M, N) bf16 with row stride ldy;
   bias float32 (N) or NULL; the weight packed by pack order [N/16 blocks][K/2][16 columns][2], its N
   padded to a multiple of 16 (see engine/native_linear.py: pack). The work is split into units of
   UNIT column blocks, taken by the threads as they come free (dynamic schedule). Inside a unit, tiles
   of up to 4 rows x 6 blocks (24 float32 accumulators in registers); fewer rows take more blocks at
   a time, so that even one row keeps several independent sums in flight. From 5 rows up (several row
   tiles a unit, the weight from cache after the first), a thread claims its next unit before it runs
   this one and prefetches that unit's weight meanwhile, so that the weights stream in while the tiles
   compute (`ahead_t`; decode steps 8-16 % shorter at 16-64 rows on a 2-core EPYC Zen 5, 2026-12-07,
   docs/performance.md). Measured on a 2-core EPYC Zen 4
   (SmolLM2's products, bf16): 1 row 6.0 ms a step vs oneDNN 10.5, 16 rows 13.8 vs 16.5, 32 rows 23.5
   vs 26.8, 256 rows 164 vs 166. */

#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "silu.h"

#define BLOCK 16 /* output columns per packed block (see engine/native_linear.py: pack) */

/* The weight of the unit a thread takes next, asked for a few lines at a k step while the current unit's
   row tiles run from cache: [at, end), then [at2, end2) (the up half of a gate/up unit); `per_tile`
   lines are spread over each tile's K2 steps (`credit` counts them out). */
typedef struct {
    const char *at, *end, *at2, *end2;
    int64_t per_tile, credit;
} ahead_t;

static inline __attribute__((always_inline)) void ahead_step(ahead_t *a, int64_t K2) {
    if (!a) return;
    a->credit += a->per_tile;
    while (a->credit >= K2) {
        a->credit -= K2;
        if (a->at >= a->end) {
            if (a->at2 >= a->end2) return;
            a->at = a->at2, a->end = a->end2, a->at2 = a->end2;
        }
        __builtin_prefetch(a->at, 0, 3); /* prefetcht0 on x86 (measured a little ahead of t1) */
        a->at += 64;
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#define UNIT 6 /* column blocks per unit of work */
#define ROWS 4 /* rows per tile */

/* v (+ bias) rounded to bf16 (vcvtneps2bf16) into y's columns [n, min(n + 16, N)); nothing when n >= N. */
static inline void store_bf16x16(__m512 v, const float *bias, uint16_t *y, int64_t n, int64_t N) {
    const int64_t left = N - n;
    if (left <= 0) return;
    const __mmask16 mask = left >= BLOCK ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + n));
    _mm256_mask_storeu_epi16(y + n, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __attribute__((always_inline)) void tile(const int R, const int C, const uint16_t *x,
                                                       int64_t ldx, const uint16_t *w, int64_t K2,
                                                       const float *bias, uint16_t *y, int64_t ldy,
                                                       int64_t n0, int64_t N, ahead_t *a) {
    __m512 acc[ROWS][UNIT];
    const int64_t block_stride = K2 * 2 * BLOCK;
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t k2 = 0; k2 < K2; k2++) {
        /* the rows' pairs stay in registers and each block's weights are loaded once: 4 + 6 loads
           for 24 products (the other loop order makes the compiler reload the weights per row) */
        __m512bh xv[ROWS];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            int32_t pair;
            memcpy(&pair, x + r * ldx + 2 * k2, sizeof pair);
            xv[r] = (__m512bh)_mm512_set1_epi32(pair);
        }
#pragma GCC unroll 6
        for (int c = 0; c < C; c++) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + c * block_stride + k2 * 2 * BLOCK);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv[r], wv);
        }
        ahead_step(a, K2);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int c = 0; c < C; c++) store_bf16x16(acc[r][c], bias, y + r * ldy, n0 + c * BLOCK, N);
}

/* Tiles of R rows x TILE_BLOCKS_R blocks of 16 columns (one vector each), so that R x C sums are in
   flight: 24 for every R. */
#define VECS_PER_BLOCK 1
#define TILE_BLOCKS_1 6
#define TILE_BLOCKS_2 6
#define TILE_BLOCKS_3 6
#define TILE_BLOCKS_4 6

typedef uint16_t row_t; /* the tiles read the rows as given, in bf16 */

static const row_t *tile_rows(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, int64_t *ld) {
    (void)M; (void)K;
    *ld = ldx;
    return x;
}

static void release_rows(const row_t *rows) { (void)rows; }

#define HAVE_LINEAR_BF16 1
#define ISA_NAME "avx512bf16"
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 1 /* the next unit's weight asked for during this one's tiles (not on AMX) */
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__x86_64__)
/* AMX (Intel Sapphire Rapids and later): tile products. The packed weight is already AMX's B layout: a
   block's k pairs one 64-byte row each (16 columns x 2), so 16 pairs (32 k) of a block are one B tile
   (16 rows of 64 bytes, stride 64). An A tile holds up to 16 rows of x, 32 k each, read in place (stride
   ldx); a C tile 16 rows x 16 float32 columns. For each block, every output is a float32 sum over k in
   chunks of 32, in ascending order, each chunk one tdpbf16ps: the same instructions whatever the row count
   or a row's place in the batch (a batch of M > 16 rows runs in tiles of 16, the last one ending at row M
   and overlapping the one before: those rows are computed twice, with the same bits). So a row's bits do
   not depend on the batch here either; they differ from the AVX512-BF16 path's (another order inside a
   chunk). Products whose K is not a multiple of 32, and processes where Linux refuses the tile state
   (arch_prctl), run on the AVX512-BF16 path above. Measured on a 2-core Xeon with AMX (SmolLM2's products
   of one step, 2026-12-07): docs/performance.md. */
#include <sys/syscall.h>
#include <unistd.h>

#define HAVE_AMX 1
#define AMX_UNIT 4 /* column blocks per unit of work: four C tiles */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_ready;

/* Linux hands a process AMX's tile state only once asked (arch_prctl), per process. */
__attribute__((constructor)) static void amx_request(void) {
    amx_ready = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

struct tile_config {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* tmm0-3: C (one column block each), tmm4: A, tmm5-7: B. */
static void amx_configure(int R) {
    struct tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) config.rows[t] = (uint8_t)(t < 5 ? R : 16), config.colsb[t] = 64;
    _tile_loadconfig(&config);
}

/* C tile T (R rows) + bias, rounded to bf16, into y's columns of block T of the call (nothing past N). */
#define AMX_STORE(T)                                                                                 \
    do {                                                                                           \
        _tile_stored(T, c, 64);                                                                    \
        for (int r = 0; r < R; r++)                                                                \
            store_bf16x16(_mm512_loadu_ps(c + r * BLOCK), bias, y + r * ldy, n0 + (T) * BLOCK, N);  \
    } while (0)

#define AMX_DP(C, B, OFFSET)                                                                        \
    do {                                                                                           \
        _tile_loadd(B, wb + (OFFSET) + kc * 16 * 2 * BLOCK, 64);                                    \
        _tile_dpbf16ps(C, 4, B);                                                                   \
    } while (0)

/* Rows [m0, m0 + R) (R as configured) x blocks [b0, b1) of at most AMX_UNIT blocks. */
static void amx_rows(const uint16_t *x, int64_t ldx, int R, const uint16_t *w, int64_t K2, const float *bias,
                     uint16_t *y, int64_t ldy, int64_t b0, int64_t b1, int64_t N) {
    const int64_t block_stride = K2 * 2 * BLOCK, chunks = K2 / 16;
    const int nb = (int)(b1 - b0);
    const uint16_t *wb = w + b0 * block_stride;
    float c[16 * BLOCK];
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kc = 0; kc < chunks; kc++) {
        _tile_loadd(4, x + kc * 32, ldx * 2);
        switch (nb) { /* falls through: block 3, then 2, 1, 0 */
        case 4: AMX_DP(3, 5, 3 * block_stride); /* fallthrough */
        case 3: AMX_DP(2, 7, 2 * block_stride); /* fallthrough */
        case 2: AMX_DP(1, 6, block_stride); /* fallthrough */
        default: AMX_DP(0, 5, 0);
        }
    }
    const int64_t n0 = b0 * BLOCK;
    AMX_STORE(0);
    if (nb > 1) AMX_STORE(1);
    if (nb > 2) AMX_STORE(2);
    if (nb > 3) AMX_STORE(3);
}

/* Every row of x for blocks [b0, b1): tiles of 16 rows (the last one ending at row M), AMX_UNIT blocks at
   a time. The thread's tiles are configured for min(M, 16) rows. */
static void amx_unit(const uint16_t *x, int64_t M, int64_t ldx, const uint16_t *w, int64_t K2,
                     const float *bias, uint16_t *y, int64_t ldy, int64_t b0, int64_t b1, int64_t N) {
    const int R = M < 16 ? (int)M : 16;
    for (int64_t m = 0; m < M; m += 16) {
        const int64_t m0 = m + R <= M ? m : M - R;
        for (int64_t b = b0; b < b1; b += AMX_UNIT)
            amx_rows(x + m0 * ldx, ldx, R, w, K2, bias, y + m0 * ldy, ldy, b, b + AMX_UNIT < b1 ? b + AMX_UNIT : b1, N);
    }
}
#endif

#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* AVX-512F without the bf16 dot product (e.g. Intel Skylake-SP to Ice Lake, AMD before Zen 4): the
   AVX2 path's arithmetic in 512-bit registers. A 512-bit load holds one block's 16 columns for a pair
   of k; a shift left by 16 gives the even k as float32, a mask the odd k. The rows are widened to
   float32 once a call. Every output is one float32 sum over k in ascending order (two FMAs per pair),
   the AVX2 path's very sums: a row's bits never depend on the batch, and match the AVX2 build's. */
#include <immintrin.h>
#include <stdlib.h>

#ifndef UNIT
#define UNIT 4 /* column blocks per unit of work */
#endif
#ifndef ROWS
#define ROWS 8 /* rows per tile */
#endif
#define MAX_VECS 8

/* y[n .. n + 16) from a float32 vector: bias, round to nearest even as torch does, NaN kept NaN */
static inline void store_bf16x16(__m512 v, const float *bias, uint16_t *y, int64_t n, int64_t N) {
    const int64_t left = N - n;
    if (left <= 0) return;
    const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + n));
    f32x16_store_bf16(v, y, n, N);
}

/* R rows x V blocks of 16 columns (one vector each) from float32 rows xf (row stride K) */
static inline __attribute__((always_inline)) void tile(const int R, const int V, const float *xf,
                                                       int64_t K, const uint16_t *w, int64_t K2,
                                                       const float *bias, uint16_t *y, int64_t ldy,
                                                       int64_t n0, int64_t N, ahead_t *a) {
    (void)a; /* no prefetching ahead on this path: on Ice Lake 1.02x the time at 16-64 rows (2026-12-08) */
    __m512 acc[ROWS][MAX_VECS];
    const int64_t block_stride = K2 * 2 * BLOCK;
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int c = 0; c < V; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t k2 = 0; k2 < K2; k2++) {
        /* the V blocks' weights widened once (2V registers), then each row's pair broadcast once:
           V loads and 2V shifts/masks for 2RV products, R x V sums in flight */
        __m512 even[MAX_VECS], odd[MAX_VECS];
#pragma GCC unroll 8
        for (int c = 0; c < V; c++) {
            const __m512i v = _mm512_loadu_si512(w + c * block_stride + k2 * 2 * BLOCK);
            even[c] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            odd[c] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m512 xe = _mm512_set1_ps(xf[r * K + 2 * k2]);
            const __m512 xo = _mm512_set1_ps(xf[r * K + 2 * k2 + 1]);
#pragma GCC unroll 8
            for (int c = 0; c < V; c++) {
                acc[r][c] = _mm512_fmadd_ps(xe, even[c], acc[r][c]);
                acc[r][c] = _mm512_fmadd_ps(xo, odd[c], acc[r][c]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int c = 0; c < V; c++) store_bf16x16(acc[r][c], bias, y + r * ldy, n0 + c * BLOCK, N);
}

/* Tiles of R rows x TILE_BLOCKS_R blocks of 16 columns (one vector each). */
#define VECS_PER_BLOCK 1
#ifndef TILE_BLOCKS_1
#define TILE_BLOCKS_1 4
#define TILE_BLOCKS_2 4
#define TILE_BLOCKS_3 4
#define TILE_BLOCKS_4 4
#define TILE_BLOCKS_5 2
#define TILE_BLOCKS_6 2
#define TILE_BLOCKS_7 2
#define TILE_BLOCKS_8 2
#endif

typedef float row_t; /* the tiles read the rows widened to float32, once a call */

static const row_t *tile_rows(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, int64_t *ld) {
    float *xf = malloc((size_t)(M * K) * sizeof *xf);
    if (!xf) return NULL;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) xf[m * K + k] = bf16_to_f32(x[m * ldx + k]);
    *ld = K;
    return xf;
}

static void release_rows(const row_t *rows) { free((void *)rows); }

#define HAVE_LINEAR_BF16 1
#define ISA_NAME "avx512f"

#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2 + FMA, no bf16 dot product (e.g. AMD Zen 2/3, Intel before Cooper Lake): the same packed
   weight, read as bf16 (half the bytes of float32) and widened in registers: each 32-bit lane of a
   packed pair holds k (low half) and k+1 (high half), so a shift and a mask give both as float32.
   The rows are widened to float32 once per call. Every output is one float32 sum over k in ascending
   order (two FMAs per pair), whatever the row count: a row's bits never depend on the batch. Rows go
   six at a time through `tile6` (12 sums in flight), the last 1-5 through tiles of up to 4 rows. Here,
   without it, torch's bf16 product on such a CPU runs ~4x slower than this (docs/performance.md). */
#include <immintrin.h>
#include <stdlib.h>

#define UNIT 6 /* column blocks per unit of work */
#define TILE_ROWS 4 /* rows of `tile` at most */
#define MAX_VECS 6

/* y[r][n0 .. n0 + 8) from a float32 vector: bias, round to nearest even as torch does, NaN kept NaN */
static inline void store_bf16x8(__m256 v, const float *bias, uint16_t *y, int64_t n, int64_t N) {
    const int64_t left = N - n;
    if (left <= 0) return;
    float b[8] = {0};
    if (bias) {
        for (int i = 0; i < 8 && i < left; i++) b[i] = bias[n + i];
        v = _mm256_add_ps(v, _mm256_loadu_ps(b));
    }
    __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, quiet, is_nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    if (left >= 8) {
        _mm_storeu_si128((__m128i *)(y + n), packed);
    } else {
        uint16_t out[8];
        _mm_storeu_si128((__m128i *)out, packed);
        memcpy(y + n, out, (size_t)left * sizeof *out);
    }
}

/* A packed vector of 8 pairs as float32: k from the low halves, k+1 from the high halves */
static inline __m256 pair_low(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline __m256 pair_high(__m256i v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

/* R rows x V vectors of 8 columns (V/2 blocks) from float32 rows xf (row stride K) */
static inline __attribute__((always_inline)) void tile(const int R, const int V, const float *xf,
                                                       int64_t K, const uint16_t *w, int64_t K2,
                                                       const float *bias, uint16_t *y, int64_t ldy,
                                                       int64_t n0, int64_t N, ahead_t *a) {
    (void)a; /* no prefetching ahead on this path (measured on AVX512-BF16 and AVX-512F only) */
    __m256 acc[TILE_ROWS][MAX_VECS];
    const int64_t block_stride = K2 * 2 * BLOCK;
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int c = 0; c < V; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t k2 = 0; k2 < K2; k2++) {
        /* the V vectors' weights widened once (2V registers), then each row's pair broadcast once:
           2V + 2R loads and converts for 2RV products, R x V sums in flight */
        __m256 even[MAX_VECS], odd[MAX_VECS];
#pragma GCC unroll 6
        for (int c = 0; c < V; c++) {
            const __m256i v = _mm256_loadu_si256(
                (const __m256i *)(w + (c / 2) * block_stride + k2 * 2 * BLOCK + (c % 2) * BLOCK));
            even[c] = pair_low(v);
            odd[c] = pair_high(v);
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m256 xe = _mm256_broadcast_ss(xf + r * K + 2 * k2);
            const __m256 xo = _mm256_broadcast_ss(xf + r * K + 2 * k2 + 1);
#pragma GCC unroll 6
            for (int c = 0; c < V; c++) {
                acc[r][c] = _mm256_fmadd_ps(xe, even[c], acc[r][c]);
                acc[r][c] = _mm256_fmadd_ps(xo, odd[c], acc[r][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int c = 0; c < V; c++) store_bf16x8(acc[r][c], bias, y + r * ldy, n0 + c * 8, N);
}

#ifndef AVX2_TILE4 /* -DAVX2_TILE4: tiles of at most 4 rows, as before tile6 (benchmarks/linear_bench.py A/B) */
#define TILE6 1
#endif

#ifdef TILE6
/* 6 rows x one block of 16 columns: 12 sums in flight, which the tile above cannot hold with both
   halves of every pair widened (12 + 4 + 2 > 16 registers). Per pair: the block's even halves are
   widened and every row's k-th value multiplied in, then its odd halves (the block read again, from
   L1): 12 + 2 + 1 registers. Each sum is still fma(x[k], w[k]) then fma(x[k+1], w[k+1]) for k
   ascending: the same bits as the tile above. */
#define FMA2(A0, A1, X, W0, W1) A0 = _mm256_fmadd_ps(X, W0, A0), A1 = _mm256_fmadd_ps(X, W1, A1)
static void tile6(const float *xf, int64_t K, const uint16_t *w, int64_t K2, const float *bias, uint16_t *y,
                  int64_t ldy, int64_t n0, int64_t N, ahead_t *a) {
    (void)a;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
    __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    const float *x0 = xf, *x1 = xf + K, *x2 = xf + 2 * K, *x3 = xf + 3 * K, *x4 = xf + 4 * K, *x5 = xf + 5 * K;
    for (int64_t k2 = 0; k2 < K2; k2++) {
        const __m256i *wk = (const __m256i *)(w + k2 * 2 * BLOCK);
        const int64_t k = 2 * k2;
        __m256 w0 = pair_low(_mm256_loadu_si256(wk));
        __m256 w1 = pair_low(_mm256_loadu_si256(wk + 1));
        FMA2(a00, a01, _mm256_broadcast_ss(x0 + k), w0, w1);
        FMA2(a10, a11, _mm256_broadcast_ss(x1 + k), w0, w1);
        FMA2(a20, a21, _mm256_broadcast_ss(x2 + k), w0, w1);
        FMA2(a30, a31, _mm256_broadcast_ss(x3 + k), w0, w1);
        FMA2(a40, a41, _mm256_broadcast_ss(x4 + k), w0, w1);
        FMA2(a50, a51, _mm256_broadcast_ss(x5 + k), w0, w1);
        __asm__ volatile("" ::: "memory"); /* read the block again: kept, it would take two registers */
        w0 = pair_high(_mm256_loadu_si256(wk));
        w1 = pair_high(_mm256_loadu_si256(wk + 1));
        FMA2(a00, a01, _mm256_broadcast_ss(x0 + k + 1), w0, w1);
        FMA2(a10, a11, _mm256_broadcast_ss(x1 + k + 1), w0, w1);
        FMA2(a20, a21, _mm256_broadcast_ss(x2 + k + 1), w0, w1);
        FMA2(a30, a31, _mm256_broadcast_ss(x3 + k + 1), w0, w1);
        FMA2(a40, a41, _mm256_broadcast_ss(x4 + k + 1), w0, w1);
        FMA2(a50, a51, _mm256_broadcast_ss(x5 + k + 1), w0, w1);
    }
    const __m256 acc[6][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
    for (int r = 0; r < 6; r++) {
        store_bf16x8(acc[r][0], bias, y + r * ldy, n0, N);
        store_bf16x8(acc[r][1], bias, y + r * ldy, n0 + 8, N);
    }
}
#define ROWS 6 /* rows a unit_rows call takes: tile6's, and the last 1-5 as 4 + 1 or fewer */
#else
#define ROWS TILE_ROWS
#endif

/* Tiles of R rows x TILE_BLOCKS_R blocks of 16 columns (two vectors each): 8 sums in flight at 4 rows,
   and 14 of the 16 registers in use (measured against other shapes in docs/performance.md). */
#define VECS_PER_BLOCK 2
#define TILE_BLOCKS_1 2
#define TILE_BLOCKS_2 1
#define TILE_BLOCKS_3 1
#define TILE_BLOCKS_4 1

typedef float row_t; /* the tiles read the rows widened to float32, once a call */

static const row_t *tile_rows(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, int64_t *ld) {
    float *xf = malloc((size_t)(M * K) * sizeof *xf);
    if (!xf) return NULL;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) xf[m * K + k] = bf16_to_f32(x[m * ldx + k]);
    *ld = K;
    return xf;
}

static void release_rows(const row_t *rows) { free((void *)rows); }

#define HAVE_LINEAR_BF16 1
#define ISA_NAME "avx2"

#endif

#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 0 /* the paths other than AVX512-BF16 (AVX-512F: tried, no gain; AVX2: not measured) */
#endif

#ifdef HAVE_LINEAR_BF16

/* Blocks [b0, b1) for R rows, B blocks a tile, then the blocks left one at a time. */
#define TILES(R, B)                                                                                \
    do {                                                                                           \
        int64_t b = b0;                                                                            \
        for (; b + (B) <= b1; b += (B))                                                            \
            tile(R, (B) * VECS_PER_BLOCK, rows, ld, w + b * K2 * 2 * BLOCK, K2, bias, y, ldy,     \
                 b * BLOCK, N, a);                                                                 \
        for (; b < b1; b++)                                                                        \
            tile(R, VECS_PER_BLOCK, rows, ld, w + b * K2 * 2 * BLOCK, K2, bias, y, ldy, b * BLOCK, N, a); \
    } while (0)

static void unit_rows(int R, const row_t *rows, int64_t ld, const uint16_t *w, int64_t K2,
                      const float *bias, uint16_t *y, int64_t ldy, int64_t b0, int64_t b1, int64_t N,
                      ahead_t *a) {
    switch (R) {
    case 1: TILES(1, TILE_BLOCKS_1); break;
    case 2: TILES(2, TILE_BLOCKS_2); break;
    case 3: TILES(3, TILE_BLOCKS_3); break;
#ifdef TILE6
    case 4: TILES(4, TILE_BLOCKS_4); break;
    case 5:
        unit_rows(4, rows, ld, w, K2, bias, y, ldy, b0, b1, N, a);
        unit_rows(1, rows + 4 * ld, ld, w, K2, bias, y + 4 * ldy, ldy, b0, b1, N, a);
        break;
    default:
        for (int64_t b = b0; b < b1; b++)
            tile6(rows, ld, w + b * K2 * 2 * BLOCK, K2, bias, y, ldy, b * BLOCK, N, a);
        break;
#elif ROWS > 4
    case 4: TILES(4, TILE_BLOCKS_4); break;
    case 5: TILES(5, TILE_BLOCKS_5); break;
    case 6: TILES(6, TILE_BLOCKS_6); break;
    case 7: TILES(7, TILE_BLOCKS_7); break;
    default: TILES(8, TILE_BLOCKS_8); break;
#else
    default: TILES(4, TILE_BLOCKS_4); break;
#endif
    }
}

int linear_bf16_supported(void) { return 1; }

#ifdef HAVE_AMX
const char *linear_bf16_isa(void) { return amx_ready ? "amx-bf16" : ISA_NAME; }
#else
const char *linear_bf16_isa(void) { return ISA_NAME; }
#endif

/* What a unit does with the columns it just wrote, before it takes the next unit. */
enum after_unit { WRITE_ONLY, SILU_MUL, ADD };

/* The product in units of UNIT column blocks taken by the threads as they come free. `pair` > 0 (a
   [gate; up] product of 2 x pair blocks): a unit takes gate blocks [b0, b1) and up blocks
   [pair + b0, pair + b1). Then a unit writes silu(gate) * up of its columns into `out` (SILU_MUL), or
   adds its columns into `out` in place (ADD), from what it just wrote: run afterwards by torch, those
   operations read values the other core wrote (~3x their time alone). */
static int run_units(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                     const float *bias, uint16_t *y, int64_t ldy, int64_t pair, enum after_unit after,
                     uint16_t *out, int64_t ldo) {
    if (K % 2 != 0 || M < 0 || N < 0) return -1;
    if (M == 0 || N == 0) return 0;
    const int64_t K2 = K / 2, num_blocks = pair > 0 ? pair : (N + BLOCK - 1) / BLOCK;
    const int64_t num_units = (num_blocks + UNIT - 1) / UNIT, width = pair > 0 ? pair * BLOCK : N;
#ifdef HAVE_AMX
    const int amx = amx_ready && K % 32 == 0; /* else the vector path of this build */
#else
    const int amx = 0;
#endif
    int64_t ld = ldx;
    const row_t *rows = amx ? NULL : tile_rows(x, M, K, ldx, &ld);
    if (!amx && !rows) return -2;
    /* With several row tiles a unit (their weight then comes from cache after the first), a thread
       claims its next unit before it runs this one and streams that unit's weight in meanwhile. */
    const int ahead = PREFETCH_AHEAD && !amx && M > ROWS;
    /* tile calls a unit: one per row tile (a unit is one tile wide on the AVX512-BF16 path), twice for gate/up */
    const int64_t block_bytes = K2 * 2 * BLOCK * 2, tiles = (M + ROWS - 1) / ROWS * (pair > 0 ? 2 : 1);
    int64_t next_unit = 0; /* units are claimed in order, as threads come free (or one ahead) */
#pragma omp parallel if (num_units > 1 && M * N * K > 65536)
    {
#ifdef HAVE_AMX
        if (amx) amx_configure(M < 16 ? (int)M : 16); /* each thread's own tile state */
#endif
        int64_t unit = __atomic_fetch_add(&next_unit, 1, __ATOMIC_RELAXED);
        while (unit < num_units) {
            /* the last unit goes to whichever thread comes free: one claimed ahead cannot be taken by
               another thread, should its own lose its core a while */
            const int64_t following = ahead && __atomic_load_n(&next_unit, __ATOMIC_RELAXED) + 1 < num_units
                                          ? __atomic_fetch_add(&next_unit, 1, __ATOMIC_RELAXED)
                                          : -1;
            const int64_t b0 = unit * UNIT, b1 = b0 + UNIT < num_blocks ? b0 + UNIT : num_blocks;
            ahead_t next, *a = NULL;
            if (following >= 0 && following < num_units) {
                const int64_t f0 = following * UNIT, f1 = f0 + UNIT < num_blocks ? f0 + UNIT : num_blocks;
                const char *wb = (const char *)w;
                next.at = wb + f0 * block_bytes, next.end = wb + f1 * block_bytes;
                next.at2 = next.end2 = next.end;
                if (pair > 0) next.at2 = wb + (pair + f0) * block_bytes, next.end2 = wb + (pair + f1) * block_bytes;
                const int64_t lines = (f1 - f0) * block_bytes / 64 * (pair > 0 ? 2 : 1);
                next.per_tile = (lines + tiles - 1) / tiles, next.credit = 0;
                a = &next;
            }
#ifdef HAVE_AMX
            if (amx) {
                amx_unit(x, M, ldx, w, K2, bias, y, ldy, b0, b1, N);
                if (pair > 0) amx_unit(x, M, ldx, w, K2, bias, y, ldy, pair + b0, pair + b1, N);
            }
#endif
            for (int64_t m0 = 0; !amx && m0 < M; m0 += ROWS) {
                const int R = M - m0 < ROWS ? (int)(M - m0) : ROWS;
                const row_t *tile_x = rows + m0 * ld;
                uint16_t *tile_y = y + m0 * ldy;
                unit_rows(R, tile_x, ld, w, K2, bias, tile_y, ldy, b0, b1, N, a);
                if (pair > 0) unit_rows(R, tile_x, ld, w, K2, bias, tile_y, ldy, pair + b0, pair + b1, N, a);
            }
            const int64_t n0 = b0 * BLOCK, n1 = b1 * BLOCK < width ? b1 * BLOCK : width;
            if (after == SILU_MUL) silu_mul_rows(y + n0, ldy, y + width + n0, ldy, M, n1 - n0, out + n0, ldo);
            if (after == ADD) add_rows(y + n0, ldy, out + n0, ldo, M, n1 - n0);
            unit = following >= 0 ? following : __atomic_fetch_add(&next_unit, 1, __ATOMIC_RELAXED);
        }
#ifdef HAVE_AMX
        if (amx) _tile_release();
#endif
    }
    if (rows) release_rows(rows);
    return 0;
}

/* Returns 0, -1 for shapes it does not take, -2 when memory for the widened rows ran out. */
int linear_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                const float *bias, uint16_t *y, int64_t ldy) {
    return run_units(x, M, K, ldx, w, N, bias, y, ldy, 0, WRITE_ONLY, NULL, 0);
}

/* A Llama MLP's gate/up product and what follows it, in one call: w packs [gate; up] (2n outputs, n a
   multiple of BLOCK); y (M, 2n) receives both products as linear_bf16 writes them, and h (M, n) =
   silu(gate) * up with torch's bits (silu.h). Returns as linear_bf16. */
int linear_bf16_silu_mul(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t n,
                         const float *bias, uint16_t *y, int64_t ldy, uint16_t *h, int64_t ldh) {
    if (n < 0 || n % BLOCK != 0) return -1;
    return run_units(x, M, K, ldx, w, 2 * n, bias, y, ldy, n / BLOCK, SILU_MUL, h, ldh);
}

/* A product that ends in a residual add (a Llama layer's o_proj and down_proj), in one call: y (M, N)
   receives x W^T (+ bias) as linear_bf16 writes it, and residual (M, N) += y in place with torch's
   bits (add_rows). Returns as linear_bf16. */
int linear_bf16_add(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                    const float *bias, uint16_t *y, int64_t ldy, uint16_t *residual, int64_t ldr) {
    return run_units(x, M, K, ldx, w, N, bias, y, ldy, 0, ADD, residual, ldr);
}

#else /* neither AVX512-BF16 nor AVX2 + FMA here: engine/native_linear.py keeps oneDNN */

int linear_bf16_supported(void) { return 0; }

const char *linear_bf16_isa(void) { return "none"; }

int linear_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                const float *bias, uint16_t *y, int64_t ldy) {
    (void)x; (void)M; (void)K; (void)ldx; (void)w; (void)N; (void)bias; (void)y; (void)ldy;
    return -1;
}

int linear_bf16_silu_mul(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t n,
                         const float *bias, uint16_t *y, int64_t ldy, uint16_t *h, int64_t ldh) {
    (void)x; (void)M; (void)K; (void)ldx; (void)w; (void)n; (void)bias; (void)y; (void)ldy; (void)h; (void)ldh;
    return -1;
}

int linear_bf16_add(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                    const float *bias, uint16_t *y, int64_t ldy, uint16_t *residual, int64_t ldr) {
    (void)x; (void)M; (void)K; (void)ldx; (void)w; (void)N; (void)bias; (void)y; (void)ldy; (void)residual;
    (void)ldr;
    return -1;
}

#endif

/* The two epilogues alone, in every build, for the checks against torch (engine/product_kernel.py). */
void silu_mul_bf16(const uint16_t *gate, int64_t ldg, const uint16_t *up, int64_t ldu, int64_t rows, int64_t n,
                   uint16_t *out, int64_t ldo) {
    silu_mul_rows(gate, ldg, up, ldu, rows, n, out, ldo);
}

void add_bf16(const uint16_t *y, int64_t ldy, uint16_t *residual, int64_t ldr, int64_t rows, int64_t n) {
    add_rows(y, ldy, residual, ldr, rows, n);
}
