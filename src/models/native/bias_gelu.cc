// Exact (erf) GELU of x + bias, (x + b) * Phi(x + b), as one TensorFlow CPU op: the MLP's
// first layer adds its bias and applies GELU in one pass over its output, where
// TensorFlow makes two (BiasAdd, then the GELU). x and y float32, or bfloat16 (as under
// mixed_bfloat16; computed in float32, rounded to nearest even); the bias float32.
// Eigen's vectorised erf.
//
// The gradient op at the end of this file recomputes z = x + bias and returns
// dx = dy * (Phi(z) + z * phi(z)) in one pass, with the bias's gradient (dx summed over
// the rows) taken in the same pass, per shard of rows.
//
// Built on first use by src/models/native.py, which also registers the gradient.

#define EIGEN_USE_THREADS
#include <cstdint>
#include <string>

#include <Eigen/Core>

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

using audio_transformer_native::Load;
using audio_transformer_native::Store;
using audio_transformer_native::SumRowsByShard;

template <typename T>
class BiasGeluOp : public OpKernel {
 public:
  explicit BiasGeluOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& bias = ctx->input(1);
    OP_REQUIRES(ctx, x.dims() >= 1,
                absl::InvalidArgumentError("AudioTransformerBiasGelu: x must have an axis"));
    const int64_t N = x.dim_size(x.dims() - 1);
    OP_REQUIRES(ctx, bias.NumElements() == N,
                absl::InvalidArgumentError("AudioTransformerBiasGelu: the bias must have " +
                                           std::to_string(N) +
                                           " values (the last axis of x)"));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &out));
    if (x.NumElements() == 0) return;
    const int64_t rows = x.NumElements() / N;
    const T* xp = x.flat<T>().data();
    T* yp = out->flat<T>().data();
    Eigen::Map<const Eigen::ArrayXf> b(bias.flat<float>().data(), N);
    auto work = [&](int64_t begin, int64_t end) {
      Eigen::ArrayXf z(N), y(N);
      for (int64_t r = begin; r < end; ++r) {
        Load(xp + r * N, z.data(), N);
        z += b;
        y = z * (0.5f * (1.0f + (z * 0.70710678118654752f).erf()));
        Store(y.data(), yp + r * N, N);
      }
    };
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(rows, 40 * N, work);
  }
};


// dx = dy * GELU'(x + bias) and dbias = sum of dx over the rows (float32, whatever T);
// computed in float32, dx rounded to T.
template <typename T>
class BiasGeluGradOp : public OpKernel {
 public:
  explicit BiasGeluGradOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& bias = ctx->input(1);
    const Tensor& dy = ctx->input(2);
    OP_REQUIRES(ctx, x.dims() >= 1 && dy.shape() == x.shape(),
                absl::InvalidArgumentError(
                    "AudioTransformerBiasGeluGrad: dy must have x's shape"));
    const int64_t N = x.dim_size(x.dims() - 1);
    OP_REQUIRES(ctx, bias.NumElements() == N,
                absl::InvalidArgumentError("AudioTransformerBiasGeluGrad: the bias must have " +
                                           std::to_string(N) +
                                           " values (the last axis of x)"));
    Tensor *dx = nullptr, *dbias = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, bias.shape(), &dbias));
    const int64_t rows = N ? x.NumElements() / N : 0;
    const T* xp = x.flat<T>().data();
    const T* dyp = dy.flat<T>().data();
    T* dxp = dx->flat<T>().data();
    Eigen::Map<const Eigen::ArrayXf> b(bias.flat<float>().data(), N);
    SumRowsByShard(
        ctx->device()->tensorflow_cpu_worker_threads()->workers, rows, N, N * 60,
        dbias->flat<float>().data(), [&](int64_t begin, int64_t end, float* partial) {
          Eigen::Map<Eigen::ArrayXf> sum(partial, N);
          Eigen::ArrayXf z(N), d(N);
          for (int64_t r = begin; r < end; ++r) {
            Load(xp + r * N, z.data(), N);
            Load(dyp + r * N, d.data(), N);
            z += b;
            // d/dz z Phi(z) = Phi(z) + z phi(z), phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
            d *= 0.5f * (1.0f + (z * 0.70710678118654752f).erf()) +
                 z * (z.square() * -0.5f).exp() * 0.39894228040143268f;
            sum += d;
            Store(d.data(), dxp + r * N, N);
          }
        });
  }
};

}  // namespace

REGISTER_OP("AudioTransformerBiasGelu")
    .Input("x: T")
    .Input("bias: float")
    .Attr("T: {float, bfloat16}")
    .Output("y: T")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    });

AUDIO_TRANSFORMER_REGISTER_FLOAT_AND_BFLOAT16("AudioTransformerBiasGelu", BiasGeluOp);

REGISTER_OP("AudioTransformerBiasGeluGrad")
    .Input("x: T")
    .Input("bias: float")
    .Input("dy: T")
    .Attr("T: {float, bfloat16}")
    .Output("dx: T")
    .Output("dbias: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      return absl::OkStatus();
    });

AUDIO_TRANSFORMER_REGISTER_FLOAT_AND_BFLOAT16("AudioTransformerBiasGeluGrad", BiasGeluGradOp);
