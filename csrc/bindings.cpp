// pybind11 bindings of tpo_fast._C. Python (tpo_fast/ops/logits.py) validates inputs with readable
// errors first; the checks here guard direct callers of the extension, who get their message back.
#include <torch/extension.h>

#include <sstream>
#include <string>
#include <vector>

#include "logits_logprobs.h"

namespace {

// No exception leaves this module, and its own input checks throw none: they return their message, and each
// entry point returns it as the first element of its result, "" on success; tpo_fast._ext raises it as a
// RuntimeError. What the kernels below may still throw (a TORCH_CHECK, a CUDA launch error) is caught inside
// the entry point and returned the same way. In both GPU runs that built this extension with CUDA (H200
// 2026-12-04, H100 2026-12-06; nvcc with the machine's own gcc) the process crashed with a segmentation fault
// on the first input error, thrown across pybind11 (TORCH_CHECK's c10::Error, then std::runtime_error).
template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream msg;
  (msg << ... << args);
  return msg.str();
}

// Returns the message from the enclosing function (a std::string: "" means no error) when `cond` fails.
#define TPO_REQUIRE(cond, ...)                     \
  do {                                             \
    if (!(cond)) return message(__VA_ARGS__);      \
  } while (0)

// Returns the error of a check (a std::string) from the enclosing function, if it has one.
#define TPO_RETURN_IF_ERROR(expr)                  \
  do {                                             \
    std::string error_ = (expr);                   \
    if (!error_.empty()) return error_;            \
  } while (0)

std::string check_common(const at::Tensor& logits, const at::Tensor& targets) {
  TPO_REQUIRE(logits.dim() == 2, "logits must be 2-D (N, V), got ", logits.dim(), "-D");
  TPO_REQUIRE(logits.size(1) > 0, "logits must have at least one vocabulary column");
  // The kernels read a row as V consecutive elements: a single row needs a unit column stride too (V = 1 has no
  // column step); torch leaves only the stride of a size-1 dim free.
  TPO_REQUIRE(logits.size(1) <= 1 || logits.stride(1) == 1, "logits must be contiguous in the last dim, got stride ",
              logits.stride(1));
  TPO_REQUIRE(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1),
              "logits rows must not overlap (stride(0) >= V)");
  const auto dtype = logits.scalar_type();
  TPO_REQUIRE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "logits must be float32, float16 or bfloat16, got ", dtype);
  TPO_REQUIRE(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "targets must be int64 of shape (N,) = (", logits.size(0), ",)");
  TPO_REQUIRE(targets.is_contiguous(), "targets must be contiguous");
  TPO_REQUIRE(targets.device() == logits.device(), "targets must be on the device of logits");
  TPO_REQUIRE(logits.is_cpu() || logits.is_cuda(), "logits must be on CPU or CUDA, got ", logits.device());
#ifndef TPO_FAST_WITH_CUDA
  TPO_REQUIRE(!logits.is_cuda(),
              "tpo_fast._C was built without CUDA; use backend='triton' or 'torch' for CUDA tensors");
#endif
  return {};
}

std::string check_row_stat(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TPO_REQUIRE(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == logits.size(0) && t.is_contiguous(),
              name, " must be a contiguous float32 tensor of shape (N,) = (", logits.size(0), ",)");
  TPO_REQUIRE(t.device() == logits.device(), name, " must be on the device of logits");
  return {};
}

// Runs `body` (which returns its own error, "" for none); returns that, or the message of what it threw.
template <typename F>
std::string guarded(F&& body) {
  try {
    return body();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "tpo_fast._C: unknown C++ exception";
  }
}

// (lse, target_logit), both fp32 (N,), into `out`; rows whose target is ignore_index hold 0. Returns the error.
std::string logits_forward_impl(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                std::vector<at::Tensor>& out) {
  TPO_RETURN_IF_ERROR(check_common(logits, targets));
  auto opts = logits.options().dtype(at::kFloat);
  auto lse = at::empty({logits.size(0)}, opts);
  auto z = at::empty({logits.size(0)}, opts);
  if (logits.size(0) > 0) {
    if (logits.is_cuda()) {
#ifdef TPO_FAST_WITH_CUDA
      tpo_fast::logits_forward_cuda(logits, targets, ignore_index, lse, z);
#endif
    } else {
      tpo_fast::logits_forward_cpu(logits, targets, ignore_index, lse, z);
    }
  }
  out = {lse, z};
  return {};
}

// Gradient w.r.t. logits: coef_p * softmax + coef_y * onehot(targets), 0 on ignored rows, into `grad`; with
// inplace=True it is written into the logits buffer, which `grad` then is. Returns the error.
std::string logits_backward_impl(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                 const at::Tensor& coef_p, const at::Tensor& coef_y, int64_t ignore_index,
                                 bool inplace, at::Tensor& grad) {
  TPO_RETURN_IF_ERROR(check_common(logits, targets));
  TPO_RETURN_IF_ERROR(check_row_stat(lse, logits, "lse"));
  TPO_RETURN_IF_ERROR(check_row_stat(coef_p, logits, "coef_p"));
  TPO_RETURN_IF_ERROR(check_row_stat(coef_y, logits, "coef_y"));
  grad = inplace ? logits : at::empty(logits.sizes(), logits.options());
  if (logits.size(0) == 0) return {};
  if (logits.is_cuda()) {
#ifdef TPO_FAST_WITH_CUDA
    tpo_fast::logits_backward_cuda(logits, targets, lse, coef_p, coef_y, ignore_index, grad);
#endif
  } else {
    tpo_fast::logits_backward_cpu(logits, targets, lse, coef_p, coef_y, ignore_index, grad);
  }
  return {};
}

// (error, lse, target_logit): error "" and the two (N,) fp32 tensors, or the error and two None.
py::tuple try_logits_forward(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  std::vector<at::Tensor> out;
  std::string error = guarded([&] { return logits_forward_impl(logits, targets, ignore_index, out); });
  if (!error.empty()) return py::make_tuple(error, py::none(), py::none());
  return py::make_tuple(error, out[0], out[1]);
}

// (error, grad): error "" and the gradient, or the error and None.
py::tuple try_logits_backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                              const at::Tensor& coef_p, const at::Tensor& coef_y, int64_t ignore_index,
                              bool inplace) {
  at::Tensor grad;
  std::string error = guarded(
      [&] { return logits_backward_impl(logits, targets, lse, coef_p, coef_y, ignore_index, inplace, grad); });
  if (!error.empty()) return py::make_tuple(error, py::none());
  return py::make_tuple(error, grad);
}

// The error, or "" once the CPU code path is set.
std::string try_set_cpu_isa(const std::string& isa) {
  return guarded([&] { return tpo_fast::set_cpu_isa(isa); });
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
  m.def("try_set_cpu_isa", &try_set_cpu_isa,
        "force the CPU code path ('auto', 'base' or 'avx2'); returns the error or ''",
        py::arg("isa"));
}
