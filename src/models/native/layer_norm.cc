// LayerNorm over the last axis, (x - mean) / sqrt(var + epsilon) * gamma + beta, as one
// TensorFlow CPU op: one read of x and one write of y, where TensorFlow's ops (mean,
// subtract, square, mean, rsqrt, multiply, multiply, add) make about eight passes.
// x and y float32, or bfloat16 (as under mixed_bfloat16: computed in float32, y rounded
// to nearest even); gamma, beta and the statistics float32. Each row's mean, then its
// variance from the centred values (as src/models/layers.py computes them), summed in
// float32 in vectorised order.
//
// A training variant also returns each row's mean and 1 / std, for the compiled
// gradient op at the end of this file.
//
// Built on first use by src/models/native.py, which also registers the gradients
// (of the inference op: recomputed with TensorFlow ops; of the training op: the
// compiled gradient op).

#define EIGEN_USE_THREADS
#include <algorithm>
#include <cmath>
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

// kStats: also each row's mean and 1 / std (outputs 1 and 2, x's shape without its
// last axis), for the gradient op below (the training op).
template <typename T, bool kStats = false>
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
    float *mean_out = nullptr, *rstd_out = nullptr;
    if (kStats) {
      tensorflow::TensorShape row_shape = x.shape();
      row_shape.RemoveLastDims(1);
      Tensor *m = nullptr, *r = nullptr;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(1, row_shape, &m));
      OP_REQUIRES_OK(ctx, ctx->allocate_output(2, row_shape, &r));
      mean_out = m->flat<float>().data();
      rstd_out = r->flat<float>().data();
    }
    if (x.NumElements() == 0) return;
    const int64_t rows = x.NumElements() / D;
    const T* xp = x.flat<T>().data();
    const float* g = gamma.flat<float>().data();
    const float* b = beta.flat<float>().data();
    T* yp = out->flat<T>().data();
    const double eps = epsilon_;
    auto work = [&](int64_t begin, int64_t end) {
      std::vector<float> centred(D), in(D), y_buf(D);
      float* c = centred.data();
      for (int64_t r = begin; r < end; ++r) {
        const float* row = RowIn(xp + r * D, D, in.data());
        float* y = RowBuffer(yp + r * D, y_buf.data());
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
        RowOut(y, yp + r * D, D);
        if (kStats) {
          mean_out[r] = mean;
          rstd_out[r] = rstd;
        }
      }
    };
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(rows, 8 * D, work);
  }

 private:
  float epsilon_;
};


// The gradient of LayerNorm from the forward's row statistics: with xhat = (x - mean)
// rstd and g = dy gamma, dx = rstd (g - mean(g) - xhat mean(g xhat)); dgamma = sum over
// rows of dy xhat, dbeta = sum of dy, summed per shard of rows, then over shards.
template <typename T>
class LayerNormGradOp : public OpKernel {
 public:
  explicit LayerNormGradOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& gamma = ctx->input(1);
    const Tensor& mean = ctx->input(2);
    const Tensor& rstd = ctx->input(3);
    const Tensor& dy = ctx->input(4);
    OP_REQUIRES(ctx, x.dims() >= 1 && dy.shape() == x.shape(),
                absl::InvalidArgumentError(
                    "AudioTransformerLayerNormGrad: dy must have x's shape"));
    const int64_t D = x.dim_size(x.dims() - 1);
    const int64_t rows = D ? x.NumElements() / D : 0;
    OP_REQUIRES(ctx, gamma.NumElements() == D && mean.NumElements() == rows &&
                         rstd.NumElements() == rows,
                absl::InvalidArgumentError(
                    "AudioTransformerLayerNormGrad: gamma, mean and rstd do not match x"));
    Tensor *dx = nullptr, *dgamma = nullptr, *dbeta = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, gamma.shape(), &dgamma));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, gamma.shape(), &dbeta));
    float* dg = dgamma->flat<float>().data();
    float* db = dbeta->flat<float>().data();
    const T* xp = x.flat<T>().data();
    const float* gp = gamma.flat<float>().data();
    const float* mp = mean.flat<float>().data();
    const float* rp = rstd.flat<float>().data();
    const T* dyp = dy.flat<T>().data();
    T* dxp = dx->flat<T>().data();
    std::vector<float> sums(2 * D);  // dgamma, then dbeta
    SumRowsByShard(
        ctx->device()->tensorflow_cpu_worker_threads()->workers, rows, 2 * D, D * 12,
        sums.data(), [&](int64_t begin, int64_t end, float* pg) {
          float* pb = pg + D;
          std::vector<float> xhat(D), g(D), x_buf(D), dy_buf(D), dx_buf(D);
          for (int64_t r = begin; r < end; ++r) {
            const float* xr = RowIn(xp + r * D, D, x_buf.data());
            const float* dr = RowIn(dyp + r * D, D, dy_buf.data());
            const float m = mp[r], s = rp[r];
            float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
            for (int64_t i = 0; i < D; ++i) {
              xhat[i] = (xr[i] - m) * s;
              g[i] = dr[i] * gp[i];
              sum_g += g[i];
              sum_gx += g[i] * xhat[i];
              pg[i] += dr[i] * xhat[i];
              pb[i] += dr[i];
            }
            const float mg = sum_g / D, mgx = sum_gx / D;
            float* out = RowBuffer(dxp + r * D, dx_buf.data());
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) out[i] = s * (g[i] - mg - xhat[i] * mgx);
            RowOut(out, dxp + r * D, D);
          }
        });
    std::copy(sums.begin(), sums.begin() + D, dg);
    std::copy(sums.begin() + D, sums.end(), db);
  }
};

}  // namespace

REGISTER_OP("AudioTransformerLayerNorm")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Attr("T: {float, bfloat16}")
    .Attr("epsilon: float")
    .Output("y: T")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    });

template <typename T>
using LayerNormInference = LayerNormOp<T, false>;
template <typename T>
using LayerNormTrain = LayerNormOp<T, true>;

AUDIO_TRANSFORMER_REGISTER_FLOAT_AND_BFLOAT16("AudioTransformerLayerNorm", LayerNormInference);

REGISTER_OP("AudioTransformerLayerNormTrain")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Attr("T: {float, bfloat16}")
    .Attr("epsilon: float")
    .Output("y: T")
    .Output("mean: float")
    .Output("rstd: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle rows;
      TF_RETURN_IF_ERROR(c->Subshape(c->input(0), 0, -1, &rows));
      c->set_output(0, c->input(0));
      c->set_output(1, rows);
      c->set_output(2, rows);
      return absl::OkStatus();
    });

AUDIO_TRANSFORMER_REGISTER_FLOAT_AND_BFLOAT16("AudioTransformerLayerNormTrain", LayerNormTrain);

REGISTER_OP("AudioTransformerLayerNormGrad")
    .Input("x: T")
    .Input("gamma: float")
    .Input("mean: float")
    .Input("rstd: float")
    .Input("dy: T")
    .Attr("T: {float, bfloat16}")
    .Output("dx: T")
    .Output("d_gamma: float")
    .Output("d_beta: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      c->set_output(2, c->input(1));
      return absl::OkStatus();
    });

AUDIO_TRANSFORMER_REGISTER_FLOAT_AND_BFLOAT16("AudioTransformerLayerNormGrad", LayerNormGradOp);
