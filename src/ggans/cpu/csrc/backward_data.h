// A strided 2-d convolution's backward data (a transposed convolution) onto few channels, as
// direct loops: the tiny and small models' transposed convolutions and their discriminators'
// input gradients, where oneDNN's strided backward data runs at a third of its forward's rate.
//
// u: [B, H, W, ci] (the result); v: [B, Ho, Wo, co]; wei: [kh, kw, ci, co]. Every v pixel
// (y, x) adds, for each kernel row i, sum_co v[y, x, co] * W[i, :, :, co] to the kw * ci
// contiguous floats of u's row sh * y + i - pt from column sw * x - pl on: a rank-one update per
// channel co, kept in registers, written into a padded copy of one image (in L1) and copied out.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec16.h"

namespace backward_data {

using vec16::Load;
using vec16::Store;
using vec16::V16;
typedef float V4 __attribute__((vector_size(16)));

struct Geometry {
  int64_t b, h, w, ci, ho, wo, co, kh, kw, sh, sw, pt, pl;
};

// Whether the loops serve this geometry: kernel rows of 32 or 64 floats (kw * ci), 4 of them,
// from at least 8 channels (from fewer, too little work per pixel: oneDNN's is faster).
inline bool Serves(const Geometry& g) {
  return g.kh == 4 && (g.kw * g.ci == 32 || g.kw * g.ci == 64) && g.co >= 8;
}

// The padded image the loops accumulate one image into: every kernel row's segment fits.
inline int64_t PadRows(const Geometry& g) { return std::max(g.sh * (g.ho - 1) + g.kh, g.h + g.pt); }
inline int64_t PadCols(const Geometry& g) { return std::max(g.sw * (g.wo - 1) + g.kw, g.w + g.pl); }
inline int64_t PadSize(const Geometry& g) { return PadRows(g) * PadCols(g) * g.ci; }

// One replica's images. wr: the kernel as [kh, co, kw * ci]; pad: scratch of PadSize(g) floats.
template <int L>
inline __attribute__((always_inline)) void Images(const Geometry& g,
                                                  const float* __restrict__ v,
                                                  float* __restrict__ u,
                                                  const float* __restrict__ wr,
                                                  float* __restrict__ pad) {
  constexpr int Q = L / 16, KH = 4;
  const int64_t prow = PadCols(g) * g.ci, size = PadSize(g);
  for (int64_t b = 0; b < g.b; ++b) {
    std::memset(pad, 0, sizeof(float) * size);
    for (int64_t y = 0; y < g.ho; ++y) {
      for (int64_t x = 0; x < g.wo; ++x) {
        const float* vx = v + ((b * g.ho + y) * g.wo + x) * g.co;
        V16 acc[KH][Q] = {};
        for (int64_t c = 0; c < g.co; ++c) {
          const float s = vx[c];
          for (int i = 0; i < KH; ++i) {
            for (int q = 0; q < Q; ++q) acc[i][q] += s * Load(wr + (i * g.co + c) * L + 16 * q);
          }
        }
        float* p = pad + (g.sh * y) * prow + (g.sw * x) * g.ci;
        for (int i = 0; i < KH; ++i) {
          for (int q = 0; q < Q; ++q) {
            float* pi = p + i * prow + 16 * q;
            Store(pi, Load(pi) + acc[i][q]);
          }
        }
      }
    }
    for (int64_t y = 0; y < g.h; ++y) {
      std::memcpy(u + ((b * g.h + y) * g.w) * g.ci, pad + (y + g.pt) * prow + g.pl * g.ci,
                  sizeof(float) * g.w * g.ci);
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) inline void ImagesAny(
    const Geometry& g, const float* v, float* u, const float* wr, float* pad) {
  if (g.kw * g.ci == 32) {
    Images<32>(g, v, u, wr, pad);
  } else {
    Images<64>(g, v, u, wr, pad);
  }
}

// Onto one channel (ci = 1, at most 16 taps): each v pixel's tap values sum_co v[y, x, co] *
// W[:, :, 0, co] as one vector, added tap by tap into the padded image.
inline bool ServesOneChannel(const Geometry& g) { return g.ci == 1 && g.kh * g.kw <= 16; }

inline __attribute__((always_inline)) void ImagesOntoOne(const Geometry& g,
                                                         const float* __restrict__ v,
                                                         float* __restrict__ u,
                                                         const float* __restrict__ wt,
                                                         float* __restrict__ pad) {
  const int64_t prow = PadCols(g), size = PadSize(g);
  for (int64_t b = 0; b < g.b; ++b) {
    std::memset(pad, 0, sizeof(float) * size);
    for (int64_t y = 0; y < g.ho; ++y) {
      for (int64_t x = 0; x < g.wo; ++x) {
        const float* vx = v + ((b * g.ho + y) * g.wo + x) * g.co;
        V16 t = {};
        for (int64_t c = 0; c < g.co; ++c) t += vx[c] * Load(wt + 16 * c);
        float* p = pad + (g.sh * y) * prow + g.sw * x;
        alignas(64) float taps[16];
        Store(taps, t);
        if (g.kw == 4) {  // a kernel row as one 4-float vector
          for (int64_t i = 0; i < g.kh; ++i) {
            V4 row, add;
            std::memcpy(&row, p + i * prow, sizeof row);
            std::memcpy(&add, taps + 4 * i, sizeof add);
            row += add;
            std::memcpy(p + i * prow, &row, sizeof row);
          }
        } else {
          for (int64_t i = 0; i < g.kh; ++i) {
            for (int64_t j = 0; j < g.kw; ++j) p[i * prow + j] += taps[i * g.kw + j];
          }
        }
      }
    }
    for (int64_t y = 0; y < g.h; ++y) {
      std::memcpy(u + (b * g.h + y) * g.w, pad + (y + g.pt) * prow + g.pl,
                  sizeof(float) * g.w);
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) inline void ImagesOntoOneAny(
    const Geometry& g, const float* v, float* u, const float* wt, float* pad) {
  ImagesOntoOne(g, v, u, wt, pad);
}

// The kernel [kh, kw, ci, co] as [kh, co, kw * ci].
inline void RearrangeRows(const Geometry& g, const float* wei, float* wr) {
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j)
      for (int64_t c = 0; c < g.ci; ++c)
        for (int64_t o = 0; o < g.co; ++o)
          wr[(i * g.co + o) * g.kw * g.ci + j * g.ci + c] = wei[((i * g.kw + j) * g.ci + c) * g.co + o];
}

// The kernel [kh, kw, ci, co] as [kh, co, kw * ci] (rank-one rows), or, onto one channel, as
// [co, 16] (the taps, zero beyond kh * kw).
inline int64_t ArrangedSize(const Geometry& g) {
  return ServesOneChannel(g) ? 16 * g.co : g.kh * g.kw * g.ci * g.co;
}

inline void Rearrange(const Geometry& g, const float* wei, float* wr) {
  if (ServesOneChannel(g)) {
    std::fill(wr, wr + 16 * g.co, 0.f);
    for (int64_t t = 0; t < g.kh * g.kw; ++t)
      for (int64_t o = 0; o < g.co; ++o) wr[16 * o + t] = wei[t * g.co + o];
    return;
  }
  RearrangeRows(g, wei, wr);
}

// R replicas (operands with a leading replica axis, or R = 1): split over the OpenMP threads by
// replica, or one replica's images split over them.
inline void Run(const Geometry& g, int64_t replicas, const float* v, float* u, const float* wei) {
  const int64_t v_n = g.b * g.ho * g.wo * g.co, u_n = g.b * g.h * g.w * g.ci;
  const int64_t w_n = g.kh * g.kw * g.ci * g.co;
  const int64_t threads = std::max<int64_t>(1, omp_get_max_threads());
  const int64_t parts = replicas >= 2 ? replicas : std::min(threads, g.b);
  const int64_t per = (g.b + parts - 1) / parts;  // images per part when one replica
#pragma omp parallel num_threads(std::min(threads, parts))
  {
    std::vector<float> wr(ArrangedSize(g)), pad(PadSize(g));
    int64_t arranged = -1;
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < parts; ++t) {
      const int64_t r = replicas >= 2 ? t : 0;
      if (r != arranged) Rearrange(g, wei + r * w_n, wr.data()), arranged = r;
      Geometry part = g;
      int64_t b0 = 0;
      if (replicas < 2) {
        b0 = t * per;
        part.b = std::max<int64_t>(0, std::min(g.b, b0 + per) - b0);
      }
      const float* vp = v + r * v_n + b0 * g.ho * g.wo * g.co;
      float* up = u + r * u_n + b0 * g.h * g.w * g.ci;
      if (part.b && ServesOneChannel(g)) {
        ImagesOntoOneAny(part, vp, up, wr.data(), pad.data());
      } else if (part.b) {
        ImagesAny(part, vp, up, wr.data(), pad.data());
      }
    }
  }
}

}  // namespace backward_data
