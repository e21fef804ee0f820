// Exact (erf) GELU of x + bias, (x + b) * Phi(x + b), as one TensorFlow CPU op: the MLP's
// first layer adds its bias and applies GELU in one pass over its output, where
// TensorFlow makes two (BiasAdd, then the GELU). Float32; Eigen's vectorised erf.
//
// Built on first use by src/models/native.py, which also registers the gradient
// (recomputed with TensorFlow ops).

#define EIGEN_USE_THREADS
#include <cstdint>
#include <string>

#include <Eigen/Core>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

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
    const float* xp = x.flat<float>().data();
    float* yp = out->flat<float>().data();
    Eigen::Map<const Eigen::ArrayXf> b(bias.flat<float>().data(), N);
    auto work = [&](int64_t begin, int64_t end) {
      Eigen::ArrayXf z(N);
      for (int64_t r = begin; r < end; ++r) {
        z = Eigen::Map<const Eigen::ArrayXf>(xp + r * N, N) + b;
        Eigen::Map<Eigen::ArrayXf>(yp + r * N, N) =
            z * (0.5f * (1.0f + (z * 0.70710678118654752f).erf()));
      }
    };
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(rows, 40 * N, work);
  }
};

}  // namespace

REGISTER_OP("AudioTransformerBiasGelu")
    .Input("x: float")
    .Input("bias: float")
    .Output("y: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("AudioTransformerBiasGelu").Device(tensorflow::DEVICE_CPU),
                        BiasGeluOp);
