/* Decode attention straight from the paged KV cache, for the CPU.

   One query token per sequence attends to its cached keys/values, read in place through the
   sequence's block table (no gather copy). Every (sequence, kv head) pair is computed on its own, in a
   fixed order, in float32: a sequence's result never depends on the rest of the batch.

   Layouts (contiguous, row-major): query and out (num_seqs, num_heads, head_dim); k_cache and v_cache
   (num_slots, num_kv_heads, head_dim); block_tables (num_seqs, table_width) int64; ctx_lens (num_seqs)
   int64. dtype 0 = float32, 1 = bfloat16. window <= 0: no sliding window; softcap <= 0: none.
   Returns 0, or -1 when scratch memory could not be allocated. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN kept NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void load_row(const void *base, int64_t row, int64_t n, int dtype, float *restrict dst) {
    if (dtype == 0) {
        memcpy(dst, (const float *)base + row * n, (size_t)n * sizeof(float));
    } else {
        const uint16_t *src = (const uint16_t *)base + row * n;
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

/* One (sequence, kv head) pair: its `group` query heads attend to the sequence's cached tokens. */
static inline __attribute__((always_inline)) void attend_pair(
    const int dtype, const void *query, const void *k_cache, const void *v_cache, const int64_t *table,
    int64_t len, int64_t s, int64_t kvh, int64_t num_heads, int64_t num_kv_heads, const int64_t head_dim,
    const int64_t block_size, float scale, int64_t window, float softcap, void *out, int64_t max_len,
    float *restrict scores, float *restrict q, float *restrict acc, float *restrict row) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t first = (window > 0 && len > window) ? len - window : 0;
    const int64_t n = len - first;
    for (int64_t g = 0; g < group; g++)
        load_row(query, s * num_heads + kvh * group + g, head_dim, dtype, q + g * head_dim);
    for (int64_t t = 0; t < n; t++) { /* scores = q . k * scale */
        const int64_t pos = first + t;
        const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
        load_row(k_cache, slot * num_kv_heads + kvh, head_dim, dtype, row);
        for (int64_t g = 0; g < group; g++) {
            const float *qg = q + g * head_dim;
            float dot = 0.0f;
            for (int64_t i = 0; i < head_dim; i++) dot += qg[i] * row[i];
            scores[g * max_len + t] = dot * scale;
        }
    }
    for (int64_t g = 0; g < group; g++) { /* softmax */
        float *sg = scores + g * max_len;
        if (softcap > 0.0f)
            for (int64_t t = 0; t < n; t++) sg[t] = tanhf(sg[t] / softcap) * softcap;
        float top = sg[0];
        for (int64_t t = 1; t < n; t++) top = sg[t] > top ? sg[t] : top;
        float total = 0.0f;
        for (int64_t t = 0; t < n; t++) {
            sg[t] = expf(sg[t] - top);
            total += sg[t];
        }
        const float inv = 1.0f / total;
        for (int64_t t = 0; t < n; t++) sg[t] *= inv;
    }
    memset(acc, 0, sizeof(float) * (size_t)(group * head_dim));
    for (int64_t t = 0; t < n; t++) { /* acc += p * v */
        const int64_t pos = first + t;
        const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
        load_row(v_cache, slot * num_kv_heads + kvh, head_dim, dtype, row);
        for (int64_t g = 0; g < group; g++) {
            const float p = scores[g * max_len + t];
            float *ag = acc + g * head_dim;
            for (int64_t i = 0; i < head_dim; i++) ag[i] += p * row[i];
        }
    }
    for (int64_t g = 0; g < group; g++)
        store_row(out, s * num_heads + kvh * group + g, head_dim, dtype, acc + g * head_dim);
}

int decode_attention(int dtype, const void *query, const void *k_cache, const void *v_cache,
                     const int64_t *block_tables, int64_t table_width, const int64_t *ctx_lens,
                     int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                     int64_t block_size, float scale, int64_t window, float softcap, void *out) {
    const int64_t group = num_heads / num_kv_heads;
    int64_t max_len = 1;
    for (int64_t s = 0; s < num_seqs; s++) max_len = ctx_lens[s] > max_len ? ctx_lens[s] : max_len;
    /* per thread: scores (group x max_len), q and acc (group x head_dim each), one k/v row */
    const size_t scratch_floats = (size_t)(group * max_len + 2 * group * head_dim + head_dim);
    int failed = 0;
    /* OpenMP from the runtime torch already loaded (same soname): the engine thread's team is reused. */
#pragma omp parallel reduction(| : failed)
    {
        float *scratch = malloc(sizeof(float) * scratch_floats);
        failed = scratch == NULL;
        float *scores = scratch, *q = scores + group * max_len, *acc = q + group * head_dim;
        float *row = acc + group * head_dim;
#define ATTEND(DTYPE, HD, BS)                                                                          \
    attend_pair(DTYPE, query, k_cache, v_cache, block_tables + s * table_width, ctx_lens[s], s, kvh,    \
                num_heads, num_kv_heads, HD, BS, scale, window, softcap, out, max_len, scores, q, acc,   \
                row)
#pragma omp for collapse(2) schedule(static)
        for (int64_t s = 0; s < num_seqs; s++) {
            for (int64_t kvh = 0; kvh < num_kv_heads; kvh++) {
                if (failed) continue;
                /* constant copies for the common shapes; anything else takes the generic loop */
                if (dtype == 1 && head_dim == 64 && block_size == 16) ATTEND(1, 64, 16);
                else if (dtype == 1 && head_dim == 128 && block_size == 16) ATTEND(1, 128, 16);
                else if (dtype == 0 && head_dim == 64 && block_size == 16) ATTEND(0, 64, 16);
                else if (dtype == 0 && head_dim == 128 && block_size == 16) ATTEND(0, 128, 16);
                else ATTEND(dtype, head_dim, block_size);
            }
        }
#undef ATTEND
        free(scratch);
    }
    return failed ? -1 : 0;
}
