// An XLA FFI handler (CPU) for fastxent's fused cross entropy: a measured
// prototype of the transport fastxent.jax does not ship (docs/jax.md,
// "Transport"). It is not part of the package build; build_and_time.py
// compiles it against jax.ffi.include_dir() and csrc/fastxent.h.
//
// One call: float32 logits (N, C) and int64 labels (N,) -> the mean loss
// (float32 scalar) and d(loss)/d(logits) (N, C), written straight into
// XLA's result buffers. fastxent's entry points come from the loaded
// _core extension (fxjax_bind), so the kernels are not compiled twice.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
extern "C" {
#include "fastxent.h"
}

namespace ffi = xla::ffi;

using run_fn = void (*)(int, int, const fx_job *, int);
using check_fn = int64_t (*)(const int64_t *, int64_t, int64_t, int64_t, int64_t *);
using sum_fn = double (*)(const double *, int64_t);
static run_fn g_run;
static check_fn g_check;
static sum_fn g_sum;

extern "C" void fxjax_bind(void *run, void *check, void *sum) {
  g_run = reinterpret_cast<run_fn>(run);
  g_check = reinterpret_cast<check_fn>(check);
  g_sum = reinterpret_cast<sum_fn>(sum);
}

static ffi::Error CeMean(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S64> labels,
                         ffi::ResultBuffer<ffi::F32> loss, ffi::ResultBuffer<ffi::F32> grad,
                         int64_t ignore_index, int32_t num_threads, bool want_grad) {
  auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("logits must have a class axis");
  int64_t c = dims.back(), n = c ? x.element_count() / c : 0;
  int64_t counted = 0;
  int64_t bad = g_check(labels.typed_data(), n, c, ignore_index, &counted);
  if (bad >= 0)
    return ffi::Error::InvalidArgument("label " + std::to_string(labels.typed_data()[bad]) +
                                       " at flat position " + std::to_string(bad) +
                                       " is out of range [0, " + std::to_string(c) + ")");
  std::vector<double> row(n);
  double gscale = counted ? 1.0 / counted : 0.0;
  fx_job job = {};
  job.n_rows = n;
  job.n_cols = c;
  job.x = x.typed_data();
  job.x_ld = c;
  job.labels = labels.typed_data();
  job.ignore_index = ignore_index;
  job.w_sum = (double)c;
  job.out = want_grad ? grad->typed_data() : nullptr;
  job.out_ld = c;
  job.row_out = row.data();
  job.gscale = &gscale;
  job.temperature = 1.0;
  g_run(FX_CE_HARD, FX_F32, &job, num_threads);
  double total = g_sum(row.data(), n);
  loss->typed_data()[0] = (float)(counted ? total / counted : NAN);
  return ffi::Error::Success();
}

static ffi::Error CeMeanGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S64> labels,
                             ffi::ResultBuffer<ffi::F32> loss, ffi::ResultBuffer<ffi::F32> grad,
                             int64_t ignore_index, int32_t num_threads) {
  return CeMean(x, labels, loss, grad, ignore_index, num_threads, true);
}

static ffi::Error CeMeanLoss(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S64> labels,
                             ffi::ResultBuffer<ffi::F32> loss, int64_t ignore_index,
                             int32_t num_threads) {
  return CeMean(x, labels, loss, loss, ignore_index, num_threads, false);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FxCeMeanGrad, CeMeanGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S64>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ignore_index")
                                  .Attr<int32_t>("num_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FxCeMeanLoss, CeMeanLoss,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S64>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ignore_index")
                                  .Attr<int32_t>("num_threads"));
