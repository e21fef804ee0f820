// softmax(scale * Q K^T) V over heads, as one TensorFlow CPU op.
//
// query (B, Sq, H, d), key (B, Sk, H, d), value (B, Sk, H, dv): the projections'
// outputs reshaped to heads, tokens before heads, so no transposes are needed on
// either side; output (B, Sq, H, dv). Float32 only.
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
// Built on first use by src/models/native.py, which also registers the
// gradient (recomputed with TensorFlow ops).

#define EIGEN_USE_THREADS
#include <algorithm>
#include <cstdint>
#include <limits>

#include <Eigen/Core>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

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

// S[R x 32 (or fewer, masked)] = Q[R x d] K^T, with K^T laid out as kt (d x Sk).
template <int R>
inline void ScoresTile(const float* q, int64_t ldq, int64_t d, const float* kt, int64_t sk,
                       int64_t j, float* s) {
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
      const __m512 a = _mm512_set1_ps(q[r * ldq + p]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(s + r * sk + j, m0, acc[r][0]);
    _mm512_mask_storeu_ps(s + r * sk + j + 16, m1, acc[r][1]);
  }
}

template <int R>
inline void ScoresRows(const float* q, int64_t ldq, int64_t d, const float* kt, int64_t sk,
                       float* s) {
  for (int64_t j = 0; j < sk; j += 32) ScoresTile<R>(q, ldq, d, kt, sk, j, s);
}

// O[R x 16W] (columns c..c+16W) = scale_r * (P[R x Sk] V[Sk x dv]); ldv, ldo: row strides.
template <int R, int W>
inline void OutputTile(const float* p, int64_t sk, const float* v, int64_t ldv, int64_t c,
                       const float* scale, float* o, int64_t ldo) {
  __m512 acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = _mm512_setzero_ps();
  for (int64_t k = 0; k < sk; ++k) {
    __m512 b[W];
    for (int w = 0; w < W; ++w) b[w] = _mm512_loadu_ps(v + k * ldv + c + 16 * w);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(p[r * sk + k]);
      for (int w = 0; w < W; ++w) acc[r][w] = _mm512_fmadd_ps(a, b[w], acc[r][w]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 f = _mm512_set1_ps(scale[r]);
    for (int w = 0; w < W; ++w)
      _mm512_storeu_ps(o + r * ldo + c + 16 * w, _mm512_mul_ps(acc[r][w], f));
  }
}

template <int R>
inline void OutputRows(const float* p, int64_t sk, const float* v, int64_t ldv, int64_t dv,
                       const float* scale, float* o, int64_t ldo) {
  int64_t c = 0;
  for (; c + 48 <= dv; c += 48) OutputTile<R, 3>(p, sk, v, ldv, c, scale, o, ldo);
  if (dv - c == 32) OutputTile<R, 2>(p, sk, v, ldv, c, scale, o, ldo);
  if (dv - c == 16) OutputTile<R, 1>(p, sk, v, ldv, c, scale, o, ldo);
}

// Rows [0, n) of one work item, 8 at a time, then the rest one by one.
inline void ScoresBlock(const float* q, int64_t n, int64_t ldq, int64_t d, const float* kt,
                        int64_t sk, float* s) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) ScoresRows<8>(q + i * ldq, ldq, d, kt, sk, s + i * sk);
  for (; i < n; ++i) ScoresRows<1>(q + i * ldq, ldq, d, kt, sk, s + i * sk);
}

inline void OutputBlock(const float* p, int64_t n, int64_t sk, const float* v, int64_t ldv,
                        int64_t dv, const float* scale, float* o, int64_t ldo) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    OutputRows<8>(p + i * sk, sk, v, ldv, dv, scale + i, o + i * ldo, ldo);
  for (; i < n; ++i) OutputRows<1>(p + i * sk, sk, v, ldv, dv, scale + i, o + i * ldo, ldo);
}
#endif  // __AVX512F__

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
    if (out->NumElements() == 0) return;
    if (Sk == 0) {  // no keys: softmax over nothing, as TensorFlow gives (NaN)
      out->flat<float>().setConstant(std::numeric_limits<float>::quiet_NaN());
      return;
    }

    const float* qp = q.flat<float>().data();
    const float* kp = k.flat<float>().data();
    const float* vp = v.flat<float>().data();
    float* op = out->flat<float>().data();
    const int64_t ldq = H * d, ldv = H * dv;  // row strides (the output's is ldv)
    int64_t rows = block_rows_ > 0 ? block_rows_ : std::max<int64_t>(16, kScoreBudget / Sk);
    rows = std::max<int64_t>(1, std::min<int64_t>(rows, Sq));
    const int64_t blocks = (Sq + rows - 1) / rows;
    const float scale = scale_;

#ifdef __AVX512F__
    // K^T is laid out once per (batch, head): worth it from a few dozen query rows.
    const bool tiled = d % 16 == 0 && dv % 16 == 0 && rows >= 32;
#else
    const bool tiled = false;
#endif
    auto work = [&](int64_t begin, int64_t end) {
      RowMatrix scratch(rows, Sk);
      RowMatrix key_t(tiled ? d : 0, Sk);  // K^T of the current (batch, head)
      Eigen::VectorXf inverse_sum(rows);
      int64_t transposed = -1;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / blocks, first = (item % blocks) * rows;
        const int64_t b = bh / H, h = bh % H;
        const int64_t n = std::min(rows, Sq - first);
        const float* qb = qp + ((b * Sq + first) * H + h) * d;
        const float* vb = vp + (b * Sk * H + h) * dv;
        float* ob = op + ((b * Sq + first) * H + h) * dv;
        StridedConstMap K(kp + (b * Sk * H + h) * d, Sk, d, Stride(ldq));
        auto S = scratch.topRows(n);
#ifdef __AVX512F__
        if (tiled) {
          if (transposed != bh) {  // K^T (d x Sk) from the strided key rows
            const float* kb = K.data();
            float* kt = key_t.data();
            for (int64_t j = 0; j < Sk; ++j)
              for (int64_t p = 0; p < d; ++p) kt[p * Sk + j] = kb[j * ldq + p];
            transposed = bh;
          }
          ScoresBlock(qb, n, ldq, d, key_t.data(), Sk, scratch.data());
        } else {
          S.noalias() = StridedConstMap(qb, n, d, Stride(ldq)) * K.transpose();
        }
#else
        S.noalias() = StridedConstMap(qb, n, d, Stride(ldq)) * K.transpose();
#endif
        for (int64_t i = 0; i < n; ++i) {  // scale > 0: max(scale * s) = scale * max(s)
          auto row = S.row(i).array();
          row = ((row - row.maxCoeff()) * scale).exp();
          inverse_sum(i) = 1.0f / row.sum();
        }
#ifdef __AVX512F__
        if (tiled) {
          OutputBlock(scratch.data(), n, Sk, vb, ldv, dv, inverse_sum.data(), ob, ldv);
          continue;
        }
#endif
        StridedMap O(ob, n, dv, Stride(ldv));
        O.noalias() = S * StridedConstMap(vb, Sk, dv, Stride(ldv));
        O.array().colwise() *= inverse_sum.head(n).array();
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

}  // namespace

REGISTER_OP("AudioTransformerSoftmaxAttention")
    .Input("query: float")
    .Input("key: float")
    .Input("value: float")
    .Attr("scale: float = 1.0")
    .Attr("block_rows: int = 0")
    .Output("output: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle q, k, v, out;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &q));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &k));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 4, &v));
      TF_RETURN_IF_ERROR(c->ReplaceDim(q, 3, c->Dim(v, 3), &out));
      c->set_output(0, out);
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("AudioTransformerSoftmaxAttention").Device(tensorflow::DEVICE_CPU),
                        SoftmaxAttentionOp);
