/* The CPU's float32 FMA peak from instruction throughput: benchmarks/roofline.py builds and calls it.

   Each thread runs CHAINS independent chains of fused multiply-adds on the widest float32 vectors this
   build has (AVX-512F, else AVX2 + FMA, else scalar), with nothing else in the loop (no loads): the
   rate the FMA units give when fed, the ceiling any product kernel on them works under. CHAINS covers
   the FMA latency times the number of FMA units (4 cycles x 2 units on the CPUs measured here). */

#include <stdint.h>

#define CHAINS 12

#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define FIRST(v) _mm512_cvtss_f32(v)
#define ISA "avx512f"
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define FIRST(v) _mm256_cvtss_f32(v)
#define ISA "avx2"
#else
typedef float vec;
#define LANES 1
#define SET1(x) (x)
#define FMA(a, b, c) ((a) * (b) + (c))
#define FIRST(v) (v)
#define ISA "scalar"
#endif

const char *fma_peak_isa(void) { return ISA; }

/* FLOPs one call of fma_chains does per iteration */
int64_t fma_peak_flops_per_iteration(void) { return (int64_t)CHAINS * LANES * 2; }

/* `iterations` rounds of CHAINS FMAs on each of `threads` threads (OpenMP); returns a value that
   depends on every chain, so that nothing is optimised away. */
float fma_peak_run(int threads, int64_t iterations) {
    float sink = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        vec acc[CHAINS];
        const vec m = SET1(0.999999f), c = SET1(1e-7f);
        for (int i = 0; i < CHAINS; i++) acc[i] = SET1(1.0f + (float)i);
        for (int64_t it = 0; it < iterations; it++) {
#pragma GCC unroll 12
            for (int i = 0; i < CHAINS; i++) acc[i] = FMA(acc[i], m, c);
        }
        float total = 0.0f;
        for (int i = 0; i < CHAINS; i++) total += FIRST(acc[i]);
        sink += total;
    }
    return sink;
}
