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
#include <cstdint>
#include <string>
#include <vector>

#include "bfloat16.h"
#include "shards.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

using audio_transformer_native::RowBuffer;
using audio_transformer_native::RowIn;
using audio_transformer_native::RowOut;
using audio_transformer_native::SumRowsByShard;

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
      std::vector<float> x_buf(N), res_buf(N), y_buf(N);  // (bfloat16 rows)
      for (int64_t r = begin; r < end; ++r) {
        const float* xr = RowIn(xp + r * N, N, x_buf.data());
        float* yr = RowBuffer(yp + r * N, y_buf.data());
        if (kResidual) {
          const float* rr = RowIn(rp + r * N, N, res_buf.data());
          for (int64_t i = 0; i < N; ++i) yr[i] = xr[i] + b[i] + rr[i];
        } else {
          for (int64_t i = 0; i < N; ++i) yr[i] = xr[i] + b[i];
        }
        RowOut(yr, yp + r * N, N);
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
    const int64_t rows = N ? dy.NumElements() / N : 0;
    const T* dyp = dy.flat<T>().data();
    SumRowsByShard(
        ctx->device()->tensorflow_cpu_worker_threads()->workers, rows, N, N * 2,
        dbias->flat<float>().data(), [&](int64_t begin, int64_t end, float* sum) {
          std::vector<float> buf(N);  // (bfloat16 rows)
          for (int64_t r = begin; r < end; ++r) {
            const float* d = RowIn(dyp + r * N, N, buf.data());
            for (int64_t i = 0; i < N; ++i) sum[i] += d[i];
          }
        });
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
