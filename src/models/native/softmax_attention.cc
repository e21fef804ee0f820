// softmax(scale * Q K^T) V over heads, as one TensorFlow CPU op.
//
// query (B, Sq, H, d), key (B, Sk, H, d), value (B, Sk, H, dv): the projections'
// outputs reshaped to heads, tokens before heads, so no transposes are needed on
// either side; output (B, Sq, H, dv). Float32 or bfloat16 (see the pair products
// below); a training variant also returns each row's softmax statistics for the
// gradient op at the end of this file (float32, and bfloat16 in pair products).
//
// The three TensorFlow ops this replaces (a batched matmul, a softmax, a batched
// matmul, plus the head transposes around them) each make a pass over the
// (B, H, Sq, Sk) scores in memory: at AST's shapes (600 patches, batch 32, 4 heads)
// 184 MB written and read back twice per layer. Here each work item is one
// (batch, head) and a block of query rows: its scores (rows x Sk, about 1 MB at most)
// are computed, exponentiated, summed and multiplied by V while they sit in the core's
// cache, and never reach memory. Work items are spread over TensorFlow's intra-op
// thread pool. With AVX-512 and head sizes that are multiples of 16, both products run
// in register-blocked AVX-512 loops; otherwise Eigen's matrix products. The softmax
// subtracts each row's maximum before exp, as tf.nn.softmax does.
//
// Built on first use by src/models/native.py, which also registers the gradients
// (of the inference op: recomputed with TensorFlow ops; of the training op: the
// compiled gradient op).

#define EIGEN_USE_THREADS
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "bfloat16.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Stride = Eigen::OuterStride<>;
using StridedConstMap = Eigen::Map<const RowMatrix, 0, Stride>;
using StridedMap = Eigen::Map<RowMatrix, 0, Stride>;

// Scores per work item: rows x Sk floats, kept to about 1 MB (a core's L2 cache).
constexpr int64_t kScoreBudget = 262144;

#ifdef __AVX512F__
// Register-blocked AVX-512 products for head sizes that are multiples of 16 (16 floats
// per register). R rows at a time, R * (columns / 16) accumulators in registers.

// Head sizes up to this use the tiles (a Q row group is packed on the stack).
constexpr int64_t kMaxTiledHead = 256;

// S[R x 32 (or fewer, masked)] = Q[R x d] K^T, with K^T laid out as kt (d x Sk) and the
// R rows of Q interleaved as qp (d x R): one pointer each, constant offsets.
template <int R>
inline void ScoresTile(const float* qp, int64_t d, const float* kt, int64_t sk,
                       int64_t j, float* s, __m512* mx) {
  const int64_t left = sk - j;
  const __mmask16 m0 = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
  const __mmask16 m1 = left >= 32 ? 0xFFFF
                       : left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1)
                                   : 0;
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < d; ++p) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, kt + p * sk + j);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, kt + p * sk + j + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(qp[p * R + r]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(s + r * sk + j, m0, acc[r][0]);
    _mm512_mask_storeu_ps(s + r * sk + j + 16, m1, acc[r][1]);
    mx[r] = _mm512_mask_max_ps(mx[r], m0, mx[r], acc[r][0]);  // the rows' maxima
    mx[r] = _mm512_mask_max_ps(mx[r], m1, mx[r], acc[r][1]);
  }
}

template <int R>
inline void ScoresRows(const float* q, int64_t ldq, int64_t d, const float* kt, int64_t sk,
                       float* s, float* row_max) {
  alignas(64) float qp[kMaxTiledHead * R];
  for (int64_t p = 0; p < d; ++p)
    for (int r = 0; r < R; ++r) qp[p * R + r] = q[r * ldq + p];
  __m512 mx[R];
  for (int r = 0; r < R; ++r) mx[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < sk; j += 32) ScoresTile<R>(qp, d, kt, sk, j, s, mx);
  for (int r = 0; r < R; ++r) row_max[r] = _mm512_reduce_max_ps(mx[r]);
}

// O[R x 16W] (columns c..c+16W) = scale_r * (P[R x Sk] V[Sk x dv]); ldv, ldo: row strides.
// Acc: o += instead of o =. TransA: P given transposed, P[r][k] at p[k * sk + r] (the
// backward's P^T dO and dS^T Q, without transposing P or dS).
template <int R, int W, bool Acc = false, bool TransA = false>
inline void OutputTile(const float* p, int64_t sk, const float* v, int64_t ldv, int64_t c,
                       const float* scale, float* o, int64_t ldo, int64_t kdim) {
  __m512 acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kdim; ++k) {
    __m512 b[W];
    for (int w = 0; w < W; ++w) b[w] = _mm512_loadu_ps(v + k * ldv + c + 16 * w);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(TransA ? p[k * sk + r] : p[r * sk + k]);
      for (int w = 0; w < W; ++w) acc[r][w] = _mm512_fmadd_ps(a, b[w], acc[r][w]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 f = _mm512_set1_ps(scale[r]);
    for (int w = 0; w < W; ++w) {
      float* out = o + r * ldo + c + 16 * w;
      if (Acc)  // o += scale_r * (P V)
        _mm512_storeu_ps(out, _mm512_fmadd_ps(acc[r][w], f, _mm512_loadu_ps(out)));
      else
        _mm512_storeu_ps(out, _mm512_mul_ps(acc[r][w], f));
    }
  }
}

template <int R, bool Acc = false, bool TransA = false>
inline void OutputRows(const float* p, int64_t sk, const float* v, int64_t ldv, int64_t dv,
                       const float* scale, float* o, int64_t ldo, int64_t kdim) {
  int64_t c = 0;
  for (; c + 48 <= dv; c += 48)
    OutputTile<R, 3, Acc, TransA>(p, sk, v, ldv, c, scale, o, ldo, kdim);
  if (dv - c == 32) OutputTile<R, 2, Acc, TransA>(p, sk, v, ldv, c, scale, o, ldo, kdim);
  if (dv - c == 16) OutputTile<R, 1, Acc, TransA>(p, sk, v, ldv, c, scale, o, ldo, kdim);
}

// Rows [0, n) of one work item, 8 at a time, then the rest one by one.
// ... and each row's maximum into row_max.
inline void ScoresBlock(const float* q, int64_t n, int64_t ldq, int64_t d, const float* kt,
                        int64_t sk, float* s, float* row_max) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    ScoresRows<8>(q + i * ldq, ldq, d, kt, sk, s + i * sk, row_max + i);
  for (; i < n; ++i) ScoresRows<1>(q + i * ldq, ldq, d, kt, sk, s + i * sk, row_max + i);
}

// O[n x dv] (=, or += with Acc) = scale_r * (P[n x Sk] V[Sk x dv]), P row-major with
// stride sk; TransA: O[n x dv] = scale_r * (P^T V) with P (kdim x n, stride sk), summed
// over kdim (= Sk unless given).
template <bool Acc = false, bool TransA = false>
inline void OutputBlock(const float* p, int64_t n, int64_t sk, const float* v, int64_t ldv,
                        int64_t dv, const float* scale, float* o, int64_t ldo,
                        int64_t kdim = -1) {
  if (kdim < 0) kdim = sk;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    OutputRows<8, Acc, TransA>(p + (TransA ? i : i * sk), sk, v, ldv, dv, scale + i,
                               o + i * ldo, ldo, kdim);
  for (; i < n; ++i)
    OutputRows<1, Acc, TransA>(p + (TransA ? i : i * sk), sk, v, ldv, dv, scale + i,
                               o + i * ldo, ldo, kdim);
}

// exp(scale (s - m)) = 2^x, x = s c - m c with c = scale / ln 2 (one FMA): 2^n 2^f,
// n = round(x), f = x - n in [-1/2, 1/2], 2^f by its Taylor series to degree 6 (relative
// error below 2e-7). x <= 0 here (m is the row's maximum); very negative x give 0 (as
// exp underflows), NaN stays NaN.
inline __m512 Exp2(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 y = _mm512_set1_ps(1.5403530393381609e-4f);  // ln(2)^k / k!, k = 6 .. 0
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3333558146428443e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.6181291076284772e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504108664821580e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022650695910071e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718055994531e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

inline __mmask16 Tail(int64_t left) {
  return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
}

// Rows of scores (stride sk) with their maxima to exp(scale (s - max s)) in place, and
// 1 / their sums, in one pass. A NaN score makes its row's sum, hence the row, NaN.
inline void SoftmaxRows(float* s, int64_t n, int64_t sk, float scale, const float* row_max,
                        float* inverse_sum) {
  const float c = scale * 1.44269504088896341f;
  const __m512 vc = _mm512_set1_ps(c);
  for (int64_t i = 0; i < n; ++i, s += sk) {
    const __m512 mc = _mm512_set1_ps(row_max[i] * c);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < sk; j += 16) {
      const __mmask16 t = Tail(sk - j);
      const __m512 e = Exp2(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(t, s + j), vc, mc));
      sum = _mm512_mask_add_ps(sum, t, sum, e);
      _mm512_mask_storeu_ps(s + j, t, e);
    }
    inverse_sum[i] = 1.0f / _mm512_reduce_add_ps(sum);
  }
}
#endif  // __AVX512F__

#ifdef __AVX512BF16__
// The bfloat16 products, with AVX512-BF16's pair dot products (vdpbf16ps: 16 float32
// accumulators, each += a[2i] b[2i] + a[2i+1] b[2i+1], products exact, sums in float32).
// Both operands are read as 32-bit pairs along the reduced axis: Q's rows are pairs
// along d already; K^T is laid out as kt2 (d/2 x Sk) pairs, V as v2 (Sk/2 x dv) pairs
// of rows, and the weights P as bfloat16 pairs along the keys (an odd Sk padded with 0).

inline __m512bh AsPairs(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

inline uint32_t PairAt(const uint16_t* p) {
  uint32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return pair;
}

// S[R x 32 (or fewer, masked)] = Q[R x d] K^T, columns j...
// (Q's R rows interleaved as pairs, qp (d/2 x R).)
template <int R>
inline void ScoresTileBf16(const uint32_t* qp, int64_t d2, const uint32_t* kt2,
                           int64_t sk, int64_t j, float* s, __m512* mx) {
  const int64_t left = sk - j;
  const __mmask16 m0 = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
  const __mmask16 m1 = left >= 32 ? 0xFFFF
                       : left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1)
                                   : 0;
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < d2; ++p) {
    const __m512bh b0 = AsPairs(_mm512_maskz_loadu_epi32(m0, kt2 + p * sk + j));
    const __m512bh b1 = AsPairs(_mm512_maskz_loadu_epi32(m1, kt2 + p * sk + j + 16));
    for (int r = 0; r < R; ++r) {
      const __m512bh a = AsPairs(_mm512_set1_epi32(static_cast<int>(qp[p * R + r])));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(s + r * sk + j, m0, acc[r][0]);
    _mm512_mask_storeu_ps(s + r * sk + j + 16, m1, acc[r][1]);
    mx[r] = _mm512_mask_max_ps(mx[r], m0, mx[r], acc[r][0]);  // the rows' maxima
    mx[r] = _mm512_mask_max_ps(mx[r], m1, mx[r], acc[r][1]);
  }
}

template <int R>
inline void ScoresRowsBf16(const uint16_t* q, int64_t ldq, int64_t d2, const uint32_t* kt2,
                           int64_t sk, float* s, float* row_max) {
  alignas(64) uint32_t qp[kMaxTiledHead / 2 * R];
  for (int64_t p = 0; p < d2; ++p)
    for (int r = 0; r < R; ++r) qp[p * R + r] = PairAt(q + r * ldq + 2 * p);
  __m512 mx[R];
  for (int r = 0; r < R; ++r) mx[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < sk; j += 32) ScoresTileBf16<R>(qp, d2, kt2, sk, j, s, mx);
  for (int r = 0; r < R; ++r) row_max[r] = _mm512_reduce_max_ps(mx[r]);
}

// O[R x 16W] (columns c..c+16W, rounded to bfloat16) = scale_r * (P[R x Sk] V[Sk x dv]).
template <int R, int W>
inline void OutputTileBf16(const uint32_t* p, int64_t sk2, const uint32_t* v2, int64_t dv,
                           int64_t c, const float* scale, uint16_t* o, int64_t ldo) {
  __m512 acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = _mm512_setzero_ps();
  for (int64_t k = 0; k < sk2; ++k) {
    __m512bh b[W];
    for (int w = 0; w < W; ++w) b[w] = AsPairs(_mm512_loadu_si512(v2 + k * dv + c + 16 * w));
    for (int r = 0; r < R; ++r) {
      const __m512bh a = AsPairs(_mm512_set1_epi32(static_cast<int>(p[r * sk2 + k])));
      for (int w = 0; w < W; ++w) acc[r][w] = _mm512_dpbf16_ps(acc[r][w], a, b[w]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 f = _mm512_set1_ps(scale[r]);
    for (int w = 0; w < W; ++w) {
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][w], f));
      std::memcpy(o + r * ldo + c + 16 * w, &y, sizeof(y));
    }
  }
}

template <int R>
inline void OutputRowsBf16(const uint32_t* p, int64_t sk2, const uint32_t* v2, int64_t dv,
                           const float* scale, uint16_t* o, int64_t ldo) {
  int64_t c = 0;
  for (; c + 48 <= dv; c += 48) OutputTileBf16<R, 3>(p, sk2, v2, dv, c, scale, o, ldo);
  if (dv - c == 32) OutputTileBf16<R, 2>(p, sk2, v2, dv, c, scale, o, ldo);
  if (dv - c == 16) OutputTileBf16<R, 1>(p, sk2, v2, dv, c, scale, o, ldo);
}

inline void ScoresBlockBf16(const uint16_t* q, int64_t n, int64_t ldq, int64_t d2,
                            const uint32_t* kt2, int64_t sk, float* s, float* row_max) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    ScoresRowsBf16<8>(q + i * ldq, ldq, d2, kt2, sk, s + i * sk, row_max + i);
  for (; i < n; ++i)
    ScoresRowsBf16<1>(q + i * ldq, ldq, d2, kt2, sk, s + i * sk, row_max + i);
}

inline void OutputBlockBf16(const uint32_t* p, int64_t n, int64_t sk2, const uint32_t* v2,
                            int64_t dv, const float* scale, uint16_t* o, int64_t ldo) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    OutputRowsBf16<8>(p + i * sk2, sk2, v2, dv, scale + i, o + i * ldo, ldo);
  for (; i < n; ++i) OutputRowsBf16<1>(p + i * sk2, sk2, v2, dv, scale + i, o + i * ldo, ldo);
}

// Rows of scores (stride sk) with their maxima to bfloat16 weights exp(scale (s - max s))
// (rounded to nearest even) in pairs p (stride sk2; an odd Sk padded with 0), and 1 /
// the float32 sums of the weights, in one pass.
inline void SoftmaxPairs(const float* s, int64_t n, int64_t sk, float scale,
                         const float* row_max, uint32_t* p, int64_t sk2, float* inverse_sum) {
  const float c = scale * 1.44269504088896341f;
  const __m512 vc = _mm512_set1_ps(c);
  for (int64_t i = 0; i < n; ++i, s += sk, p += sk2) {
    const __m512 mc = _mm512_set1_ps(row_max[i] * c);
    uint16_t* h = reinterpret_cast<uint16_t*>(p);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < sk; j += 16) {
      const __mmask16 t = Tail(sk - j);
      const __m512 e = Exp2(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(t, s + j), vc, mc));
      sum = _mm512_mask_add_ps(sum, t, sum, e);
      const __m256bh y = _mm512_cvtneps_pbh(e);
      _mm256_mask_storeu_epi16(h + j, t, reinterpret_cast<const __m256i&>(y));
    }
    if (sk % 2) h[sk] = 0;
    inverse_sum[i] = 1.0f / _mm512_reduce_add_ps(sum);
  }
}
#endif  // __AVX512BF16__

// Scores to unnormalised weights in place, exp(scale (s - max s)), and 1 / their sum
// per row. scale > 0: max(scale * s) = scale * max(s).
inline void Softmax(Eigen::Ref<RowMatrix> S, float scale, float* row_max, float* inverse_sum) {
  for (int64_t i = 0; i < S.rows(); ++i) {
    auto row = S.row(i).array();
    row_max[i] = row.maxCoeff();
    row = ((row - row_max[i]) * scale).exp();
    inverse_sum[i] = 1.0f / row.sum();
  }
}

inline void RoundToBfloat16(Eigen::Ref<RowMatrix> S) {
  S = S.cast<Eigen::bfloat16>().cast<float>();
}

// A buffer of at least n values; it only grows.
template <typename V>
inline typename V::value_type* Reserve(V& buffer, int64_t n) {
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// One thread's buffers, kept across its work items; K (and V) are laid out once per
// (batch, head), which consecutive items share. (Kept across calls in thread-local
// storage instead, the op ran 1.5-2x slower.)
// (Aligned: Eigen's products peel by the data's alignment, so a buffer at varying
// alignment would give results that differ in the last bit from call to call.)
using FloatBuffer = std::vector<float, Eigen::aligned_allocator<float>>;

struct Workspace {
  FloatBuffer scores, key_t, row_max, inverse_sum, q, k, v, o;  // q..o: converted
  std::vector<uint32_t> kt2, v2, p2;                          // bfloat16 pairs
  int64_t laid_out = -1;   // the (batch, head) whose K^T (or pairs) are laid out
  int64_t converted = -1;  // the (batch, head) whose K, V are converted to float32
};

// softmax(scale q k^T) v for n query rows of one (batch, head), float32: q (n x d, row
// stride ldq), k (Sk x d, ldk), v (Sk x dv, ldv), o (n x dv, ldo).
// round_weights: the unnormalised weights rounded to bfloat16 before the weighted sum,
// as the pair products do (bfloat16 inputs: the same numbers with or without them).
// stats (if not null): per row, log2 of the softmax's denominator in base-2 units,
// scale / ln 2 * max + log2(sum), so that weight_ij = 2^(scale / ln 2 * s_ij - stats_i).
inline void AttendFloat(const float* q, int64_t ldq, int64_t n, const float* k, int64_t ldk,
                        const float* v, int64_t ldv, int64_t Sk, int64_t d, int64_t dv,
                        float scale, bool tiled, bool round_weights, int64_t bh, Workspace& w,
                        float* o, int64_t ldo, float* stats = nullptr) {
  StridedConstMap K(k, Sk, d, Stride(ldk));
  Eigen::Map<RowMatrix> S(Reserve(w.scores, n * Sk), n, Sk);
  float* inverse_sum = Reserve(w.inverse_sum, n);
  float* row_max = Reserve(w.row_max, n);
  const float c = scale * 1.44269504088896341f;
  auto write_stats = [&] {
    if (stats)
      for (int64_t i = 0; i < n; ++i) stats[i] = row_max[i] * c - std::log2(inverse_sum[i]);
  };
#ifdef __AVX512F__
  if (tiled) {
    float* kt = Reserve(w.key_t, d * Sk);
    if (w.laid_out != bh) {  // K^T (d x Sk) from the strided key rows
      for (int64_t j = 0; j < Sk; ++j)
        for (int64_t p = 0; p < d; ++p) kt[p * Sk + j] = k[j * ldk + p];
      w.laid_out = bh;
    }
    ScoresBlock(q, n, ldq, d, kt, Sk, S.data(), row_max);
    SoftmaxRows(S.data(), n, Sk, scale, row_max, inverse_sum);
    if (round_weights) RoundToBfloat16(S);
    OutputBlock(S.data(), n, Sk, v, ldv, dv, inverse_sum, o, ldo);
    write_stats();
    return;
  }
#endif
  S.noalias() = StridedConstMap(q, n, d, Stride(ldq)) * K.transpose();
  Softmax(S, scale, row_max, inverse_sum);
  write_stats();
  if (round_weights) RoundToBfloat16(S);
  StridedMap O(o, n, dv, Stride(ldo));
  O.noalias() = S * StridedConstMap(v, Sk, dv, Stride(ldv));
  O.array().colwise() *= Eigen::Map<Eigen::ArrayXf>(inverse_sum, n);
}

inline void ToFloat(const tensorflow::bfloat16* src, int64_t rows, int64_t cols, int64_t ld,
                    float* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[i * cols + j] = static_cast<float>(src[i * ld + j]);
}

// kStats: also the rows' softmax statistics (output 1, (B, H, Sq) float32), for the
// gradient op below (the training op; in bfloat16 the statistics of the float32 scores,
// before the weights are rounded).
template <typename T, bool kStats = false>
class SoftmaxAttentionOp : public OpKernel {
 public:
  explicit SoftmaxAttentionOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("scale", &scale_));
    OP_REQUIRES_OK(c, c->GetAttr("block_rows", &block_rows_));
    OP_REQUIRES(c, scale_ > 0.0f,
                absl::InvalidArgumentError("AudioTransformerSoftmaxAttention: scale must be > 0"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& q = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& v = ctx->input(2);
    OP_REQUIRES(ctx, q.dims() == 4 && k.dims() == 4 && v.dims() == 4,
                absl::InvalidArgumentError(
                    "AudioTransformerSoftmaxAttention: query, key and value must be "
                    "(batch, tokens, heads, head size)"));
    const int64_t B = q.dim_size(0), Sq = q.dim_size(1), H = q.dim_size(2);
    const int64_t d = q.dim_size(3), Sk = k.dim_size(1), dv = v.dim_size(3);
    OP_REQUIRES(ctx,
                k.dim_size(0) == B && v.dim_size(0) == B && k.dim_size(2) == H &&
                    v.dim_size(2) == H && k.dim_size(3) == d && v.dim_size(1) == Sk,
                absl::InvalidArgumentError(
                    "AudioTransformerSoftmaxAttention: query " + q.shape().DebugString() +
                    ", key " + k.shape().DebugString() + " and value " +
                    v.shape().DebugString() + " do not match"));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({B, Sq, H, dv}), &out));
    float* stats = nullptr;
    if (kStats) {
      Tensor* stats_tensor = nullptr;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({B, H, Sq}), &stats_tensor));
      stats = stats_tensor->flat<float>().data();
      if (Sk == 0) stats_tensor->flat<float>().setConstant(std::numeric_limits<float>::quiet_NaN());
    }
    if (out->NumElements() == 0) return;
    if (Sk == 0) {  // no keys: softmax over nothing, as TensorFlow gives (NaN)
      out->flat<T>().setConstant(T(std::numeric_limits<float>::quiet_NaN()));
      return;
    }

    const T* qp = q.flat<T>().data();
    const T* kp = k.flat<T>().data();
    const T* vp = v.flat<T>().data();
    T* op = out->flat<T>().data();
    const int64_t ldq = H * d, ldv = H * dv;  // row strides (the output's is ldv)
    int64_t rows = block_rows_ > 0 ? block_rows_ : std::max<int64_t>(16, kScoreBudget / Sk);
    rows = std::max<int64_t>(1, std::min<int64_t>(rows, Sq));
    const int64_t blocks = (Sq + rows - 1) / rows;
    const float scale = scale_;
    constexpr bool kBf16 = std::is_same<T, tensorflow::bfloat16>::value;

#ifdef __AVX512F__
    // K^T is laid out once per (batch, head): worth it from a few dozen query rows.
    const bool tiled = d % 16 == 0 && dv % 16 == 0 && rows >= 32 && d <= kMaxTiledHead;
#else
    const bool tiled = false;
#endif
#ifdef __AVX512BF16__
    const bool pairs = kBf16 && d % 2 == 0 && dv % 16 == 0 && rows >= 32 && d <= kMaxTiledHead;
#else
    const bool pairs = false;
#endif
    auto work = [&](int64_t begin, int64_t end) {
      Workspace w;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / blocks, first = (item % blocks) * rows;
        const int64_t b = bh / H, h = bh % H;
        const int64_t n = std::min(rows, Sq - first);
        const T* qb = qp + ((b * Sq + first) * H + h) * d;
        const T* kb = kp + (b * Sk * H + h) * d;
        const T* vb = vp + (b * Sk * H + h) * dv;
        T* ob = op + ((b * Sq + first) * H + h) * dv;
        if constexpr (!kBf16) {
          AttendFloat(qb, ldq, n, kb, ldq, vb, ldv, Sk, d, dv, scale, tiled, false, bh, w, ob,
                      ldv, kStats ? stats + bh * Sq + first : nullptr);
        } else if (pairs) {
#ifdef __AVX512BF16__
          const int64_t d2 = d / 2, sk2 = (Sk + 1) / 2;
          if (w.laid_out != bh) {
            const uint16_t* k16 = reinterpret_cast<const uint16_t*>(kb);
            const uint16_t* v16 = reinterpret_cast<const uint16_t*>(vb);
            uint32_t* kt2 = Reserve(w.kt2, d2 * Sk);
            for (int64_t j = 0; j < Sk; ++j)  // kt2[p][j] = (K[j, 2p], K[j, 2p + 1])
              for (int64_t p = 0; p < d2; ++p) kt2[p * Sk + j] = PairAt(k16 + j * ldq + 2 * p);
            uint32_t* v2 = Reserve(w.v2, sk2 * dv);  // v2[j][c] = (V[2j, c], V[2j + 1, c])
            for (int64_t j = 0; j + 1 < Sk; j += 2)
              for (int64_t c = 0; c < dv; ++c)
                v2[(j / 2) * dv + c] = v16[j * ldv + c] |
                                       static_cast<uint32_t>(v16[(j + 1) * ldv + c]) << 16;
            if (Sk % 2)
              for (int64_t c = 0; c < dv; ++c) v2[(Sk / 2) * dv + c] = v16[(Sk - 1) * ldv + c];
            w.laid_out = bh;
          }
          float* scores = Reserve(w.scores, n * Sk);
          float* inverse_sum = Reserve(w.inverse_sum, n);
          uint32_t* p2 = Reserve(w.p2, n * sk2);
          float* row_max = Reserve(w.row_max, n);
          ScoresBlockBf16(reinterpret_cast<const uint16_t*>(qb), n, ldq, d2, w.kt2.data(), Sk,
                          scores, row_max);
          SoftmaxPairs(scores, n, Sk, scale, row_max, p2, sk2, inverse_sum);
          if (kStats) {
            const float c = scale * 1.44269504088896341f;
            float* st = stats + bh * Sq + first;
            for (int64_t i = 0; i < n; ++i) st[i] = row_max[i] * c - std::log2(inverse_sum[i]);
          }
          OutputBlockBf16(p2, n, sk2, w.v2.data(), dv, inverse_sum,
                          reinterpret_cast<uint16_t*>(ob), ldv);
#endif
        } else {  // bfloat16 without the pair products: converted, computed in float32
          float* k32 = Reserve(w.k, Sk * d);
          float* v32 = Reserve(w.v, Sk * dv);
          if (w.converted != bh) {
            ToFloat(kb, Sk, d, ldq, k32);
            ToFloat(vb, Sk, dv, ldv, v32);
            w.converted = bh;
          }
          float* q32 = Reserve(w.q, n * d);
          float* o32 = Reserve(w.o, n * dv);
          ToFloat(qb, n, d, ldq, q32);
          AttendFloat(q32, d, n, k32, d, v32, dv, Sk, d, dv, scale, tiled, true, bh, w, o32, dv,
                      kStats ? stats + bh * Sq + first : nullptr);
          for (int64_t i = 0; i < n; ++i)
            for (int64_t c = 0; c < dv; ++c) ob[i * ldv + c] = T(o32[i * dv + c]);
        }
      }
    };
    const int64_t items = B * H * blocks;
    const int64_t cost = rows * Sk * (2 * d + 2 * dv + 16);  // rough cycles per item
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(items, cost, work);
  }

 private:
  float scale_;
  int64_t block_rows_;
};

// The gradient of softmax(scale Q K^T) V, from the forward op's statistics (the weights
// are recomputed, never stored): per (batch, head) and block of query rows, with
// P = softmax(scale S), dP = dO V^T and delta_i = sum_c dO_ic O_ic,
//   dS = P * (dP - delta),  dQ = scale dS K,  dK += scale dS^T Q,  dV += P^T dO.
// With AVX-512 and head sizes that are multiples of 16 the five products run in the
// forward's register tiles (dK and dV read P and dS transposed, TransA); Eigen's
// products otherwise. Each (batch, head) is one work item, so dK and dV accumulate
// without sharing.
// This is the float32 backward on raw arrays (shapes as the op's inputs; dk and dv are
// zeroed here and accumulated over blocks of query rows; every row of dq is written
// once).
void GradFloat(tensorflow::thread::ThreadPool* pool, const float* qp, const float* kp,
               const float* vp, const float* op, const float* sp, const float* gp,
               float* dqp, float* dkp, float* dvp, int64_t B, int64_t Sq, int64_t H,
               int64_t d, int64_t Sk, int64_t dv, float scale) {
  std::fill(dkp, dkp + B * Sk * H * d, 0.0f);
  std::fill(dvp, dvp + B * Sk * H * dv, 0.0f);
const int64_t ldq = H * d, ldv = H * dv;
const float c = scale * 1.44269504088896341f;
  // Two (rows x Sk) buffers: about 1 MB together.
  const int64_t rows = std::max<int64_t>(8, std::min<int64_t>(Sq, 131072 / Sk));
#ifdef __AVX512F__
  const bool tiled = d % 16 == 0 && dv % 16 == 0 && d <= kMaxTiledHead && dv <= kMaxTiledHead;
#else
  const bool tiled = false;
#endif

  auto work = [&](int64_t begin, int64_t end) {
    FloatBuffer kt_buf, vt_buf, p_buf, ds_buf, scratch_max;
    std::vector<float> delta(rows), scales(std::max(rows, Sk), scale), ones(std::max(rows, Sk), 1.0f);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* kb = kp + (b * Sk * H + h) * d;
      const float* vb = vp + (b * Sk * H + h) * dv;
      float* dkb = dkp + (b * Sk * H + h) * d;
      float* dvb = dvp + (b * Sk * H + h) * dv;
      float* kt = Reserve(kt_buf, tiled ? d * Sk : 0);
      float* vt = Reserve(vt_buf, tiled ? dv * Sk : 0);
      if (tiled) {  // K^T (d x Sk), V^T (dv x Sk)
        for (int64_t j = 0; j < Sk; ++j) {
          for (int64_t x = 0; x < d; ++x) kt[x * Sk + j] = kb[j * ldq + x];
          for (int64_t x = 0; x < dv; ++x) vt[x * Sk + j] = vb[j * ldv + x];
        }
      }
      for (int64_t first = 0; first < Sq; first += rows) {
        const int64_t n = std::min(rows, Sq - first);
        const int64_t row0 = (b * Sq + first) * H + h;
        const float* qb = qp + row0 * d;
        const float* ob = op + row0 * dv;
        const float* gb = gp + row0 * dv;
        float* dqb = dqp + row0 * d;
        const float* stats = sp + bh * Sq + first;
        for (int64_t i = 0; i < n; ++i) {
          float acc = 0.0f;
          for (int64_t x = 0; x < dv; ++x) acc += gb[i * ldv + x] * ob[i * ldv + x];
          delta[i] = acc;
        }
        Eigen::Map<RowMatrix> P(Reserve(p_buf, n * Sk), n, Sk);
        Eigen::Map<RowMatrix> dS(Reserve(ds_buf, n * Sk), n, Sk);
#ifdef __AVX512F__
        if (tiled) {
          float* row_max = Reserve(scratch_max, n);
          ScoresBlock(qb, n, ldq, d, kt, Sk, P.data(), row_max);    // S = Q K^T
          ScoresBlock(gb, n, ldv, dv, vt, Sk, dS.data(), row_max);  // dP = dO V^T
          const __m512 vc = _mm512_set1_ps(c);
          for (int64_t i = 0; i < n; ++i) {
            float* pr = P.data() + i * Sk;
            float* dr = dS.data() + i * Sk;
            const __m512 m = _mm512_set1_ps(stats[i]);
            const __m512 dl = _mm512_set1_ps(delta[i]);
            for (int64_t j = 0; j < Sk; j += 16) {
              const __mmask16 t = Tail(Sk - j);
              const __m512 pv = Exp2(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(t, pr + j), vc, m));
              _mm512_mask_storeu_ps(pr + j, t, pv);
              const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dr + j), dl);
              _mm512_mask_storeu_ps(dr + j, t, _mm512_mul_ps(pv, g));
            }
          }
          OutputBlock(dS.data(), n, Sk, kb, ldq, d, scales.data(), dqb, ldq);  // dQ
          OutputBlock<true, true>(P.data(), Sk, Sk, gb, ldv, dv, ones.data(), dvb, ldv,
                                  n);  // dV += P^T dO
          OutputBlock<true, true>(dS.data(), Sk, Sk, qb, ldq, d, scales.data(), dkb, ldq,
                                  n);  // dK += scale dS^T Q
          continue;
        }
#endif
        StridedConstMap Q(qb, n, d, Stride(ldq)), K(kb, Sk, d, Stride(ldq));
        StridedConstMap V(vb, Sk, dv, Stride(ldv)), G(gb, n, dv, Stride(ldv));
        P.noalias() = Q * K.transpose();
        for (int64_t i = 0; i < n; ++i)
          P.row(i) = ((P.row(i).array() * c - stats[i]) * 0.69314718055994531f).exp().matrix();
        dS.noalias() = G * V.transpose();
        dS.array() = P.array() * (dS.array().colwise() -
                                  Eigen::Map<Eigen::ArrayXf>(delta.data(), n));
        StridedMap(dqb, n, d, Stride(ldq)).noalias() = scale * (dS * K);
        StridedMap(dkb, Sk, d, Stride(ldq)).noalias() += scale * (dS.transpose() * Q);
        StridedMap(dvb, Sk, dv, Stride(ldv)).noalias() += P.transpose() * G;
      }
    }
  };
  const int64_t cost = Sq * Sk * (5 * d + 5 * dv) / 2;  // rough cycles per (batch, head)
  pool->ParallelFor(B * H, cost, work);
}

#ifdef __AVX512BF16__
// O[R x 16W] (columns c..c+16W) = (or += with Acc) scale_r * sum_k A[r, k] B[k, :], the
// reduction in bfloat16 pairs: A's pairs at a[r * lda + k] (TransA: a[k * lda + r]),
// B's pairs of rows at b[k * ldb + column]; kdim pairs, float32 sums.
template <int R, int W, bool TransA, bool Acc>
inline void PairTile(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t c,
                     const float* scale, float* o, int64_t ldo, int64_t kdim) {
  __m512 acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kdim; ++k) {
    __m512bh bw[W];
    for (int w = 0; w < W; ++w) bw[w] = AsPairs(_mm512_loadu_si512(b + k * ldb + c + 16 * w));
    for (int r = 0; r < R; ++r) {
      const __m512bh x =
          AsPairs(_mm512_set1_epi32(static_cast<int>(TransA ? a[k * lda + r] : a[r * lda + k])));
      for (int w = 0; w < W; ++w) acc[r][w] = _mm512_dpbf16_ps(acc[r][w], x, bw[w]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 f = _mm512_set1_ps(scale[r]);
    for (int w = 0; w < W; ++w) {
      float* out = o + r * ldo + c + 16 * w;
      _mm512_storeu_ps(out, Acc ? _mm512_fmadd_ps(acc[r][w], f, _mm512_loadu_ps(out))
                                : _mm512_mul_ps(acc[r][w], f));
    }
  }
}

template <int R, bool TransA, bool Acc>
inline void PairRows(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                     int64_t cols, const float* scale, float* o, int64_t ldo, int64_t kdim) {
  int64_t c = 0;
  for (; c + 48 <= cols; c += 48)
    PairTile<R, 3, TransA, Acc>(a, lda, b, ldb, c, scale, o, ldo, kdim);
  if (cols - c == 32) PairTile<R, 2, TransA, Acc>(a, lda, b, ldb, c, scale, o, ldo, kdim);
  if (cols - c == 16) PairTile<R, 1, TransA, Acc>(a, lda, b, ldb, c, scale, o, ldo, kdim);
}

// Rows [0, n) of O (n x cols, stride ldo), 8 at a time, then one by one.
template <bool TransA, bool Acc>
inline void PairBlock(const uint32_t* a, int64_t lda, int64_t n, const uint32_t* b,
                      int64_t ldb, int64_t cols, const float* scale, float* o, int64_t ldo,
                      int64_t kdim) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    PairRows<8, TransA, Acc>(a + (TransA ? i : i * lda), lda, b, ldb, cols, scale + i,
                             o + i * ldo, ldo, kdim);
  for (; i < n; ++i)
    PairRows<1, TransA, Acc>(a + (TransA ? i : i * lda), lda, b, ldb, cols, scale + i,
                             o + i * ldo, ldo, kdim);
}

// Pairs of rows (rows x cols bfloat16, stride ld) as out[(i / 2) * cols + x] =
// (X[i, x], X[i + 1, x]); an odd last row is paired with 0.
inline void RowPairs(const uint16_t* x, int64_t rows, int64_t cols, int64_t ld, uint32_t* out) {
  for (int64_t i = 0; i < rows; i += 2)
    for (int64_t c = 0; c < cols; ++c)
      out[(i / 2) * cols + c] =
          x[i * ld + c] | (i + 1 < rows ? static_cast<uint32_t>(x[(i + 1) * ld + c]) << 16 : 0u);
}

// Columns as pairs: out[p * rows + j] = (X[j, 2p], X[j, 2p + 1]) (cols even).
inline void ColumnPairs(const uint16_t* x, int64_t rows, int64_t cols, int64_t ld,
                        uint32_t* out) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t p = 0; p < cols / 2; ++p) out[p * rows + j] = PairAt(x + j * ld + 2 * p);
}

inline float Bf16ToFloat(uint16_t x) {  // bfloat16 is float32's upper half
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void StoreRounded(const float* src, int64_t rows, int64_t cols, uint16_t* dst,
                         int64_t ld) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < cols; c += 16) {
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i * cols + c));
      std::memcpy(dst + i * ld + c, &y, sizeof(y));
    }
}

// The bfloat16 backward in pair products (head sizes multiples of 16): the same steps as
// the float32 one, with S and dP from bfloat16 Q, K, dO and V (float32 sums), P and dS
// in float32, then rounded to bfloat16 for the three products that read them (as the
// forward rounds the weights); dK and dV summed in float32 over the blocks of rows and
// rounded once, dQ rounded per row.
void GradPairs(tensorflow::thread::ThreadPool* pool, const uint16_t* qp, const uint16_t* kp,
               const uint16_t* vp, const uint16_t* op, const float* sp, const uint16_t* gp,
               uint16_t* dqp, uint16_t* dkp, uint16_t* dvp, int64_t B, int64_t Sq, int64_t H,
               int64_t d, int64_t Sk, int64_t dv, float scale) {
  const int64_t ldq = H * d, ldv = H * dv;
  const int64_t d2 = d / 2, dv2 = dv / 2, sk2 = (Sk + 1) / 2;
  const float c = scale * 1.44269504088896341f;
  // An even number of rows per block (pairs of rows), with their (rows x Sk) float32
  // buffers about 1 MB together.
  const int64_t rows = std::min<int64_t>(
      (Sq + 1) / 2 * 2, std::max<int64_t>(8, 131072 / Sk / 2 * 2));
  auto work = [&](int64_t begin, int64_t end) {
    FloatBuffer s_buf, dp_buf, dq_buf, dk_buf, dv_buf, scratch_max;
    std::vector<uint32_t> kt2(d2 * Sk), vt2(dv2 * Sk), k2(sk2 * d), ds_rows, pt2, dst2, g2, q2;
    std::vector<float> delta(rows), scales(std::max(rows, Sk), scale), ones(std::max(rows, Sk), 1.0f);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const uint16_t* kb = kp + (b * Sk * H + h) * d;
      const uint16_t* vb = vp + (b * Sk * H + h) * dv;
      ColumnPairs(kb, Sk, d, ldq, kt2.data());   // S = Q K^T
      ColumnPairs(vb, Sk, dv, ldv, vt2.data());  // dP = dO V^T
      RowPairs(kb, Sk, d, ldq, k2.data());       // dQ = dS K
      float* dk_acc = Reserve(dk_buf, Sk * d);
      float* dv_acc = Reserve(dv_buf, Sk * dv);
      std::fill(dk_acc, dk_acc + Sk * d, 0.0f);
      std::fill(dv_acc, dv_acc + Sk * dv, 0.0f);
      for (int64_t first = 0; first < Sq; first += rows) {
        const int64_t n = std::min(rows, Sq - first), n2 = (n + 1) / 2;
        const int64_t row0 = (b * Sq + first) * H + h;
        const uint16_t* qb = qp + row0 * d;
        const uint16_t* ob = op + row0 * dv;
        const uint16_t* gb = gp + row0 * dv;
        const float* stats = sp + bh * Sq + first;
        for (int64_t i = 0; i < n; ++i) {
          float acc = 0.0f;
          for (int64_t x = 0; x < dv; ++x)
            acc += Bf16ToFloat(gb[i * ldv + x]) * Bf16ToFloat(ob[i * ldv + x]);
          delta[i] = acc;
        }
        float* S = Reserve(s_buf, n * Sk);
        float* dP = Reserve(dp_buf, n * Sk);
        float* row_max = Reserve(scratch_max, n);
        ScoresBlockBf16(qb, n, ldq, d2, kt2.data(), Sk, S, row_max);
        ScoresBlockBf16(gb, n, ldv, dv2, vt2.data(), Sk, dP, row_max);
        uint16_t* ds16 = reinterpret_cast<uint16_t*>(Reserve(ds_rows, n * sk2));
        uint32_t* pt = Reserve(pt2, n2 * Sk);
        uint32_t* dst = Reserve(dst2, n2 * Sk);
        const __m512 vc = _mm512_set1_ps(c);
        for (int64_t i = 0; i < n; i += 2) {  // rows i and i + 1 (0 past the last row)
          const bool two = i + 1 < n;
          const __m512 m0 = _mm512_set1_ps(stats[i]), l0 = _mm512_set1_ps(delta[i]);
          const __m512 m1 = _mm512_set1_ps(two ? stats[i + 1] : 0.0f);
          const __m512 l1 = _mm512_set1_ps(two ? delta[i + 1] : 0.0f);
          for (int64_t j = 0; j < Sk; j += 16) {
            const __mmask16 t = Tail(Sk - j);
            const int64_t a = i * Sk + j;
            const __m512 p0 = Exp2(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(t, S + a), vc, m0));
            const __m512 s0 =
                _mm512_mul_ps(p0, _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dP + a), l0));
            __m512 p1 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
            if (two) {
              p1 = Exp2(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(t, S + a + Sk), vc, m1));
              s1 = _mm512_mul_ps(p1, _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dP + a + Sk), l1));
            }
            const __m256bh hp0 = _mm512_cvtneps_pbh(p0), hp1 = _mm512_cvtneps_pbh(p1);
            const __m256bh hs0 = _mm512_cvtneps_pbh(s0), hs1 = _mm512_cvtneps_pbh(s1);
            auto pair = [](__m256bh lo, __m256bh hi) {  // (lo[j], hi[j]) per 32-bit lane
              return _mm512_or_si512(
                  _mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(lo)),
                  _mm512_slli_epi32(
                      _mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(hi)), 16));
            };
            _mm512_mask_storeu_epi32(pt + (i / 2) * Sk + j, t, pair(hp0, hp1));
            _mm512_mask_storeu_epi32(dst + (i / 2) * Sk + j, t, pair(hs0, hs1));
            _mm256_mask_storeu_epi16(ds16 + i * 2 * sk2 + j, t,
                                     reinterpret_cast<const __m256i&>(hs0));
            if (two)
              _mm256_mask_storeu_epi16(ds16 + (i + 1) * 2 * sk2 + j, t,
                                       reinterpret_cast<const __m256i&>(hs1));
          }
          if (Sk % 2) {  // the pad of each row of dS
            ds16[i * 2 * sk2 + Sk] = 0;
            if (two) ds16[(i + 1) * 2 * sk2 + Sk] = 0;
          }
        }
        const uint32_t* ds_pairs = reinterpret_cast<const uint32_t*>(ds16);
        float* dq32 = Reserve(dq_buf, n * d);
        PairBlock<false, false>(ds_pairs, sk2, n, k2.data(), d, d, scales.data(), dq32, d, sk2);
        StoreRounded(dq32, n, d, dqp + row0 * d, ldq);  // dQ = scale dS K
        uint32_t* g = Reserve(g2, n2 * dv);
        uint32_t* qq = Reserve(q2, n2 * d);
        RowPairs(gb, n, dv, ldv, g);
        RowPairs(qb, n, d, ldq, qq);
        PairBlock<true, true>(pt, Sk, Sk, g, dv, dv, ones.data(), dv_acc, dv, n2);  // P^T dO
        PairBlock<true, true>(dst, Sk, Sk, qq, d, d, scales.data(), dk_acc, d, n2);  // dS^T Q
      }
      StoreRounded(dk_acc, Sk, d, dkp + (b * Sk * H + h) * d, ldq);
      StoreRounded(dv_acc, Sk, dv, dvp + (b * Sk * H + h) * dv, ldv);
    }
  };
  const int64_t cost = Sq * Sk * (5 * d + 5 * dv) / 4;  // rough cycles per (batch, head)
  pool->ParallelFor(B * H, cost, work);
}
#endif  // __AVX512BF16__

// The gradient of softmax(scale Q K^T) V, from the forward op's statistics (the weights
// are recomputed, never stored): see GradFloat and GradPairs. bfloat16 without the pair
// products (or with head sizes the tiles do not take): computed in float32 on converted
// copies, the gradients rounded to bfloat16.
template <typename T>
class SoftmaxAttentionGradOp : public OpKernel {
 public:
  explicit SoftmaxAttentionGradOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("scale", &scale_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& q = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& v = ctx->input(2);
    const Tensor& o = ctx->input(3);
    const Tensor& st = ctx->input(4);
    const Tensor& dout = ctx->input(5);
    OP_REQUIRES(ctx, q.dims() == 4 && k.dims() == 4 && v.dims() == 4,
                absl::InvalidArgumentError("AudioTransformerSoftmaxAttentionGrad: query, key "
                                           "and value must be (batch, tokens, heads, size)"));
    const int64_t B = q.dim_size(0), Sq = q.dim_size(1), H = q.dim_size(2);
    const int64_t d = q.dim_size(3), Sk = k.dim_size(1), dv = v.dim_size(3);
    OP_REQUIRES(ctx,
                k.shape() == TensorShape({B, Sk, H, d}) && v.shape() == TensorShape({B, Sk, H, dv}) &&
                    o.shape() == TensorShape({B, Sq, H, dv}) && dout.shape() == o.shape() &&
                    st.shape() == TensorShape({B, H, Sq}),
                absl::InvalidArgumentError("AudioTransformerSoftmaxAttentionGrad: shapes do not "
                                           "match (query " + q.shape().DebugString() + ")"));
    Tensor *dq = nullptr, *dk = nullptr, *dvt = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, q.shape(), &dq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, k.shape(), &dk));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, v.shape(), &dvt));
    if (B * H * Sq * Sk == 0) {
      dq->flat<T>().setZero();
      dk->flat<T>().setZero();
      dvt->flat<T>().setZero();
      return;
    }
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    const float* sp = st.flat<float>().data();
    if constexpr (std::is_same<T, float>::value) {
      GradFloat(pool, q.flat<float>().data(), k.flat<float>().data(), v.flat<float>().data(),
                o.flat<float>().data(), sp, dout.flat<float>().data(), dq->flat<float>().data(),
                dk->flat<float>().data(), dvt->flat<float>().data(), B, Sq, H, d, Sk, dv,
                scale_);
    } else {
      auto u16 = [](const Tensor& t) {
        return reinterpret_cast<const uint16_t*>(t.flat<T>().data());
      };
      auto out16 = [](Tensor* t) { return reinterpret_cast<uint16_t*>(t->flat<T>().data()); };
#ifdef __AVX512BF16__
      if (d % 16 == 0 && dv % 16 == 0 && d <= kMaxTiledHead && dv <= kMaxTiledHead) {
        GradPairs(pool, u16(q), u16(k), u16(v), u16(o), sp, u16(dout), out16(dq), out16(dk),
                  out16(dvt), B, Sq, H, d, Sk, dv, scale_);
        return;
      }
#endif
      auto to_float = [](const Tensor& t) {
        std::vector<float> f(t.NumElements());
        auto x = t.flat<T>();
        for (int64_t i = 0; i < t.NumElements(); ++i) f[i] = static_cast<float>(x(i));
        return f;
      };
      const std::vector<float> qf = to_float(q), kf = to_float(k), vf = to_float(v),
                               of = to_float(o), gf = to_float(dout);
      std::vector<float> dqf(qf.size()), dkf(kf.size()), dvf(vf.size());
      GradFloat(pool, qf.data(), kf.data(), vf.data(), of.data(), sp, gf.data(), dqf.data(),
                dkf.data(), dvf.data(), B, Sq, H, d, Sk, dv, scale_);
      auto store = [](const std::vector<float>& f, Tensor* t) {
        auto x = t->flat<T>();
        for (int64_t i = 0; i < t->NumElements(); ++i) x(i) = T(f[i]);
      };
      store(dqf, dq);
      store(dkf, dk);
      store(dvf, dvt);
    }
  }

 private:
  float scale_;
};

}  // namespace

// Output (B, Sq, H, dv); the training op's statistics (B, H, Sq).
static absl::Status AttentionShape(tensorflow::shape_inference::InferenceContext* c) {
  tensorflow::shape_inference::ShapeHandle q, k, v, out;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &q));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &k));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 4, &v));
  TF_RETURN_IF_ERROR(c->ReplaceDim(q, 3, c->Dim(v, 3), &out));
  c->set_output(0, out);
  if (c->num_outputs() > 1)
    c->set_output(1, c->MakeShape({c->Dim(q, 0), c->Dim(q, 2), c->Dim(q, 1)}));
  return absl::OkStatus();
}

REGISTER_OP("AudioTransformerSoftmaxAttention")
    .Input("query: T")
    .Input("key: T")
    .Input("value: T")
    .Attr("T: {float, bfloat16}")
    .Attr("scale: float = 1.0")
    .Attr("block_rows: int = 0")
    .Output("output: T")
    .SetShapeFn(AttentionShape);

template <typename T>
using AttentionInference = SoftmaxAttentionOp<T, false>;
template <typename T>
using AttentionTrain = SoftmaxAttentionOp<T, true>;

AUDIO_TRANSFORMER_REGISTER_FLOAT_AND_BFLOAT16("AudioTransformerSoftmaxAttention", AttentionInference);

REGISTER_OP("AudioTransformerSoftmaxAttentionTrain")
    .Input("query: T")
    .Input("key: T")
    .Input("value: T")
    .Attr("T: {float, bfloat16}")
    .Attr("scale: float = 1.0")
    .Attr("block_rows: int = 0")
    .Output("output: T")
    .Output("stats: float")
    .SetShapeFn(AttentionShape);

AUDIO_TRANSFORMER_REGISTER_FLOAT_AND_BFLOAT16("AudioTransformerSoftmaxAttentionTrain", AttentionTrain);

REGISTER_OP("AudioTransformerSoftmaxAttentionGrad")
    .Input("query: T")
    .Input("key: T")
    .Input("value: T")
    .Input("output: T")
    .Input("stats: float")
    .Input("d_output: T")
    .Attr("T: {float, bfloat16}")
    .Attr("scale: float = 1.0")
    .Output("d_query: T")
    .Output("d_key: T")
    .Output("d_value: T")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      c->set_output(2, c->input(2));
      return absl::OkStatus();
    });

AUDIO_TRANSFORMER_REGISTER_FLOAT_AND_BFLOAT16("AudioTransformerSoftmaxAttentionGrad",
                                              SoftmaxAttentionGradOp);
