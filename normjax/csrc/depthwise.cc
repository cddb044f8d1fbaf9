// Depthwise kxk convolution on CPU, NHWC float32: the forward and both gradients as XLA FFI
// handlers (normjax/native.py builds and registers them, normjax/models/depthwise.py calls them).
// Each handler reads its inputs once and writes its output once; XLA's own formulation of the
// kernel gradient materializes every tap. Every inner loop runs over channels, contiguous in
// NHWC, so the compiler vectorizes it. Padding is implicit: out-of-range taps are skipped.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Partial sums of the kernel gradient: enough blocks to balance a few threads, few enough that
// adding them up is negligible. A constant, so the result does not depend on the thread count.
constexpr int64_t kKernelGradBlocks = 32;

// Runs body(task) for every task in [0, tasks) on XLA's intra-op pool and the calling thread.
// The caller waits for the tasks, never for a pool thread to start, so a pool whose threads are
// all busy (or waiting in another such call) cannot deadlock it.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, F& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, tasks, &body]() {
    for (int64_t t; (t = state->next.fetch_add(1)) < tasks;) {
      body(t);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  // A helper that starts after every task is claimed touches only `state`, which it co-owns.
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

// x (n, h, w, c), kernel (kh, kw, 1, c), y or dy (n, ho, wo, c).
struct Geometry {
  int64_t n, h, w, c, kh, kw, ho, wo, stride, pad;
};

ffi::Error Check(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                 ffi::Span<const int64_t> y, int64_t stride, int64_t pad, Geometry* g) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4 || k[2] != 1 || k[3] != x[3] ||
      y[0] != x[0] || y[3] != x[3] || stride < 1 || pad < 0 ||
      y[1] != (x[1] + 2 * pad - k[0]) / stride + 1 || y[2] != (x[2] + 2 * pad - k[1]) / stride + 1)
    return ffi::Error::InvalidArgument(
        "normjax depthwise: shapes must be x (n, h, w, c), kernel (kh, kw, 1, c) and "
        "y (n, (h + 2 * padding - kh) / stride + 1, (w + 2 * padding - kw) / stride + 1, c)");
  *g = {x[0], x[1], x[2], x[3], k[0], k[1], y[1], y[2], stride, pad};
  return ffi::Error::Success();
}

}  // namespace

// y[n, oh, ow] = sum_ij x[n, oh * stride + i - pad, ow * stride + j - pad] * k[i, j].
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad) {
  Geometry g;
  if (auto e = Check(x.dimensions(), k.dimensions(), y->dimensions(), stride, pad, &g); e.failure())
    return e;
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* yp = y->typed_data();
  auto row_body = [&](int64_t row) {
    int64_t n = row / g.ho, oh = row % g.ho;
    float* yrow = yp + row * g.wo * g.c;
    std::fill(yrow, yrow + g.wo * g.c, 0.f);
    for (int64_t i = 0; i < g.kh; ++i) {
      int64_t ih = oh * g.stride + i - g.pad;
      if (ih < 0 || ih >= g.h) continue;
      const float* xrow = xp + (n * g.h + ih) * g.w * g.c;
      for (int64_t ow = 0; ow < g.wo; ++ow) {
        float* out = yrow + ow * g.c;
        for (int64_t j = 0; j < g.kw; ++j) {
          int64_t iw = ow * g.stride + j - g.pad;
          if (iw < 0 || iw >= g.w) continue;
          const float* in = xrow + iw * g.c;
          const float* kk = kp + (i * g.kw + j) * g.c;
          for (int64_t c = 0; c < g.c; ++c) out[c] += in[c] * kk[c];
        }
      }
    }
  };
  ParallelFor(pool, g.n * g.ho, row_body);
  return ffi::Error::Success();
}

// dx[n, ih, iw] = sum over the (oh, ow, i, j) with oh * stride + i - pad = ih and
// ow * stride + j - pad = iw of dy[n, oh, ow] * k[i, j]: each dy row is scattered to the dx row.
ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t pad) {
  Geometry g;
  if (auto e = Check(dx->dimensions(), k.dimensions(), dy.dimensions(), stride, pad, &g); e.failure())
    return e;
  const float* dyp = dy.typed_data();
  const float* kp = k.typed_data();
  float* dxp = dx->typed_data();
  auto row_body = [&](int64_t row) {
    int64_t n = row / g.h, ih = row % g.h;
    float* dxrow = dxp + row * g.w * g.c;
    std::fill(dxrow, dxrow + g.w * g.c, 0.f);
    for (int64_t i = 0; i < g.kh; ++i) {
      int64_t t = ih + g.pad - i;  // oh * stride
      if (t < 0 || t % g.stride) continue;
      int64_t oh = t / g.stride;
      if (oh >= g.ho) continue;
      const float* dyrow = dyp + (n * g.ho + oh) * g.wo * g.c;
      for (int64_t ow = 0; ow < g.wo; ++ow) {
        const float* d = dyrow + ow * g.c;
        for (int64_t j = 0; j < g.kw; ++j) {
          int64_t iw = ow * g.stride + j - g.pad;
          if (iw < 0 || iw >= g.w) continue;
          float* out = dxrow + iw * g.c;
          const float* kk = kp + (i * g.kw + j) * g.c;
          for (int64_t c = 0; c < g.c; ++c) out[c] += d[c] * kk[c];
        }
      }
    }
  };
  ParallelFor(pool, g.n * g.h, row_body);
  return ffi::Error::Success();
}

// dk[i, j] = sum over n, oh, ow of x[n, oh * stride + i - pad, ow * stride + j - pad] * dy[n, oh, ow].
ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t stride, int64_t pad) {
  Geometry g;
  if (auto e = Check(x.dimensions(), dk->dimensions(), dy.dimensions(), stride, pad, &g); e.failure())
    return e;
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  int64_t taps = g.kh * g.kw, rows = g.n * g.ho;
  int64_t blocks = std::min(rows, kKernelGradBlocks);
  std::vector<float> partial(blocks * taps * g.c, 0.f);
  auto block_body = [&](int64_t b) {
    float* acc = partial.data() + b * taps * g.c;
    for (int64_t row = rows * b / blocks; row < rows * (b + 1) / blocks; ++row) {
      int64_t n = row / g.ho, oh = row % g.ho;
      const float* dyrow = dyp + row * g.wo * g.c;
      for (int64_t i = 0; i < g.kh; ++i) {
        int64_t ih = oh * g.stride + i - g.pad;
        if (ih < 0 || ih >= g.h) continue;
        const float* xrow = xp + (n * g.h + ih) * g.w * g.c;
        for (int64_t ow = 0; ow < g.wo; ++ow) {
          const float* d = dyrow + ow * g.c;
          for (int64_t j = 0; j < g.kw; ++j) {
            int64_t iw = ow * g.stride + j - g.pad;
            if (iw < 0 || iw >= g.w) continue;
            const float* in = xrow + iw * g.c;
            float* a = acc + (i * g.kw + j) * g.c;
            for (int64_t c = 0; c < g.c; ++c) a[c] += in[c] * d[c];
          }
        }
      }
    }
  };
  ParallelFor(pool, blocks, block_body);
  // Added in block order, whichever thread ran each block.
  float* out = dk->typed_data();
  std::fill(out, out + taps * g.c, 0.f);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t e = 0; e < taps * g.c; ++e) out[e] += partial[b * taps * g.c + e];
  return ffi::Error::Success();
}

#define NORMJAX_DEPTHWISE_HANDLER(symbol, fn)                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, fn,                      \
                                ffi::Ffi::Bind()                 \
                                    .Ctx<ffi::ThreadPool>()      \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>() \
                                    .Attr<int64_t>("stride")     \
                                    .Attr<int64_t>("padding"))

NORMJAX_DEPTHWISE_HANDLER(NormjaxDepthwiseForward, Forward);
NORMJAX_DEPTHWISE_HANDLER(NormjaxDepthwiseInputGrad, InputGrad);
NORMJAX_DEPTHWISE_HANDLER(NormjaxDepthwiseKernelGrad, KernelGrad);
