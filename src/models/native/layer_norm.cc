// LayerNorm over the last axis, (x - mean) / sqrt(var + epsilon) * gamma + beta, as one
// TensorFlow CPU op: one read of x and one write of y, where TensorFlow's ops (mean,
// subtract, square, mean, rsqrt, multiply, multiply, add) make about eight passes.
// Float32; each row's mean, then its variance from the centred values (as
// src/models/layers.py computes them), summed in float32 in vectorised order.
//
// Built on first use by src/models/native.py, which also registers the gradient
// (recomputed with TensorFlow ops).

#define EIGEN_USE_THREADS
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

class LayerNormOp : public OpKernel {
 public:
  explicit LayerNormOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& gamma = ctx->input(1);
    const Tensor& beta = ctx->input(2);
    OP_REQUIRES(ctx, x.dims() >= 1,
                absl::InvalidArgumentError("AudioTransformerLayerNorm: x must have an axis"));
    const int64_t D = x.dim_size(x.dims() - 1);
    OP_REQUIRES(ctx, gamma.NumElements() == D && beta.NumElements() == D,
                absl::InvalidArgumentError(
                    "AudioTransformerLayerNorm: gamma and beta must have " +
                    std::to_string(D) + " values (the last axis of x)"));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &out));
    if (x.NumElements() == 0) return;
    const int64_t rows = x.NumElements() / D;
    const float* xp = x.flat<float>().data();
    const float* g = gamma.flat<float>().data();
    const float* b = beta.flat<float>().data();
    float* yp = out->flat<float>().data();
    const double eps = epsilon_;
    auto work = [&](int64_t begin, int64_t end) {
      std::vector<float> centred(D);
      float* c = centred.data();
      for (int64_t r = begin; r < end; ++r) {
        const float* row = xp + r * D;
        float* y = yp + r * D;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < D; ++i) sum += row[i];
        const float mean = sum / static_cast<float>(D);
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < D; ++i) {
          c[i] = row[i] - mean;
          squares += c[i] * c[i];
        }
        const float rstd =
            static_cast<float>(1.0 / std::sqrt(static_cast<double>(squares) / D + eps));
        for (int64_t i = 0; i < D; ++i) y[i] = c[i] * rstd * g[i] + b[i];
      }
    };
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(rows, 8 * D, work);
  }

 private:
  float epsilon_;
};

}  // namespace

REGISTER_OP("AudioTransformerLayerNorm")
    .Input("x: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Attr("epsilon: float")
    .Output("y: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("AudioTransformerLayerNorm").Device(tensorflow::DEVICE_CPU),
                        LayerNormOp);
