/* Attention straight from the paged KV cache, for the CPU: decode and prefill rows alike.

   Each row is one query token that attends to the first ctx_lens[row] cached positions of its
   sequence (its own k/v already written), read in place through the row's block table (no gather
   copy). A prefill of n tokens comes as n rows of one block table with lengths start+1 .. start+n,
   which is causal attention with nothing computed for the masked half. Every row (or row and kv head)
   is computed on its own, in a fixed order, in float32: a row's result never depends on the rest of
   the batch. bf16 with 16-token pages and head_dim 64/128/256 takes the AVX-512 path where the
   compiler targets AVX-512F (q.k by AVX512-BF16 dot-product instructions where the CPU has them, else
   by widening the keys to float32 and FMAs; p.v in float32 either way). Without AVX-512, on AVX2 + FMA,
   the q.k of bf16 16-token pages (head_dim a multiple of 8, up to 256) is computed eight positions at
   a time (`qk_avx2`) and their p.v (head_dim a multiple of 32) with its sums in registers (`pv_avx2`),
   the softmax by the generic loop; everything else is the generic loop.

   Layouts (contiguous, row-major): query and out (num_seqs, num_heads, head_dim); k_cache and v_cache
   (num_slots, num_kv_heads, head_dim); block_tables (num_seqs, table_width) int64; ctx_lens (num_seqs)
   int64. dtype 0 = float32, 1 = bfloat16. window <= 0: no sliding window; softcap <= 0: none.
   Returns 0, or -1 when scratch memory could not be allocated. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_max_threads(void) { return 1; }
#endif

/* e^x in float32 within ~2 ulp on [-87, 88] (x is clamped to that range: e^-87 ~ 1.6e-38 stands in for
   anything smaller, the tail of a softmax), written without calls or branches so that the compiler
   vectorizes the softmax loop: libm's expf is a scalar call per score, and it was most of a decode
   step's attention time. Cephes' polynomial after x = n ln2 + r, |r| <= ln2/2; the two-part ln2 is
   subtracted with explicit fmaf, which -fassociative-math may not merge. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p * r, r, r) + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* n scores -> probabilities in place: soft-capping if asked, then softmax with the maximum subtracted. */
static inline void softmax_in_place(float *restrict sh, int64_t n, float softcap) {
    if (softcap > 0.0f)
        for (int64_t t = 0; t < n; t++) sh[t] = tanhf(sh[t] / softcap) * softcap;
    float top = sh[0];
    for (int64_t t = 1; t < n; t++) top = sh[t] > top ? sh[t] : top;
    float total = 0.0f;
    for (int64_t t = 0; t < n; t++) {
        sh[t] = exp_approx(sh[t] - top);
        total += sh[t];
    }
    const float inv = 1.0f / total;
    for (int64_t t = 0; t < n; t++) sh[t] *= inv;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_FAST_BF16 1

/* The 16 sums of 16 vectors: r[j] = sum of v[j]'s lanes, in one fixed order (a transposing tree). */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 w[8], z[4];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        z[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* z[i], 128-bit quarter L, position p: vector 4i+p's lanes of quarter L, summed */
    const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* 16 floats -> 16 bf16 as f32_to_bf16 rounds (nearest even, NaN kept NaN) */
static inline void store16_bf16(__m512 v, uint16_t *y) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    f32x16_store_bf16(v, y, 0, 16);
#else
    float row[16];
    _mm512_storeu_ps(row, v);
    for (int i = 0; i < 16; i++) y[i] = f32_to_bf16(row[i]);
#endif
}

/* The query of one head and one key's q.k partial sums (16 lanes, summed by `sum16`), per CPU: */
#ifdef __AVX512BF16__
#define FAST_QK "avx512bf16"
/* q as HD/32 registers of bf16 pairs; the bf16 dot-product instruction. */
#define QK_QUERY(HD, src) \
    __m512bh q[HD / 32];  \
    for (int j = 0; j < HD / 32; j++) q[j] = (__m512bh)_mm512_loadu_si512((src) + 32 * j)
#define QK_KEY(HD, a, key) \
    for (int j = 0; j < HD / 32; j++) a = _mm512_dpbf16_ps(a, q[j], (__m512bh)_mm512_loadu_si512((key) + 32 * j))
#else
#define FAST_QK "avx512f"
/* Without AVX512-BF16 (Skylake-SP to Ice Lake): q widened to float32 in HD/16 registers, each key
   widened as it is read, one FMA per 16 dims. (Widening a page's keys once for all the heads of the
   group measured no faster on Ice Lake.) */
#define QK_QUERY(HD, src) \
    __m512 q[HD / 16];    \
    for (int j = 0; j < HD / 16; j++) q[j] = bf16x16_to_f32((src) + 16 * j)
#define QK_KEY(HD, a, key) \
    for (int j = 0; j < HD / 16; j++) a = _mm512_fmadd_ps(q[j], bf16x16_to_f32((key) + 16 * j), a)
#endif

/* While the first head's q.k reads page pg: the next page's keys and this page's values of this kv head
   asked for ahead (the pages lie anywhere in the cache, where no hardware prefetcher looks). */
#define PREFETCH_PAGES(HD, pg)                                                                          \
    do {                                                                                                \
        const char *nk = pg + 1 < pages ? (const char *)(k_base + table[page0 + pg + 1] * 16 * row_stride) : 0; \
        const char *pv = (const char *)(v_base + table[page0 + pg] * 16 * row_stride);                  \
        for (int t = 0; t < 16; t++)                                                                    \
            for (int l = 0; l < HD * 2; l += 64) {                                                      \
                if (nk) _mm_prefetch(nk + t * row_stride * 2 + l, _MM_HINT_T0);                         \
                _mm_prefetch(pv + t * row_stride * 2 + l, _MM_HINT_T0);                                 \
            }                                                                                           \
    } while (0)

/* q.k * scale of NH heads against the pages of one kv head, sixteen keys (a page) at a time. */
#define QK_SCORES(HD, NH)                                                                               \
    for (int h = 0; h < NH; h++) {                                                                      \
        QK_QUERY(HD, qrows[h]);                                                                         \
        float *sh = scores + h * score_stride;                                                          \
        for (int64_t pg = 0; pg < pages; pg++) {                                                        \
            const uint16_t *k = k_base + table[page0 + pg] * 16 * row_stride;                           \
            if (h == 0) PREFETCH_PAGES(HD, pg);                                                         \
            __m512 acc[16];                                                                             \
            for (int t = 0; t < 16; t++) {                                                              \
                __m512 a = _mm512_setzero_ps();                                                         \
                QK_KEY(HD, a, k + t * row_stride);                                                      \
                acc[t] = a;                                                                             \
            }                                                                                           \
            _mm512_storeu_ps(sh + 16 * pg, _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));           \
        }                                                                                               \
    }

/* One kv head of one sequence, bfloat16, 16-token pages: q.k sixteen tokens (one page) at a time,
   each token's partial sums in one register, the sixteen summed by `sum16` (`QK_SCORES`); softmax as
   the generic path (`softmax_in_place`); p.v in float32 with up to NH heads' accumulators in
   registers. Every (sequence, kv head) is computed the same way whatever the batch. */
#define FAST_KV(HD, NH)                                                                                 \
    static inline __attribute__((always_inline)) void fast_kv_##HD##_##NH(                              \
        const uint16_t *const *qrows, uint16_t *const *orows, const uint16_t *k_base, const uint16_t *v_base, \
        const int64_t *table, int64_t row_stride, int64_t first, int64_t len, float scale, float softcap, \
        float *restrict scores, int64_t score_stride) {                                                 \
        const int64_t page0 = first / 16, pages = (len - 1) / 16 - page0 + 1, off = first - page0 * 16; \
        const int64_t n = len - first;                                                                  \
        QK_SCORES(HD, NH)                                                                               \
        for (int h = 0; h < NH; h++) softmax_in_place(scores + h * score_stride + off, n, softcap);    \
        __m512 acc[NH][HD / 16];                                                                        \
        for (int h = 0; h < NH; h++)                                                                    \
            for (int j = 0; j < HD / 16; j++) acc[h][j] = _mm512_setzero_ps();                          \
        for (int64_t pg = 0, t = 0; pg < pages; pg++) { /* positions in ascending order, a page at a time */ \
            const int64_t from = pg == 0 ? off : 0, to = pg == pages - 1 ? (len - 1) % 16 + 1 : 16;     \
            const uint16_t *v = v_base + (table[page0 + pg] * 16 + from) * row_stride;                  \
            for (int64_t i = from; i < to; i++, t++, v += row_stride) {                                 \
                __m512 vf[HD / 16];                                                                     \
                for (int j = 0; j < HD / 16; j++) vf[j] = bf16x16_to_f32(v + 16 * j);                   \
                for (int h = 0; h < NH; h++) {                                                          \
                    const __m512 p = _mm512_set1_ps(scores[h * score_stride + off + t]);                \
                    for (int j = 0; j < HD / 16; j++) acc[h][j] = _mm512_fmadd_ps(p, vf[j], acc[h][j]); \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int h = 0; h < NH; h++) /* rounded as f32_to_bf16 rounds, sixteen at a time */           \
            for (int j = 0; j < HD / 16; j++) store16_bf16(acc[h][j], orows[h] + 16 * j);               \
    }
FAST_KV(64, 1)
FAST_KV(64, 2)
FAST_KV(64, 3)
FAST_KV(64, 4)
FAST_KV(128, 1)
FAST_KV(128, 2)
FAST_KV(256, 1)
#undef FAST_KV

/* The heads of one kv head in chunks whose accumulators fit in registers. */
static inline __attribute__((always_inline)) void fast_kv(
    int64_t head_dim, const uint16_t *query, uint16_t *out, const uint16_t *k_cache, const uint16_t *v_cache,
    const int64_t *table, int64_t s, int64_t kvh, int64_t num_heads, int64_t num_kv_heads, int64_t first,
    int64_t len, float scale, float softcap, float *restrict scores, int64_t score_stride) {
    const int64_t group = num_heads / num_kv_heads, row_stride = num_kv_heads * head_dim;
    const uint16_t *k_base = k_cache + kvh * head_dim, *v_base = v_cache + kvh * head_dim;
    const int chunk = head_dim == 64 ? 4 : (head_dim == 128 ? 2 : 1);
    for (int64_t h0 = 0; h0 < group; h0 += chunk) {
        const int nh = (int)(group - h0 < chunk ? group - h0 : chunk);
        const uint16_t *qrows[4];
        uint16_t *orows[4];
        for (int h = 0; h < nh; h++) {
            const int64_t row = s * num_heads + kvh * group + h0 + h;
            qrows[h] = query + row * head_dim;
            orows[h] = out + row * head_dim;
        }
#define CALL(HD, NH) fast_kv_##HD##_##NH(qrows, orows, k_base, v_base, table, row_stride, first, len, scale, softcap, scores, score_stride)
        if (head_dim == 64) {
            if (nh == 4) CALL(64, 4); else if (nh == 3) CALL(64, 3); else if (nh == 2) CALL(64, 2); else CALL(64, 1);
        } else if (head_dim == 128) {
            if (nh == 2) CALL(128, 2); else CALL(128, 1);
        } else {
            CALL(256, 1);
        }
#undef CALL
    }
}
#endif

#if !defined(HAVE_FAST_BF16) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2_QK 1

/* The 8 sums of 8 vectors: r[j] = sum of v[j]'s lanes, in one fixed order. */
static inline __m256 sum8(const __m256 v[8]) {
    const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
    /* a: v0..v3's sums of lanes 0-3, then of lanes 4-7; b: the same for v4..v7 */
    const __m256 a = _mm256_hadd_ps(h01, h23), b = _mm256_hadd_ps(h45, h67);
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* q . k * scale for the `heads` query heads of one kv head (q in float32, head_dim floats each), bf16
   keys in 16-token pages, eight positions at a time from the 8-aligned one at or before `first`: the
   eight keys are widened to float32 once for every head, and each head's eight dot products are summed
   by `sum8` (no horizontal sum per product). scores[h * score_stride + i] is position base + i, with
   base = first rounded down to 8. An aligned block of 8 never leaves its page, so the positions
   computed before `first` and after len - 1 are slots of pages the sequence owns (their scores are
   not used). */
static inline __attribute__((always_inline)) void qk_avx2(
    const float *restrict q, int64_t heads, int64_t head_dim, const uint16_t *k_base, int64_t row_stride,
    const int64_t *table, int64_t first, int64_t len, float scale, float *restrict scores,
    int64_t score_stride) {
    float kf[8 * 256] __attribute__((aligned(32)));
    const int64_t base = first / 8 * 8;
    for (int64_t b = base; b < len; b += 8) {
        const uint16_t *k = k_base + (table[b / 16] * 16 + b % 16) * row_stride;
        for (int t = 0; t < 8; t++)
            for (int64_t j = 0; j < head_dim; j += 8)
                _mm256_store_ps(kf + t * head_dim + j, bf16x8_to_f32(k + t * row_stride + j));
        for (int64_t h = 0; h < heads; h++) {
            __m256 acc[8];
            for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();
            for (int64_t j = 0; j < head_dim; j += 8) {
                const __m256 qv = _mm256_loadu_ps(q + h * head_dim + j);
                for (int t = 0; t < 8; t++)
                    acc[t] = _mm256_fmadd_ps(qv, _mm256_load_ps(kf + t * head_dim + j), acc[t]);
            }
            const __m256 dots = _mm256_mul_ps(sum8(acc), _mm256_set1_ps(scale));
            _mm256_storeu_ps(scores + h * score_stride + (b - base), dots);
        }
    }
}

/* acc = p . v for NH (1 or 2) query heads of one kv head, over positions first .. first + n - 1 of bf16
   values in 16-token pages: 32 dimensions at a time, their NH x 4 sums held in registers for the whole
   run of positions (the generic loop below loads and stores every sum at every position). Each sum is
   the same chain of FMAs in ascending position order as the generic loop's, so the bits are the same.
   scores[h * score_stride + t] is position first + t's probability for head h; acc is NH x head_dim. */
static inline __attribute__((always_inline)) void pv_avx2(
    const int NH, const float *restrict scores, int64_t score_stride, int64_t n, int64_t first,
    const int64_t *table, const uint16_t *v_base, int64_t row_stride, int64_t head_dim, float *restrict acc) {
    for (int64_t j0 = 0; j0 < head_dim; j0 += 32) {
        __m256 a[2][4];
        for (int h = 0; h < NH; h++)
            for (int c = 0; c < 4; c++) a[h][c] = _mm256_setzero_ps();
        for (int64_t t = 0; t < n; t++) {
            const int64_t pos = first + t;
            const uint16_t *v = v_base + (table[pos / 16] * 16 + pos % 16) * row_stride + j0;
            __m256 vf[4];
            for (int c = 0; c < 4; c++) vf[c] = bf16x8_to_f32(v + 8 * c);
            for (int h = 0; h < NH; h++) {
                const __m256 p = _mm256_set1_ps(scores[h * score_stride + t]);
                for (int c = 0; c < 4; c++) a[h][c] = _mm256_fmadd_ps(p, vf[c], a[h][c]);
            }
        }
        for (int h = 0; h < NH; h++)
            for (int c = 0; c < 4; c++) _mm256_storeu_ps(acc + h * head_dim + j0 + 8 * c, a[h][c]);
    }
}
#endif

/* n values starting at element `offset` of base, as float32 */
static inline void load_span(const void *base, int64_t offset, int64_t n, int dtype, float *restrict dst) {
    if (dtype == 0) {
        memcpy(dst, (const float *)base + offset, (size_t)n * sizeof(float));
    } else {
        const uint16_t *src = (const uint16_t *)base + offset;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    }
}

static inline void store_row(void *base, int64_t row, int64_t n, int dtype, const float *restrict src) {
    if (dtype == 0) {
        memcpy((float *)base + row * n, src, (size_t)n * sizeof(float));
    } else {
        uint16_t *dst = (uint16_t *)base + row * n;
        for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
    }
}

/* Work item: the query heads of kv heads [kv_begin, kv_end) of sequence s attend to its cached tokens.
   Each cached token's keys (and values) for those heads are one contiguous run, read once. */
static inline __attribute__((always_inline)) void attend(
    const int dtype, const void *query, const void *k_cache, const void *v_cache, const int64_t *table,
    int64_t len, int64_t s, int64_t kv_begin, int64_t kv_end, int64_t num_heads, int64_t num_kv_heads,
    const int64_t head_dim, const int64_t block_size, float scale, int64_t window, float softcap,
    void *out, int64_t score_stride, float *restrict scores, float *restrict q, float *restrict acc,
    float *restrict row) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t num_kv = kv_end - kv_begin, heads = num_kv * group, width = num_kv * head_dim;
    const int64_t first = (window > 0 && len > window) ? len - window : 0;
#ifdef HAVE_FAST_BF16
    if (dtype == 1 && block_size == 16 && (head_dim == 64 || head_dim == 128 || head_dim == 256)) {
        for (int64_t kvh = kv_begin; kvh < kv_end; kvh++)
            fast_kv(head_dim, query, out, k_cache, v_cache, table, s, kvh, num_heads, num_kv_heads, first, len,
                    scale, softcap, scores, score_stride);
        return;
    }
#endif
    const int64_t n = len - first;
    const int64_t head0 = s * num_heads + kv_begin * group; /* first query row of this item */
    for (int64_t h = 0; h < heads; h++) load_span(query, (head0 + h) * head_dim, head_dim, dtype, q + h * head_dim);
    int64_t off = 0; /* scores[h * score_stride + off + t] is position first + t */
#ifdef HAVE_AVX2_QK
    if (dtype == 1 && block_size == 16 && head_dim % 8 == 0 && head_dim <= 256) {
        off = first - first / 8 * 8; /* qk_avx2 starts at the 8-aligned position, as fast_kv at the page */
        for (int64_t kvh = 0; kvh < num_kv; kvh++)
            qk_avx2(q + kvh * group * head_dim, group, head_dim,
                    (const uint16_t *)k_cache + (kv_begin + kvh) * head_dim, num_kv_heads * head_dim, table,
                    first, len, scale, scores + kvh * group * score_stride, score_stride);
    } else
#endif
    for (int64_t t = 0; t < n; t++) { /* scores = q . k * scale */
        const int64_t pos = first + t;
        const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
        load_span(k_cache, (slot * num_kv_heads + kv_begin) * head_dim, width, dtype, row);
        for (int64_t h = 0; h < heads; h++) {
            const float *qh = q + h * head_dim, *kh = row + (h / group) * head_dim;
            float dot = 0.0f;
            for (int64_t i = 0; i < head_dim; i++) dot += qh[i] * kh[i];
            scores[h * score_stride + t] = dot * scale;
        }
    }
    for (int64_t h = 0; h < heads; h++) softmax_in_place(scores + h * score_stride + off, n, softcap);
#ifdef HAVE_AVX2_QK
    if (dtype == 1 && block_size == 16 && head_dim % 32 == 0 && head_dim <= 256) {
        for (int64_t kvh = 0; kvh < num_kv; kvh++) {
            const uint16_t *v_base = (const uint16_t *)v_cache + (kv_begin + kvh) * head_dim;
            for (int64_t h0 = 0; h0 < group; h0 += 2) {
                const int64_t h = kvh * group + h0;
                const float *p = scores + h * score_stride + off;
                if (group - h0 >= 2)
                    pv_avx2(2, p, score_stride, n, first, table, v_base, num_kv_heads * head_dim, head_dim,
                            acc + h * head_dim);
                else
                    pv_avx2(1, p, score_stride, n, first, table, v_base, num_kv_heads * head_dim, head_dim,
                            acc + h * head_dim);
            }
        }
    } else
#endif
    {
        memset(acc, 0, sizeof(float) * (size_t)(heads * head_dim));
        for (int64_t t = 0; t < n; t++) { /* acc += p * v */
            const int64_t pos = first + t;
            const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
            load_span(v_cache, (slot * num_kv_heads + kv_begin) * head_dim, width, dtype, row);
            for (int64_t h = 0; h < heads; h++) {
                const float p = scores[h * score_stride + off + t];
                const float *vh = row + (h / group) * head_dim;
                float *ah = acc + h * head_dim;
                for (int64_t i = 0; i < head_dim; i++) ah[i] += p * vh[i];
            }
        }
    }
    for (int64_t h = 0; h < heads; h++) store_row(out, head0 + h, head_dim, dtype, acc + h * head_dim);
}

/* Which of the paths above this build compiled (engine/native_build.py names it in test output). */
const char *decode_attention_isa(void) {
#if defined(HAVE_FAST_BF16)
    return FAST_QK;
#elif defined(HAVE_AVX2_QK)
    return "avx2";
#else
    return "generic";
#endif
}

int decode_attention(int dtype, const void *query, const void *k_cache, const void *v_cache,
                     const int64_t *block_tables, int64_t table_width, const int64_t *ctx_lens,
                     int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                     int64_t block_size, float scale, int64_t window, float softcap, void *out) {
    int64_t max_len = 1;
    for (int64_t s = 0; s < num_seqs; s++) max_len = ctx_lens[s] > max_len ? ctx_lens[s] : max_len;
    /* Work items: whole sequences when there are enough for every thread, else (sequence, kv head). */
    const int64_t split = num_seqs >= omp_get_max_threads() ? 1 : num_kv_heads;
    const int64_t kv_per_item = num_kv_heads / split;
    /* A row of scores: the bf16 path writes whole 16-token pages, from the page of the first position. */
    const int64_t score_stride = max_len + 32;
    /* per thread: scores (heads x score_stride), q and acc (heads x head_dim each), one k/v row */
    const size_t scratch_floats = (size_t)(num_heads * score_stride + 2 * num_heads * head_dim + num_kv_heads * head_dim);
    int failed = 0;
    /* OpenMP from the runtime torch already loaded (same soname): the engine thread's team is reused. */
#pragma omp parallel reduction(| : failed)
    {
        float *scratch = malloc(sizeof(float) * scratch_floats);
        failed = scratch == NULL;
        float *scores = scratch, *q = scores + num_heads * score_stride, *acc = q + num_heads * head_dim;
        float *row = acc + num_heads * head_dim;
#define ATTEND(DTYPE, HD, BS)                                                                          \
    attend(DTYPE, query, k_cache, v_cache, block_tables + s * table_width, ctx_lens[s], s, kv_begin,    \
           kv_begin + kv_per_item, num_heads, num_kv_heads, HD, BS, scale, window, softcap, out,        \
           score_stride, scores, q, acc, row)
#pragma omp for schedule(dynamic, 1) /* taken as threads come free: a prefill's rows grow in length, and a thread that starts late (or loses its core a while) leaves its items to the others */
        for (int64_t item = 0; item < num_seqs * split; item++) {
            if (failed) continue;
            const int64_t s = item / split, kv_begin = (item % split) * kv_per_item;
            /* constant copies for the common shapes; anything else takes the generic loop */
            if (dtype == 1 && head_dim == 64 && block_size == 16) ATTEND(1, 64, 16);
            else if (dtype == 1 && head_dim == 128 && block_size == 16) ATTEND(1, 128, 16);
            else if (dtype == 1 && head_dim == 256 && block_size == 16) ATTEND(1, 256, 16);
            else if (dtype == 0 && head_dim == 64 && block_size == 16) ATTEND(0, 64, 16);
            else if (dtype == 0 && head_dim == 128 && block_size == 16) ATTEND(0, 128, 16);
            else ATTEND(dtype, head_dim, block_size);
        }
#undef ATTEND
        free(scratch);
    }
    return failed ? -1 : 0;
}
