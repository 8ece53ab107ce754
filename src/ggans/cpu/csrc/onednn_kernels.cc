// oneDNN convolutions and matrix products as XLA FFI handlers for the CPU backend (see
// ggans/onednn.py).
//
// Convolutions: the three bilinear slots of a 2-d strided convolution (ggans.layers' conv_p,
// convt_p and kgrad_p) are oneDNN's forward, backward-data and backward-weights primitives.
// Activations are channels last ([B, H, W, C], oneDNN's nhwc); kernels are [kh, kw, ci, co]
// (oneDNN's hwio) and are reordered to and from the layout each primitive prefers.
//
// Matrix products: c[..., m, n] = a @ op(b), row major, the leading axes a batch; used for a
// dense layer's products with few rows and a large kernel, where XLA's own are 1.5-2x slower.
//
// A convolution's operands may carry a leading replica axis (stacked replicas): one call then
// runs every replica, split over the OpenMP threads.
//
// Primitives are built once per shape and thread, with a per-thread scratchpad.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "backward_data.h"
#include "one_channel.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;

namespace {

enum Slot { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

// slot (+ 3: planned for a parallel region over replicas), B, H, W, ci, Ho, Wo, co, kh, kw,
// sh, sw, pad top, pad left, pad bottom, pad right
using Key = std::array<int64_t, 16>;

struct Plan {
  dnnl::primitive prim;
  memory::desc act, out, wei;  // act: [B, H, W, ci]; out: [B, Ho, Wo, co]; wei: the primitive's
  memory::desc user_wei;       // the kernel as XLA holds it, [kh, kw, ci, co]
  dnnl::reorder wei_reorder;   // user_wei -> wei (forward, backward data) or back (weights)
  bool reorder_wei = false;
  size_t scratch_bytes = 0;
};

// Threads over which a call's replicas are split (GGANS_ONEDNN_REPLICA_THREADS, default
// OpenMP's; 1: one replica after another, each on oneDNN's own threads).
int ReplicaThreads() {
  static const int n = [] {
    const char* env = std::getenv("GGANS_ONEDNN_REPLICA_THREADS");
    return env ? std::max(1, std::atoi(env)) : omp_get_max_threads();
  }();
  return n;
}

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// Plans are per thread (XLA may run two calls at once), so no primitive is ever shared.
template <typename K, typename P>
const P& Cached(const K& key, P (*make)(const K&)) {
  thread_local std::map<K, P> plans;
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, make(key)).first;
  return it->second;
}

// The calling thread's scratchpad, grown to ``bytes``.
memory Scratchpad(size_t bytes) {
  thread_local std::vector<char> scratch;
  if (scratch.size() < bytes) scratch.resize(bytes);
  memory::desc desc({static_cast<int64_t>(bytes)}, memory::data_type::u8, tag::x);
  return memory(desc, Engine(), scratch.data());
}

Plan MakePlan(const Key& key) {
  Key k = key;
  k[0] %= 3;  // + 3: built inside a parallel region over replicas
  const auto f32 = memory::data_type::f32;
  memory::dims src{k[1], k[4], k[2], k[3]}, dst{k[1], k[7], k[5], k[6]};
  memory::dims wei{k[7], k[4], k[8], k[9]}, strides{k[10], k[11]};
  memory::dims pad_l{k[12], k[13]}, pad_r{k[14], k[15]};
  Plan plan;
  plan.act = memory::desc(src, f32, tag::nhwc);
  plan.out = memory::desc(dst, f32, tag::nhwc);
  plan.user_wei = memory::desc(wei, f32, tag::hwio);
  auto any_wei = memory::desc(wei, f32, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto& eng = Engine();
  auto fwd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, plan.act,
      any_wei, plan.out, strides, pad_l, pad_r, attr);
  if (k[0] == kFwd) {
    plan.wei = fwd.weights_desc();
    plan.prim = dnnl::convolution_forward(fwd);
    plan.scratch_bytes = fwd.scratchpad_desc().get_size();
  } else if (k[0] == kBwdData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, plan.act, any_wei, plan.out, strides, pad_l,
        pad_r, fwd, attr);
    plan.wei = pd.weights_desc();
    plan.prim = dnnl::convolution_backward_data(pd);
    plan.scratch_bytes = pd.scratchpad_desc().get_size();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, plan.act, any_wei, plan.out, strides, pad_l,
        pad_r, fwd, attr);
    plan.wei = pd.diff_weights_desc();
    plan.prim = dnnl::convolution_backward_weights(pd);
    plan.scratch_bytes = pd.scratchpad_desc().get_size();
  }
  plan.reorder_wei = plan.wei != plan.user_wei;
  if (plan.reorder_wei) {
    memory prim_wei(plan.wei, eng), user_wei(plan.user_wei, eng);
    plan.wei_reorder = k[0] == kBwdWeights ? dnnl::reorder(prim_wei, user_wei)
                                            : dnnl::reorder(user_wei, prim_wei);
  }
  return plan;
}

// One replica's slot. act: [B, H, W, ci]; out: [B, Ho, Wo, co]; wei: [kh, kw, ci, co].
// Exactly one is the result.
void RunOne(const Plan& plan, Slot slot, float* act, float* out, float* wei) {
  auto& eng = Engine();
  dnnl::stream stream(eng);
  thread_local std::vector<char> weights;
  if (weights.size() < plan.wei.get_size()) weights.resize(plan.wei.get_size());
  memory m_act(plan.act, eng, act), m_out(plan.out, eng, out);
  memory m_user(plan.user_wei, eng, wei);
  memory m_wei = m_user;
  if (plan.reorder_wei) m_wei = memory(plan.wei, eng, weights.data());
  std::unordered_map<int, memory> args;
  if (plan.scratch_bytes > 0) args[DNNL_ARG_SCRATCHPAD] = Scratchpad(plan.scratch_bytes);
  if (slot == kFwd) {
    args[DNNL_ARG_SRC] = m_act;
    args[DNNL_ARG_DST] = m_out;
    args[DNNL_ARG_WEIGHTS] = m_wei;
  } else if (slot == kBwdData) {
    args[DNNL_ARG_DIFF_SRC] = m_act;
    args[DNNL_ARG_DIFF_DST] = m_out;
    args[DNNL_ARG_WEIGHTS] = m_wei;
  } else {
    args[DNNL_ARG_SRC] = m_act;
    args[DNNL_ARG_DIFF_DST] = m_out;
    args[DNNL_ARG_DIFF_WEIGHTS] = m_wei;
  }
  if (slot != kBwdWeights && plan.reorder_wei) plan.wei_reorder.execute(stream, m_user, m_wei);
  plan.prim.execute(stream, args);
  if (slot == kBwdWeights && plan.reorder_wei) plan.wei_reorder.execute(stream, m_wei, m_user);
  stream.wait();
}

int64_t Prod(ffi::Span<const int64_t> d, size_t from, size_t to) {
  int64_t p = 1;
  for (size_t i = from; i < to; ++i) p *= d[i];
  return p;
}

// act: [R?, B, H, W, ci]; out: [R?, B, Ho, Wo, co]; wei: [R?, kh, kw, ci, co], with an optional
// leading replica axis R on all three (stacked replicas: R convolutions in one call).
// Exactly one is the result.
ffi::Error Run(Slot slot, float* act, float* out, float* wei, ffi::Span<const int64_t> act_dims,
               ffi::Span<const int64_t> out_dims, ffi::Span<const int64_t> wei_dims,
               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pads) {
  const size_t r = act_dims.size();
  if ((r != 4 && r != 5) || out_dims.size() != r || wei_dims.size() != r ||
      strides.size() != 2 || pads.size() != 4) {
    return ffi::Error::InvalidArgument("ggans oneDNN conv: 2-d convolutions only");
  }
  const size_t o = r - 4;  // 1 with a replica axis
  const int64_t replicas = o ? act_dims[0] : 1;
  if (o && (out_dims[0] != replicas || wei_dims[0] != replicas)) {
    return ffi::Error::InvalidArgument("ggans oneDNN conv: replica axes differ");
  }
  Key k{slot,          act_dims[o],     act_dims[o + 1], act_dims[o + 2], act_dims[o + 3],
        out_dims[o + 1], out_dims[o + 2], out_dims[o + 3], wei_dims[o],   wei_dims[o + 1],
        strides[0],    strides[1],      pads[0],         pads[1],         pads[2],
        pads[3]};
  const int64_t act_n = Prod(act_dims, o, r), out_n = Prod(out_dims, o, r);
  const int64_t wei_n = Prod(wei_dims, o, r);
  // Onto one channel at stride 1, forward and kernel gradient: direct loops (one_channel.h).
  if ((slot == kFwd || slot == kBwdWeights) && k[7] == 1 && k[10] == 1 && k[11] == 1) {
    const one_channel::Geometry g{k[1], k[2], k[3], k[4], k[5], k[6], k[8], k[9], k[12], k[13]};
    one_channel::Run(slot == kFwd, g, replicas, act, out, wei);
    return ffi::Error::Success();
  }
  // Backward data onto few channels (kernel rows of 32 or 64 floats) or onto one: direct loops
  // (backward_data.h).
  const backward_data::Geometry bd{k[1], k[2], k[3],  k[4],  k[5],  k[6], k[7],
                                   k[8], k[9], k[10], k[11], k[12], k[13]};
  if (slot == kBwdData && (backward_data::Serves(bd) || backward_data::ServesOneChannel(bd))) {
    backward_data::Run(bd, replicas, out, act, wei);
    return ffi::Error::Success();
  }
  // Replicas split over the threads, one single-threaded convolution each, when there are
  // enough of them: small convolutions do not pay for oneDNN's own threading. Plans are built
  // per thread and per threading mode (oneDNN sizes a primitive's work for its threads).
  // Replicas are handed out one at a time (dynamic schedule): XLA runs other operations on the
  // same cores meanwhile, and a static split waits for the thread they slowed (tiny model:
  // 7-10% faster a round).
  const bool split = replicas >= 2 && ReplicaThreads() > 1;
  std::string error;
#pragma omp parallel for schedule(dynamic) if (split) num_threads(ReplicaThreads())
  for (int64_t i = 0; i < replicas; ++i) {
    try {
      Key ki = k;
      if (split) {
        omp_set_num_threads(1);  // this task's: oneDNN then plans for one thread
        ki[0] += 3;
      }
      const Plan& plan = Cached(ki, MakePlan);
      RunOne(plan, slot, act + i * act_n, out + i * out_n, wei + i * wei_n);
    } catch (const dnnl::error& e) {
#pragma omp critical
      error = e.what();
    }
  }
  if (!error.empty()) return ffi::Error::Internal("ggans oneDNN conv: " + error);
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using Ints = ffi::Span<const int64_t>;

ffi::Error ConvFwd(F32 u, F32 w, ffi::ResultBuffer<ffi::F32> v, Ints strides, Ints pads) {
  return Run(kFwd, u.typed_data(), v->typed_data(), w.typed_data(), u.dimensions(),
             v->dimensions(), w.dimensions(), strides, pads);
}

ffi::Error ConvBwdData(F32 v, F32 w, ffi::ResultBuffer<ffi::F32> u, Ints strides, Ints pads) {
  return Run(kBwdData, u->typed_data(), v.typed_data(), w.typed_data(), u->dimensions(),
             v.dimensions(), w.dimensions(), strides, pads);
}

ffi::Error ConvBwdWeights(F32 u, F32 v, ffi::ResultBuffer<ffi::F32> w, Ints strides, Ints pads) {
  return Run(kBwdWeights, u.typed_data(), v.typed_data(), w->typed_data(), u.dimensions(),
             v.dimensions(), w->dimensions(), strides, pads);
}

// A matrix product: batch, m, k, n, and whether b is [n, k] (tb) rather than [k, n].
using MatmulKey = std::array<int64_t, 5>;

struct MatmulPlan {
  dnnl::matmul prim;
  memory::desc a, b, c;
  size_t scratch_bytes = 0;
};

MatmulPlan MakeMatmulPlan(const MatmulKey& key) {
  const auto [batch, m, k, n, tb] = key;
  const auto f32 = memory::data_type::f32;
  MatmulPlan plan;
  plan.a = memory::desc({batch, m, k}, f32, memory::dims{m * k, k, 1});
  plan.b = memory::desc({batch, k, n}, f32,
                        tb ? memory::dims{k * n, 1, k} : memory::dims{k * n, n, 1});
  plan.c = memory::desc({batch, m, n}, f32, memory::dims{m * n, n, 1});
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto pd = dnnl::matmul::primitive_desc(Engine(), plan.a, plan.b, plan.c, attr);
  plan.prim = dnnl::matmul(pd);
  plan.scratch_bytes = pd.scratchpad_desc().get_size();
  return plan;
}

ffi::Error Matmul(F32 a, F32 b, ffi::ResultBuffer<ffi::F32> c, int64_t tb) {
  auto ad = a.dimensions(), bd = b.dimensions();
  const size_t r = ad.size();
  if (r < 2 || bd.size() != r) {
    return ffi::Error::InvalidArgument("ggans oneDNN matmul: operands of equal rank >= 2");
  }
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < r; ++i) batch *= ad[i];
  const int64_t m = ad[r - 2], k = ad[r - 1], n = tb ? bd[r - 2] : bd[r - 1];
  try {
    const MatmulPlan& plan = Cached(MatmulKey{batch, m, k, n, tb}, MakeMatmulPlan);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, memory(plan.a, eng, a.typed_data())},
                                         {DNNL_ARG_WEIGHTS, memory(plan.b, eng, b.typed_data())},
                                         {DNNL_ARG_DST, memory(plan.c, eng, c->typed_data())}};
    if (plan.scratch_bytes > 0) args[DNNL_ARG_SCRATCHPAD] = Scratchpad(plan.scratch_bytes);
    plan.prim.execute(stream, args);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("ggans oneDNN matmul: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

#define GGANS_CONV_HANDLER(name, fn)                                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn,                                             \
                                ffi::Ffi::Bind()                                      \
                                    .Arg<F32>()                                       \
                                    .Arg<F32>()                                       \
                                    .Ret<F32>()                                       \
                                    .Attr<Ints>("strides")                            \
                                    .Attr<Ints>("pads"))

GGANS_CONV_HANDLER(GgansConvFwd, ConvFwd);
GGANS_CONV_HANDLER(GgansConvBwdData, ConvBwdData);
GGANS_CONV_HANDLER(GgansConvBwdWeights, ConvBwdWeights);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GgansMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("tb"));
