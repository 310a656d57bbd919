"""Fewer activation copies kept for backward (`TPOConfig.lean_activations`), each with the same forward bit for bit.

Two places where a Hugging Face LoRA step keeps a copy of a tensor that backward could get without one:

- **RMSNorm.** The Llama-family norm (`LlamaRMSNorm`, `MistralRMSNorm`, `Qwen2RMSNorm`, `Qwen3RMSNorm`: the
  language models of LLaVA-1.5, LLaVA-NeXT-Mistral and LLaVA-OneVision) computes

      y = weight * (x32 * rsqrt(mean(x32**2) + eps)).to(x.dtype),    x32 = x.to(float32)

  and autograd keeps x32: on a bf16 model two bf16-sized tensors per norm and token, two norms per decoder
  layer. `LeanRMSNorm` runs the same operators and keeps x itself (which nothing else keeps: the residual
  stream's adds save nothing) and the per-token rsqrt; backward rebuilds x32 from x. Its gradients are the same
  formula in fp32, `dx = rstd * (g - xhat * mean(g * xhat))` with `g = dy * weight` (rounded to x's dtype, as
  autograd's cast does) and `xhat = x32 * rstd`, summed in another order than autograd's chain (equal to within
  fp32 rounding before the cast to x's dtype). On an fp32 model x32 is x and nothing changes.
- **LoRA inputs under mixed precision.** peft casts a LoRA layer's input to its adapter's dtype (fp32 on a
  bf16 model) and autocast casts it back to bf16 for the matmul: every adapter then keeps its own bf16 copy of
  its input for the weight gradient, where q, k and v (and gate and up) share one input. Under autocast the
  matmul runs in bf16 either way, so peft's cast is switched off during the step's trunk forward
  (`shared_lora_inputs`, the flag of peft's `disable_input_dtype_casting`): the adapters keep the input itself,
  shared, and the values are the same.

With LoRA on every linear layer, at LLaVA-1.5-7B's proportions, a decoder layer keeps about 24 hidden-sized
16-bit tensors per token (MLP-sized ones counted as 2.7); these remove 2 (norms) and 3 (LoRA copies), counted
on a bf16 step at hidden size 512 (README, "Changed since the second H200 run").
"""

from __future__ import annotations

import contextlib
import types

import torch

from tpo_fast.trainer.adapters import layer_flags

# Norm classes whose forward is the formula above (checked per transformers version by tests/test_activations.py).
LEAN_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class LeanRMSNorm(torch.autograd.Function):
    """`y = weight * (x32 * rsqrt(mean(x32**2, -1) + eps)).to(x.dtype)`, keeping x and the rsqrt for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(torch.float32) * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            # autograd's: the product in the result's dtype, summed down to the weight's shape
            grad_weight = (grad_y * xhat.to(x.dtype)).sum_to_size(weight.shape)
        if ctx.needs_input_grad[0]:
            # the normalized input's gradient in its dtype, as autograd casts it through `.to(x.dtype)`
            g = (grad_y * weight).to(x.dtype).to(torch.float32)
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


def _lean_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return LeanRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


@contextlib.contextmanager
def shared_lora_inputs(module: torch.nn.Module, device_type: str):
    """Within: peft's cast of each adapter layer's input to its adapter's dtype is off (the flag of peft's
    `disable_input_dtype_casting`), when autocast to a 16-bit dtype is on for `device_type` (mixed precision),
    where the adapter's matmul is cast to that dtype anyway. The adapters then keep their layer's input itself
    for backward, one tensor shared by the layers that read it, instead of a copy each; the forward's values are
    the same. Yields how many adapter layers it switched: 0 without autocast, without peft, or on peft versions
    without the switch, where nothing changes. Restored on exit, so inference after training (often without
    autocast, where an fp32 adapter needs the cast) sees peft's own behaviour."""
    autocast16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in (
        torch.bfloat16, torch.float16)
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        autocast16 = False
    # The flag peft's own `disable_input_dtype_casting` switches (peft 0.15 on), on every tuner layer, each
    # layer's value restored; one walk over the modules where peft's helper takes two named walks (about 7 ms of
    # host time a step at LLaVA-1.5-7B's 3000 modules, while the device waits for the policy's first kernels).
    layers = [sub for sub in module.modules()
              if isinstance(sub, BaseTunerLayer) and hasattr(sub, "cast_input_dtype_enabled")] if autocast16 else []
    with layer_flags(layers, "cast_input_dtype_enabled", False):
        yield len(layers)


def use_lean_norms(module: torch.nn.Module) -> int:
    """Switch every RMSNorm of `module` whose class is in `LEAN_NORM_CLASSES` to `LeanRMSNorm` (its instance's
    forward; the module, its parameters and hooks stay, so ZeRO-3 and FSDP2 still gather the weight first).
    Returns how many were switched; switching twice changes nothing."""
    switched = 0
    for sub in module.modules():
        if type(sub).__name__ in LEAN_NORM_CLASSES and hasattr(sub, "variance_epsilon"):
            if getattr(sub.forward, "__func__", None) is not _lean_forward:
                sub.forward = types.MethodType(_lean_forward, sub)
                switched += 1
    return switched
