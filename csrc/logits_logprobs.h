// Per-row log-softmax statistics straight from materialized logits: the C++/CUDA side of
// tpo_fast.logits_logprobs. Python validates and allocates; these functions only run kernels.
//
// logits  (N, V) fp32/fp16/bf16, last dim contiguous, any row stride
// targets (N,) int64; rows equal to ignore_index give 0 and cost no vocabulary work
// lse, target_logit (N,) fp32 outputs
// backward: grad[i, v] = coef_p[i] * softmax(logits[i])[v] + coef_y[i] * (v == targets[i]),
//   accumulated in fp32 and rounded once to the logits dtype; grad may alias logits (in place).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace tpo_fast {

// The CPU code path in use: "avx2" (x86-64 with AVX2 and FMA) or "base" (portable 4-lane vectors).
// set_cpu_isa("base") forces the portable path (tests cover both); "auto" restores detection.
std::string cpu_isa();
// Returns the error ("" once set): an unknown name, or "avx2" where this CPU or build has no AVX2+FMA path.
std::string set_cpu_isa(const std::string& isa);

void logits_forward_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                        const at::Tensor& lse, const at::Tensor& target_logit);

void logits_backward_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                         const at::Tensor& coef_p, const at::Tensor& coef_y, int64_t ignore_index,
                         const at::Tensor& grad);

#ifdef TPO_FAST_WITH_CUDA
void logits_forward_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                         const at::Tensor& lse, const at::Tensor& target_logit);

void logits_backward_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                          const at::Tensor& coef_p, const at::Tensor& coef_y, int64_t ignore_index,
                          const at::Tensor& grad);
#endif

}  // namespace tpo_fast
