/* A step's Llama layers as one C call: the kernels of engine/native_layers.py (RMSNorm, the q/k/v product,
   rotary with the KV-cache write, attention, the o product with its residual add, RMSNorm, gate/up with
   SiLU, down with its residual add) called in that order for every layer, with the arguments their
   Python wrappers would pass them, so the same bits.

   Why: from Python each of a layer's eight calls costs its argument conversion and a release and
   re-acquisition of the GIL (240 a SmolLM2 step). On the serving path the replica's event loop holds the
   GIL between those calls, and each kernel waits for it before the next one starts (docs/performance.md).
   Here the engine thread releases the GIL once for the whole stack of layers.

   The kernels are the other libraries' functions, passed as pointers (struct llama_kernels), so each
   keeps its own build flags. Returns 0, or the first non-zero status of a kernel with *failed set to
   layer * 8 + the call's index in the layer (0 norm1, 1 qkv, 2 rotary, 3 attention, 4 o, 5 norm2,
   6 gate/up, 7 down): engine/native_layers.py raises for it what that kernel's wrapper raises. */

#include <stdint.h>
#include <string.h>

typedef int (*norm_fn)(int kind, const uint16_t *x, int64_t rows, int64_t n, int64_t ldx, const void *weight,
                       float eps, uint16_t *out);
typedef int (*product_fn)(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                          const float *bias, uint16_t *y, int64_t ldy);
typedef int (*epilogue_fn)(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                           const float *bias, uint16_t *y, int64_t ldy, uint16_t *out, int64_t ldo);
typedef int (*rotary_fn)(const uint16_t *cos, const uint16_t *sin, uint16_t *qkv, int64_t num_tokens,
                         int64_t row_stride, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                         const int64_t *slots, uint16_t *k_cache, uint16_t *v_cache);
typedef int (*attention_fn)(int dtype, const void *query, const void *k_cache, const void *v_cache,
                            const int64_t *block_tables, int64_t table_width, const int64_t *ctx_lens,
                            int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                            int64_t block_size, float scale, int64_t window, float softcap, void *out);

struct llama_kernels {
    norm_fn norm;
    product_fn product;
    epilogue_fn silu_mul; /* linear_bf16_silu_mul */
    epilogue_fn add;      /* linear_bf16_add */
    rotary_fn rotary;
    attention_fn attention;
};

struct llama_layer { /* one layer's weights (packed products, bf16 norms) and its cache */
    const void *norm1, *norm2;
    const uint16_t *qkv, *o, *gate_up, *down;
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias; /* NULL: none */
    uint16_t *k_cache, *v_cache;
    float eps1, eps2, scale;
    int64_t window;
};

struct llama_step { /* the step's tensors (rows x their width, contiguous) and the model's sizes */
    uint16_t *hidden, *normed, *qkv, *query, *attended, *product, *both, *gated;
    const uint16_t *cos, *sin;
    const int64_t *tables, *lens, *slots;
    int64_t rows, table_width, block_size;
    int64_t width, qkv_size, q_size, attn_size, mlp_size, num_q_heads, num_kv_heads, head_dim;
    int32_t norm_kind, dtype_code;
};

#define CHECK(call, index)                                                                                  \
    do {                                                                                                    \
        const int status_ = (call);                                                                         \
        if (status_ != 0) {                                                                                 \
            *failed = layer * 8 + (index);                                                                  \
            return status_;                                                                                 \
        }                                                                                                   \
    } while (0)

int llama_layers(const struct llama_kernels *k, const struct llama_layer *layers, int64_t num_layers,
                 const struct llama_step *s, int64_t *failed) {
    const int64_t rows = s->rows, width = s->width, qkv_size = s->qkv_size, mlp = s->mlp_size;
    for (int64_t layer = 0; layer < num_layers; layer++) {
        const struct llama_layer *l = layers + layer;
        CHECK(k->norm(s->norm_kind, s->hidden, rows, width, width, l->norm1, l->eps1, s->normed), 0);
        CHECK(k->product(s->normed, rows, width, width, l->qkv, qkv_size, l->qkv_bias, s->qkv, qkv_size), 1);
        CHECK(k->rotary(s->cos, s->sin, s->qkv, rows, qkv_size, s->num_q_heads, s->num_kv_heads, s->head_dim,
                        s->slots, l->k_cache, l->v_cache),
              2);
        for (int64_t r = 0; r < rows; r++) /* the rotated q heads, contiguous for attention */
            memcpy(s->query + r * s->q_size, s->qkv + r * qkv_size, (size_t)s->q_size * sizeof(uint16_t));
        CHECK(k->attention(s->dtype_code, s->query, l->k_cache, l->v_cache, s->tables, s->table_width, s->lens,
                           rows, s->num_q_heads, s->num_kv_heads, s->head_dim, s->block_size, l->scale,
                           l->window, 0.0f, s->attended),
              3);
        CHECK(k->add(s->attended, rows, s->attn_size, s->attn_size, l->o, width, l->o_bias, s->product, width,
                     s->hidden, width),
              4);
        CHECK(k->norm(s->norm_kind, s->hidden, rows, width, width, l->norm2, l->eps2, s->normed), 5);
        CHECK(k->silu_mul(s->normed, rows, width, width, l->gate_up, mlp, l->gate_up_bias, s->both, 2 * mlp,
                          s->gated, mlp),
              6);
        CHECK(k->add(s->gated, rows, mlp, mlp, l->down, width, l->down_bias, s->product, width, s->hidden, width),
              7);
    }
    return 0;
}
