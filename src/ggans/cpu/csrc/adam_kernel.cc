// Adam's update of one parameter array in one pass, as an XLA FFI handler for the CPU (see
// ggans/adam.py). XLA runs optax's update of a large leaf as three loop fusions that read the
// gradient and moments again each time; this reads p, g, m and v once and writes p, m and v
// once, on OpenMP's threads, with optax's arithmetic in optax's order. It is built with
// -fno-math-errno (ggans/onednn.py): otherwise GCC keeps sqrt's errno branch in the loop, and the
// loop is not vectorized.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using F32 = ffi::Buffer<ffi::F32>;
using Out = ffi::ResultBuffer<ffi::F32>;

struct Coef {
  float b1, one_minus_b1, b2, one_minus_b2, eps, eps_root, neg_lr, bc1, bc2;
};

// One contiguous range, compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time
// (XLA's own fusions are compiled for the host too).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void AdamRange(
    const Coef& k, int64_t n, const float* __restrict p, const float* __restrict g,
    const float* __restrict m, const float* __restrict v, float* __restrict po,
    float* __restrict mo, float* __restrict vo) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mn = k.one_minus_b1 * gi + k.b1 * m[i];
    const float vn = k.one_minus_b2 * (gi * gi) + k.b2 * v[i];
    const float u = (mn / k.bc1) / (std::sqrt(vn / k.bc2 + k.eps_root) + k.eps);
    mo[i] = mn;
    vo[i] = vn;
    po[i] = p[i] + u * k.neg_lr;
  }
}

// coef holds, per replica (its leading axes those of the stacked parameters), -lr and the bias
// corrections 1 - b1^t and 1 - b2^t; p, g, m and v are [replicas..., *shape], flattened.
ffi::Error Adam(F32 p, F32 g, F32 m, F32 v, F32 coef, Out p_out, Out m_out, Out v_out, float b1,
                float one_minus_b1, float b2, float one_minus_b2, float eps, float eps_root) {
  const int64_t size = p.element_count();
  const int64_t rows = coef.element_count() / 3;
  if (rows == 0 || coef.element_count() % 3 || size % rows || g.element_count() != size ||
      m.element_count() != size || v.element_count() != size) {
    return ffi::Error::InvalidArgument("ggans adam: p, g, m, v of one size, coef [rows, 3]");
  }
  const int64_t per = size / rows;
  constexpr int64_t kBlock = 1 << 16;  // elements per OpenMP task
  const int64_t blocks = (per + kBlock - 1) / kBlock;
  const float* c = coef.typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    const Coef k{b1, one_minus_b1, b2, one_minus_b2, eps, eps_root, c[3 * r], c[3 * r + 1],
                 c[3 * r + 2]};
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i = r * per + b * kBlock, n = std::min(kBlock, per - b * kBlock);
      AdamRange(k, n, p.typed_data() + i, g.typed_data() + i, m.typed_data() + i,
                v.typed_data() + i, p_out->typed_data() + i, m_out->typed_data() + i,
                v_out->typed_data() + i);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GgansAdam, Adam,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("eps_root"));
