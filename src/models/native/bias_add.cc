// A Dense layer's bias, y = x + bias, and the same with the block's residual added,
// y = x + bias + residual, as one TensorFlow CPU op each: one pass over the rows where
// TensorFlow makes one (BiasAdd) or two (BiasAdd, then the residual's AddV2). x, y and
// the residual float32, or bfloat16 (as under mixed_bfloat16: summed in float32, y
// rounded to nearest even once, where the TensorFlow ops round the bias, the biased x
// and the sum); the bias float32. TensorFlow's bfloat16 BiasAdd converts element by
// element (about 2.5x the float32 op's time per byte on AVX-512 CPUs); here the rows
// are converted 16 values at a time. The output takes an input's buffer where no other
// op reads it (as TensorFlow's BiasAdd does).
//
// The gradient op at the end of this file sums dy over the rows (the bias's gradient,
// float32 whatever T, per shard of rows); dx and the residual's gradient are dy itself.
//
// Built on first use by src/models/native.py, which also registers the gradients.

#define EIGEN_USE_THREADS
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

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

using audio_transformer_native::Load;
using audio_transformer_native::Store;

// kResidual: a third input of x's shape is added too.
template <typename T, bool kResidual>
class BiasAddOp : public OpKernel {
 public:
  explicit BiasAddOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const char* name = kResidual ? "AudioTransformerBiasAddResidual" : "AudioTransformerBiasAdd";
    const Tensor& x = ctx->input(0);
    const Tensor& bias = ctx->input(1);
    OP_REQUIRES(ctx, x.dims() >= 1,
                absl::InvalidArgumentError(std::string(name) + ": x must have an axis"));
    const int64_t N = x.dim_size(x.dims() - 1);
    OP_REQUIRES(ctx, bias.NumElements() == N,
                absl::InvalidArgumentError(std::string(name) + ": the bias must have " +
                                           std::to_string(N) +
                                           " values (the last axis of x)"));
    const T* rp = nullptr;
    if (kResidual) {
      const Tensor& residual = ctx->input(2);
      OP_REQUIRES(ctx, residual.shape() == x.shape(),
                  absl::InvalidArgumentError(std::string(name) +
                                             ": the residual must have x's shape, " +
                                             x.shape().DebugString() + ", not " +
                                             residual.shape().DebugString()));
      rp = residual.flat<T>().data();
    }
    const T* xp = x.flat<T>().data();  // before the output may take x's buffer
    Tensor* out = nullptr;  // in place, in x's (or the residual's) buffer where it is free
    if (kResidual) {
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0, 2}, 0, x.shape(), &out));
    } else {
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &out));
    }
    if (x.NumElements() == 0) return;
    const int64_t rows = x.NumElements() / N;
    T* yp = out->flat<T>().data();
    const float* b = bias.flat<float>().data();
    auto work = [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<T, float>) {  // in place in the output row
        for (int64_t r = begin; r < end; ++r) {
          const float* xr = xp + r * N;
          float* yr = yp + r * N;
          if (kResidual) {
            const float* rr = rp + r * N;
            for (int64_t i = 0; i < N; ++i) yr[i] = xr[i] + b[i] + rr[i];
          } else {
            for (int64_t i = 0; i < N; ++i) yr[i] = xr[i] + b[i];
          }
        }
      } else {  // through float32 rows
        std::vector<float> row(N), res(kResidual ? N : 0);
        for (int64_t r = begin; r < end; ++r) {
          Load(xp + r * N, row.data(), N);
          if (kResidual) {
            Load(rp + r * N, res.data(), N);
            for (int64_t i = 0; i < N; ++i) row[i] += b[i] + res[i];
          } else {
            for (int64_t i = 0; i < N; ++i) row[i] += b[i];
          }
          Store(row.data(), yp + r * N, N);
        }
      }
    };
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
        rows, (kResidual ? 6 : 4) * N, work);
  }
};

template <typename T>
using BiasAdd = BiasAddOp<T, false>;
template <typename T>
using BiasAddResidual = BiasAddOp<T, true>;

// dbias = dy summed over the rows, in float32 (whatever T): per shard of rows, then the
// shards' sums in order.
template <typename T>
class BiasGradOp : public OpKernel {
 public:
  explicit BiasGradOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    OP_REQUIRES(ctx, dy.dims() >= 1,
                absl::InvalidArgumentError("AudioTransformerBiasGrad: dy must have an axis"));
    const int64_t N = dy.dim_size(dy.dims() - 1);
    Tensor* dbias = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tensorflow::TensorShape({N}), &dbias));
    float* db = dbias->flat<float>().data();
    std::fill(db, db + N, 0.0f);
    const int64_t rows = N ? dy.NumElements() / N : 0;
    if (rows == 0) return;
    const T* dyp = dy.flat<T>().data();
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    const int64_t shards = std::min<int64_t>(rows, 4 * (pool->NumThreads() + 1));
    const int64_t per = (rows + shards - 1) / shards;
    std::vector<float> partial(shards * N, 0.0f);
    auto work = [&](int64_t begin, int64_t end) {
      std::vector<float> row(std::is_same_v<T, float> ? 0 : N);
      for (int64_t shard = begin; shard < end; ++shard) {
        float* sum = partial.data() + shard * N;
        for (int64_t r = shard * per; r < std::min(rows, (shard + 1) * per); ++r) {
          const float* d = row.data();
          if constexpr (std::is_same_v<T, float>) {
            d = dyp + r * N;
          } else {
            Load(dyp + r * N, row.data(), N);
          }
          for (int64_t i = 0; i < N; ++i) sum[i] += d[i];
        }
      }
    };
    pool->ParallelFor(shards, per * N * 2, work);
    for (int64_t shard = 0; shard < shards; ++shard)
      for (int64_t i = 0; i < N; ++i) db[i] += partial[shard * N + i];
  }
};

}  // namespace

REGISTER_OP("AudioTransformerBiasAdd")
    .Input("x: T")
    .Input("bias: float")
    .Attr("T: {float, bfloat16}")
    .Output("y: T")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    });

AUDIO_TRANSFORMER_REGISTER_FLOAT_AND_BFLOAT16("AudioTransformerBiasAdd", BiasAdd);

REGISTER_OP("AudioTransformerBiasAddResidual")
    .Input("x: T")
    .Input("bias: float")
    .Input("residual: T")
    .Attr("T: {float, bfloat16}")
    .Output("y: T")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle out;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(2), &out));
      c->set_output(0, out);
      return absl::OkStatus();
    });

AUDIO_TRANSFORMER_REGISTER_FLOAT_AND_BFLOAT16("AudioTransformerBiasAddResidual",
                                              BiasAddResidual);

REGISTER_OP("AudioTransformerBiasGrad")
    .Input("dy: T")
    .Attr("T: {float, bfloat16}")
    .Output("dbias: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle dy;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &dy));
      c->set_output(0, c->Vector(c->Dim(dy, -1)));
      return absl::OkStatus();
    });

AUDIO_TRANSFORMER_REGISTER_FLOAT_AND_BFLOAT16("AudioTransformerBiasGrad", BiasGradOp);
