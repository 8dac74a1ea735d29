/* The index of each row's largest value, as torch.argmax picks it: the first of equal maxima, any NaN
   counts as the largest (the first NaN wins), -0 equals +0. Rows of float32 or of bf16.

   Why: greedy decoding takes the argmax of every row of the step's logits, one row a sequence of the
   vocabulary's width (49,152 for SmolLM2). torch's CPU argmax is a scalar loop: 1.3-2.8 ms for 32
   float32 rows on a 2-core Ice Lake (~1-2 ns a value), 2-4 % of a decode step.

   How: each value's bits become an integer key of its width whose order is the values' order:
   positive values keep their bits, negative ones become the negated magnitude (-0 becomes 0), every
   NaN the largest key of all. Two passes a row, both plain C the compiler vectorizes: the largest key
   (lane-wise maxima over LANES values, then across the lanes), then the first position that holds it,
   found LANES values at a time. Rows are split among the OpenMP threads from 4 rows up.

   x (rows, n) with row stride ldx (in values); out (rows) int64. Returns -1 for shapes it refuses. */

#include <stdint.h>

#define LANES 32 /* values a pass handles at once */

static inline int32_t key_f32(uint32_t bits) {
    const int32_t magnitude = (int32_t)(bits & 0x7fffffffu);
    const int32_t sign = (int32_t)bits >> 31; /* 0, or -1 for a negative value */
    const int32_t key = (magnitude ^ sign) - sign; /* -magnitude when negative; -0 is 0 */
    return magnitude > 0x7f800000 ? INT32_MAX : key; /* NaN, either sign */
}

static inline int16_t key_bf16(uint16_t bits) {
    const int16_t magnitude = (int16_t)(bits & 0x7fffu);
    const int16_t sign = (int16_t)((int16_t)bits >> 15);
    const int16_t key = (int16_t)((magnitude ^ sign) - sign);
    return magnitude > 0x7f80 ? INT16_MAX : key;
}

/* row_argmax_<name>(row, n): the first index of the row's largest key */
#define ROW_ARGMAX(name, value_t, key_t, key_min, key_of)                                   \
    static int64_t row_argmax_##name(const value_t *row, int64_t n) {                        \
        key_t lanes[LANES];                                                                    \
        for (int l = 0; l < LANES; l++) lanes[l] = key_min;                                    \
        int64_t i = 0;                                                                         \
        for (; i + LANES <= n; i += LANES)                                                     \
            for (int l = 0; l < LANES; l++) {                                                  \
                const key_t key = key_of(row[i + l]);                                          \
                lanes[l] = key > lanes[l] ? key : lanes[l];                                    \
            }                                                                                  \
        key_t best = key_min;                                                                  \
        for (; i < n; i++) {                                                                   \
            const key_t key = key_of(row[i]);                                                  \
            best = key > best ? key : best;                                                    \
        }                                                                                      \
        for (int l = 0; l < LANES; l++) best = lanes[l] > best ? lanes[l] : best;              \
        int64_t start = 0;                                                                     \
        for (; start + LANES <= n; start += LANES) {                                           \
            int found = 0;                                                                     \
            for (int l = 0; l < LANES; l++) found |= key_of(row[start + l]) == best;           \
            if (found) break;                                                                  \
        }                                                                                      \
        for (int64_t j = start; j < n; j++)                                                    \
            if (key_of(row[j]) == best) return j;                                              \
        return 0; /* not reached for n >= 1 */                                                 \
    }

ROW_ARGMAX(f32, uint32_t, int32_t, INT32_MIN, key_f32)
ROW_ARGMAX(bf16, uint16_t, int16_t, INT16_MIN, key_bf16)

int argmax_f32(const uint32_t *x, int64_t rows, int64_t n, int64_t ldx, int64_t *out) {
    if (rows < 0 || n < 1 || ldx < n) return -1;
#pragma omp parallel for schedule(static) if (rows >= 4)
    for (int64_t r = 0; r < rows; r++) out[r] = row_argmax_f32(x + r * ldx, n);
    return 0;
}

int argmax_bf16(const uint16_t *x, int64_t rows, int64_t n, int64_t ldx, int64_t *out) {
    if (rows < 0 || n < 1 || ldx < n) return -1;
#pragma omp parallel for schedule(static) if (rows >= 4)
    for (int64_t r = 0; r < rows; r++) out[r] = row_argmax_bf16(x + r * ldx, n);
    return 0;
}

/* The vector width the compiler targeted (the code is plain C, vectorized by the compiler). */
const char *argmax_isa(void) {
#if defined(__AVX512BW__)
    return "avx512";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "generic";
#endif
}
