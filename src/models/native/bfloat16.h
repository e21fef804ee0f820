// Rows in and out of float32 working buffers, for kernels that take float32 or bfloat16
// tensors and compute in float32. bfloat16 is float32's upper half: widened exactly,
// narrowed by rounding to nearest even (as Eigen's conversion); rows read and written
// in place for float32 and through a buffer for bfloat16. And the registration of such
// a kernel for both types.

#ifndef AUDIO_TRANSFORMER_NATIVE_BFLOAT16_H_
#define AUDIO_TRANSFORMER_NATIVE_BFLOAT16_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "tensorflow/core/framework/bfloat16.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace audio_transformer_native {

inline void Load(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void Store(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

inline void Load(const tensorflow::bfloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i,
                     _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void Store(const float* src, tensorflow::bfloat16* dst, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512BF16__
  for (; i + 16 <= n; i += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    std::memcpy(dst + i, &h, sizeof(h));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<tensorflow::bfloat16>(src[i]);
}

// A row of T (float32 or bfloat16) as float32: the tensor's own memory for float32,
// else converted into buf.
inline const float* RowIn(const float* src, int64_t, float*) { return src; }
inline const float* RowIn(const tensorflow::bfloat16* src, int64_t n, float* buf) {
  Load(src, buf, n);
  return buf;
}
// Where a row of T is written as float32: the output's memory for float32, else buf
// (then RowOut stores it).
inline float* RowBuffer(float* dst, float*) { return dst; }
inline float* RowBuffer(tensorflow::bfloat16*, float* buf) { return buf; }
inline void RowOut(const float*, float*, int64_t) {}
inline void RowOut(const float* buf, tensorflow::bfloat16* dst, int64_t n) { Store(buf, dst, n); }

}  // namespace audio_transformer_native

// The CPU kernels of op `name` for T = float and T = bfloat16: Kernel<float>,
// Kernel<bfloat16> (a class template of T, or an alias template).
#define AUDIO_TRANSFORMER_REGISTER_FLOAT_AND_BFLOAT16(name, Kernel)                   \
  REGISTER_KERNEL_BUILDER(                                                           \
      Name(name).Device(tensorflow::DEVICE_CPU).TypeConstraint<float>("T"),          \
      Kernel<float>);                                                                \
  REGISTER_KERNEL_BUILDER(Name(name)                                                 \
                              .Device(tensorflow::DEVICE_CPU)                        \
                              .TypeConstraint<tensorflow::bfloat16>("T"),            \
                          Kernel<tensorflow::bfloat16>)

#endif  // AUDIO_TRANSFORMER_NATIVE_BFLOAT16_H_
