// The floor an Adam step's arithmetic cannot go under on an AVX-512 CPU: one IEEE square root and one IEEE
// division per element (sqrt(v) and m / denom; both run on the same divider unit). Prints nanoseconds per
// element of a loop that does only those two operations on 16-lane vectors held in registers (8 independent
// chains, so the divider's throughput, not its latency, is measured), of a loop of additions for scale, and the
// core clock (to turn nanoseconds into cycles).
// Compare with `python bench/kernel_ns_per_element.py --threads 1` (the whole step, in cache).
//
//   gcc -O2 -mavx512f bench/divider_floor.c -o /tmp/divider_floor && /tmp/divider_floor
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(void) {
  enum { kChains = 8 };
  const long iters = 20000000;
  __m512 a[kChains];
  const __m512 one = _mm512_set1_ps(1.5f);
  for (int k = 0; k < kChains; ++k) a[k] = _mm512_set1_ps(2.0f + (float)k);

  double best_div = 1e30, best_add = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    double t0 = now();
    for (long i = 0; i < iters; ++i) {
      for (int k = 0; k < kChains; ++k) {
        a[k] = _mm512_div_ps(one, _mm512_sqrt_ps(a[k]));
        __asm__ volatile("" : "+v"(a[k]));
      }
    }
    double t = (now() - t0) / ((double)iters * kChains * 16);
    if (t < best_div) best_div = t;
    t0 = now();
    for (long i = 0; i < iters; ++i) {
      for (int k = 0; k < kChains; ++k) {
        a[k] = _mm512_add_ps(a[k], one);
        __asm__ volatile("" : "+v"(a[k]));
      }
    }
    t = (now() - t0) / ((double)iters * kChains * 16);
    if (t < best_add) best_add = t;
  }
  // The core clock under this load: a chain of dependent 64-bit integer multiplications, 3 cycles each on Intel
  // since Sandy Bridge and on AMD since Zen (converts the figures above to cycles).
  double best_mul = 1e30;
  unsigned long long x = 3;
  for (int rep = 0; rep < 3; ++rep) {
    long n = 400000000;
    double t0 = now();
    __asm__ volatile("1: imul %0, %0\n imul %0, %0\n imul %0, %0\n imul %0, %0\n sub $4, %1\n jnz 1b"
                     : "+r"(x), "+r"(n));
    double t = (now() - t0) / 400000000.0;
    if (t < best_mul) best_mul = t;
  }
  float out[16];
  _mm512_storeu_ps(out, a[0]);
  printf("sqrt + div: %.3f ns/element\n", best_div * 1e9);
  printf("add:        %.3f ns/element  (%g)\n", best_add * 1e9, (double)out[0]);
  printf("clock:      %.2f GHz (3 / the latency of a dependent imul; %llu)\n", 3.0 / (best_mul * 1e9), x & 1);
  return 0;
}
