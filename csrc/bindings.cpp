// pybind11 bindings of tpo_fast._C. Python (tpo_fast/ops/logits.py) validates inputs with readable
// errors first; the checks here guard direct callers of the extension.
#include <torch/extension.h>

#include <sstream>
#include <stdexcept>

#include "logits_logprobs.h"

namespace {

// No exception leaves this module: each entry point catches whatever its body throws (its own input checks,
// a kernel's TORCH_CHECK, a CUDA launch error) and returns the message as the first element of its result,
// "" on success; tpo_fast._ext raises it as a RuntimeError. In both H100/H200 runs (2026-12-04, 2026-12-06)
// the CUDA build of this extension (nvcc with the machine's own gcc) crashed the process with a segmentation
// fault on the first error it threw across pybind11 (TORCH_CHECK's c10::Error, then std::runtime_error);
// a throw caught inside the function that made it never reaches pybind11's exception translators.
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream msg;
  (msg << ... << args);
  throw std::runtime_error(msg.str());
}

#define TPO_REQUIRE(cond, ...) \
  do {                         \
    if (!(cond)) fail(__VA_ARGS__); \
  } while (0)

void check_common(const at::Tensor& logits, const at::Tensor& targets) {
  TPO_REQUIRE(logits.dim() == 2, "logits must be 2-D (N, V), got ", logits.dim(), "-D");
  TPO_REQUIRE(logits.size(1) > 0, "logits must have at least one vocabulary column");
  TPO_REQUIRE(logits.size(0) <= 1 || logits.stride(1) == 1, "logits must be contiguous in the last dim");
  TPO_REQUIRE(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1),
              "logits rows must not overlap (stride(0) >= V)");
  const auto dtype = logits.scalar_type();
  TPO_REQUIRE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "logits must be float32, float16 or bfloat16, got ", dtype);
  TPO_REQUIRE(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "targets must be int64 of shape (N,) = (", logits.size(0), ",)");
  TPO_REQUIRE(targets.is_contiguous(), "targets must be contiguous");
  TPO_REQUIRE(targets.device() == logits.device(), "targets must be on the device of logits");
}

void check_row_stat(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TPO_REQUIRE(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == logits.size(0) && t.is_contiguous(),
              name, " must be a contiguous float32 tensor of shape (N,) = (", logits.size(0), ",)");
  TPO_REQUIRE(t.device() == logits.device(), name, " must be on the device of logits");
}

// Runs `body`; returns "" when it returned, else the message of what it threw.
template <typename F>
std::string guarded(F&& body) {
  try {
    body();
    return {};
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "tpo_fast._C: unknown C++ exception";
  }
}

bool is_cuda(const at::Tensor& logits) {
  if (!logits.is_cuda()) {
    TPO_REQUIRE(logits.is_cpu(), "logits must be on CPU or CUDA, got ", logits.device());
    return false;
  }
#ifndef TPO_FAST_WITH_CUDA
  fail("tpo_fast._C was built without CUDA; use backend='triton' or 'torch' for CUDA tensors");
#endif
  return true;
}

// Returns (lse, target_logit), both fp32 (N,); rows whose target is ignore_index hold 0.
std::vector<at::Tensor> logits_forward_impl(const at::Tensor& logits, const at::Tensor& targets,
                                            int64_t ignore_index) {
  check_common(logits, targets);
  auto opts = logits.options().dtype(at::kFloat);
  auto lse = at::empty({logits.size(0)}, opts);
  auto z = at::empty({logits.size(0)}, opts);
  if (logits.size(0) == 0) return {lse, z};
  if (is_cuda(logits)) {
#ifdef TPO_FAST_WITH_CUDA
    tpo_fast::logits_forward_cuda(logits, targets, ignore_index, lse, z);
#endif
  } else {
    tpo_fast::logits_forward_cpu(logits, targets, ignore_index, lse, z);
  }
  return {lse, z};
}

// Gradient w.r.t. logits: coef_p * softmax + coef_y * onehot(targets), 0 on ignored rows.
// With inplace=True it is written into the logits buffer, which is returned.
at::Tensor logits_backward_impl(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                const at::Tensor& coef_p, const at::Tensor& coef_y, int64_t ignore_index,
                                bool inplace) {
  check_common(logits, targets);
  check_row_stat(lse, logits, "lse");
  check_row_stat(coef_p, logits, "coef_p");
  check_row_stat(coef_y, logits, "coef_y");
  at::Tensor grad = inplace ? logits : at::empty(logits.sizes(), logits.options());
  if (logits.size(0) == 0) return grad;
  if (is_cuda(logits)) {
#ifdef TPO_FAST_WITH_CUDA
    tpo_fast::logits_backward_cuda(logits, targets, lse, coef_p, coef_y, ignore_index, grad);
#endif
  } else {
    tpo_fast::logits_backward_cpu(logits, targets, lse, coef_p, coef_y, ignore_index, grad);
  }
  return grad;
}

// (error, lse, target_logit): error "" and the two (N,) fp32 tensors, or the error and two None.
py::tuple try_logits_forward(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  std::vector<at::Tensor> out;
  std::string error = guarded([&] { out = logits_forward_impl(logits, targets, ignore_index); });
  if (!error.empty()) return py::make_tuple(error, py::none(), py::none());
  return py::make_tuple(error, out[0], out[1]);
}

// (error, grad): error "" and the gradient, or the error and None.
py::tuple try_logits_backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                              const at::Tensor& coef_p, const at::Tensor& coef_y, int64_t ignore_index,
                              bool inplace) {
  at::Tensor grad;
  std::string error = guarded(
      [&] { grad = logits_backward_impl(logits, targets, lse, coef_p, coef_y, ignore_index, inplace); });
  if (!error.empty()) return py::make_tuple(error, py::none());
  return py::make_tuple(error, grad);
}

// The error, or "" once the CPU code path is set.
std::string try_set_cpu_isa(const std::string& isa) {
  return guarded([&] { tpo_fast::set_cpu_isa(isa); });
}

bool has_cuda() {
#ifdef TPO_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tpo_fast compiled kernels: log-softmax statistics from materialized logits";
  m.def("try_logits_forward", &try_logits_forward, "(error, lse, target_logit) per row; error '' on success",
        py::arg("logits"), py::arg("targets"), py::arg("ignore_index"));
  m.def("try_logits_backward", &try_logits_backward,
        "(error, gradient of the per-row statistics w.r.t. logits); error '' on success", py::arg("logits"),
        py::arg("targets"), py::arg("lse"), py::arg("coef_p"), py::arg("coef_y"), py::arg("ignore_index"),
        py::arg("inplace"));
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels were compiled in");
  m.def("cpu_isa", &tpo_fast::cpu_isa, "the CPU code path in use: 'avx2' or 'base'");
  m.def("try_set_cpu_isa", &try_set_cpu_isa, "force the CPU code path ('auto', 'base' or 'avx2'); returns the error or ''",
        py::arg("isa"));
}
