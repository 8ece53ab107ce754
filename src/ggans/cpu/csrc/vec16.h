// Sixteen floats as one vector, for the direct loops (one_channel.h, backward_data.h): GCC's
// vector extensions, one AVX-512 register, or two AVX or four SSE ones, in each function clone.
#pragma once

namespace vec16 {

// Loads and stores at any alignment.
typedef float V16 __attribute__((vector_size(64)));
typedef float V16u __attribute__((vector_size(64), aligned(4)));
typedef int I16 __attribute__((vector_size(64)));

inline __attribute__((always_inline)) V16 Load(const float* p) {
  return *reinterpret_cast<const V16u*>(p);
}

inline __attribute__((always_inline)) void Store(float* p, V16 v) {
  *reinterpret_cast<V16u*>(p) = v;
}

inline __attribute__((always_inline)) float Sum(V16 v) {
  v += __builtin_shuffle(v, I16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, I16{4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, I16{2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
  v += __builtin_shuffle(v, I16{1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
  return v[0];
}

}  // namespace vec16
