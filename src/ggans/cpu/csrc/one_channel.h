// A 2-d convolution onto one output channel at stride 1 (the generator's output layer) and
// its kernel gradient, as direct loops. oneDNN runs both at a few GFLOP/s there (one output
// channel leaves its vector lanes idle); here each output is a dot product over the
// contiguous (kw, ci) row of every kernel row, vectorised along that row.
//
// act: [B, H, W, ci]; out: [B, Ho, Wo] (the one channel); wei: [kh, kw, ci]. Padding pt (top)
// and pl (left); the rest follows from the shapes.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec16.h"

namespace one_channel {

using vec16::Load;
using vec16::Store;
using vec16::Sum;
using vec16::V16;

struct Geometry {
  int64_t b, h, w, ci, ho, wo, kh, kw, pt, pl;
};

// Kernel rows i in [*i0, *i1) that land inside the image for output row y.
inline void Rows(const Geometry& g, int64_t y, int64_t* i0, int64_t* i1) {
  *i0 = std::max<int64_t>(0, g.pt - y);
  *i1 = std::min<int64_t>(g.kh, g.h + g.pt - y);
}

// Output columns [*lo, *hi) whose kernel row lies wholly inside the image, run on vectors
// when L (below) is known; none when L = 0.
template <int L>
inline void Interior(const Geometry& g, int64_t* lo, int64_t* hi) {
  *lo = std::min(g.wo, g.pl);
  *hi = std::max(*lo, std::min(g.wo, g.w + g.pl - g.kw + 1));
  if (!L) *lo = *hi = g.wo;
}

// Output column x's kernel row, clipped to the image: flat (j, c) indices [*c0, *c1).
inline void Cols(const Geometry& g, int64_t x, int64_t* c0, int64_t* c1) {
  *c0 = std::max<int64_t>(0, g.pl - x) * g.ci;
  *c1 = std::min<int64_t>(g.kw, g.w + g.pl - x) * g.ci;
}

// L = kw * ci when a multiple of 16 known at compile time (the interior columns then run on
// vectors in registers), else 0. Border columns, and every column when L = 0, run the clipped
// scalar loop.
template <int L>
inline __attribute__((always_inline)) void Forward(const Geometry& g,
                                                   const float* __restrict__ act,
                                                   float* __restrict__ out,
                                                   const float* __restrict__ wei) {
  const int64_t len = g.kw * g.ci, row = g.w * g.ci;
  int64_t x_lo, x_hi;
  Interior<L>(g, &x_lo, &x_hi);
  for (int64_t b = 0; b < g.b; ++b) {
    for (int64_t y = 0; y < g.ho; ++y) {
      int64_t i0, i1;
      Rows(g, y, &i0, &i1);
      const float* a = act + (b * g.h + y - g.pt) * row - g.pl * g.ci;  // row y - pt, column -pl
      float* o = out + (b * g.ho + y) * g.wo;
      for (int64_t x = x_lo; x < x_hi; ++x) {
        V16 v = {};
        for (int64_t i = i0; i < i1; ++i) {
          const float* ax = a + i * row + x * g.ci;
          for (int c = 0; c < L; c += 16) v += Load(ax + c) * Load(wei + i * len + c);
        }
        o[x] = Sum(v);
      }
      for (int64_t x = 0; x < g.wo; ++x) {
        if (x == x_lo) x = x_hi;
        if (x == g.wo) break;
        int64_t c0, c1;
        Cols(g, x, &c0, &c1);
        float s = 0.f;
        for (int64_t i = i0; i < i1; ++i) {
          const float* ax = a + i * row + x * g.ci;
          const float* k = wei + i * len;
#pragma omp simd reduction(+ : s)
          for (int64_t c = c0; c < c1; ++c) s += ax[c] * k[c];
        }
        o[x] = s;
      }
    }
  }
}

template <int L>
inline __attribute__((always_inline)) void KernelGrad(const Geometry& g,
                                                      const float* __restrict__ act,
                                                      const float* __restrict__ grad,
                                                      float* __restrict__ wei) {
  const int64_t len = g.kw * g.ci, row = g.w * g.ci;
  std::memset(wei, 0, sizeof(float) * g.kh * len);
  int64_t x_lo, x_hi;
  Interior<L>(g, &x_lo, &x_hi);
  for (int64_t b = 0; b < g.b; ++b) {
    for (int64_t y = 0; y < g.ho; ++y) {
      int64_t i0, i1;
      Rows(g, y, &i0, &i1);
      const float* gr = grad + (b * g.ho + y) * g.wo;
      for (int64_t i = i0; i < i1; ++i) {
        const float* a = act + (b * g.h + y + i - g.pt) * row - g.pl * g.ci;
        float* k = wei + i * len;
        if (x_lo < x_hi) {
          V16 v[L ? L / 16 : 1] = {};
          for (int64_t x = x_lo; x < x_hi; ++x) {
            const float gx = gr[x];
            for (int c = 0; c < L / 16; ++c) v[c] += gx * Load(a + x * g.ci + 16 * c);
          }
          for (int c = 0; c < L / 16; ++c) Store(k + 16 * c, Load(k + 16 * c) + v[c]);
        }
        for (int64_t x = 0; x < g.wo; ++x) {
          if (x == x_lo) x = x_hi;
          if (x == g.wo) break;
          int64_t c0, c1;
          Cols(g, x, &c0, &c1);
          const float gx = gr[x];
#pragma omp simd
          for (int64_t c = c0; c < c1; ++c) k[c] += gx * a[x * g.ci + c];
        }
      }
    }
  }
}

// The row lengths kw * ci compiled with vector accumulators: the tiny, small and paper models'
// output layers (4 x 4 kernels over 8, 16 and 32 channels), and 3 x 3 ones over 16 and 32.
#define GGANS_ONE_CHANNEL_CASES(F, ...)  \
  switch (g.kw * g.ci) {                 \
    case 32: F<32>(__VA_ARGS__); break;  \
    case 48: F<48>(__VA_ARGS__); break;  \
    case 64: F<64>(__VA_ARGS__); break;  \
    case 96: F<96>(__VA_ARGS__); break;  \
    case 128: F<128>(__VA_ARGS__); break; \
    default: F<0>(__VA_ARGS__);          \
  }

__attribute__((target_clones("avx512f", "avx2", "default"))) inline void ForwardAny(
    const Geometry& g, const float* act, float* out, const float* wei) {
  GGANS_ONE_CHANNEL_CASES(Forward, g, act, out, wei)
}

__attribute__((target_clones("avx512f", "avx2", "default"))) inline void KernelGradAny(
    const Geometry& g, const float* act, const float* grad, float* wei) {
  GGANS_ONE_CHANNEL_CASES(KernelGrad, g, act, grad, wei)
}

#undef GGANS_ONE_CHANNEL_CASES

// R replicas (operands with a leading replica axis, or R = 1): split over the OpenMP threads by
// replica, or one replica's batch split over them (each thread's partial kernel gradient then
// added). forward: out from act and wei; else wei from act and out.
inline void Run(bool forward, const Geometry& g, int64_t replicas, const float* act, float* out,
                float* wei) {
  const int64_t act_n = g.b * g.h * g.w * g.ci, out_n = g.b * g.ho * g.wo;
  const int64_t kernel = g.kh * g.kw * g.ci;
  if (replicas >= 2) {
#pragma omp parallel for schedule(dynamic)
    for (int64_t i = 0; i < replicas; ++i) {
      if (forward) {
        ForwardAny(g, act + i * act_n, out + i * out_n, wei + i * kernel);
      } else {
        KernelGradAny(g, act + i * act_n, out + i * out_n, wei + i * kernel);
      }
    }
    return;
  }
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), g.b));
  const int64_t per = (g.b + threads - 1) / threads;
  std::vector<float> partial(forward ? 0 : threads * kernel);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < threads; ++t) {
    Geometry part = g;
    const int64_t b0 = t * per;
    part.b = std::max<int64_t>(0, std::min(g.b, b0 + per) - b0);
    const float* a = act + b0 * g.h * g.w * g.ci;
    float* o = out + b0 * g.ho * g.wo;
    if (forward) {
      if (part.b) ForwardAny(part, a, o, wei);
    } else {
      float* k = partial.data() + t * kernel;
      if (part.b) KernelGradAny(part, a, o, k);
      else std::memset(k, 0, sizeof(float) * kernel);
    }
  }
  if (forward) return;
  for (int64_t c = 0; c < kernel; ++c) {
    float s = 0.f;
    for (int64_t t = 0; t < threads; ++t) s += partial[t * kernel + c];
    wei[c] = s;
  }
}

}  // namespace one_channel
