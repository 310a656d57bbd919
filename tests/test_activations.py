"""trainer/activations.py: `LeanRMSNorm` against Hugging Face's own RMSNorm modules (the same forward bit for bit,
the same gradients, less kept for backward on a 16-bit model), `shared_lora_inputs` against peft's own LoRA
layers, and the trainer's `lean_activations` switch."""

import contextlib
import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from tiny_setup import tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer.activations import LEAN_NORM_CLASSES, LeanRMSNorm, shared_lora_inputs, use_lean_norms  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _norm_class(name: str):
    family = name.removesuffix("RMSNorm").lower()
    try:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ImportError:
        pytest.skip(f"this transformers has no {family} model")
    return getattr(module, name)


def _pair(name: str, dtype: torch.dtype, weight_dtype: torch.dtype, d: int = 96):
    """(Hugging Face's module, the same module switched to LeanRMSNorm), equal weights."""
    torch.manual_seed(0)
    hf = _norm_class(name)(d, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(d) * 0.5 + 1)
    hf = hf.to(weight_dtype)
    lean = _norm_class(name)(d, eps=1e-5).to(weight_dtype)
    lean.load_state_dict(hf.state_dict())
    assert use_lean_norms(lean) == 1
    return hf, lean


@pytest.mark.parametrize("name", LEAN_NORM_CLASSES)
@pytest.mark.parametrize(("dtype", "weight_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                     (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
                         ids=["fp32", "bf16", "bf16-fp32-weight", "fp16"])
def test_lean_norm_is_the_models_norm(name, dtype, weight_dtype):
    """Forward bit for bit (the same operators); gradients of x and weight equal to autograd's through the
    module's own forward: fp32 to 1e-6, 16-bit to one rounding of the result's dtype (x's gradient is the same
    fp32 formula summed in another order before its cast)."""
    hf, lean = _pair(name, dtype, weight_dtype)
    x = (torch.randn(3, 7, 96) * 3).to(dtype)
    x[0, 0] = 0.0  # an all-zero token: rsqrt(eps)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = hf(xa), lean(xb)
    assert ya.dtype == yb.dtype and torch.equal(ya, yb)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    if dtype == torch.float32:
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lean.weight.grad, hf.weight.grad, rtol=1e-6, atol=1e-6)
    else:
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        err = (xb.grad.double() - xa.grad.double()).abs() / xa.grad.double().abs().clamp(min=1e-2)
        assert err.max() <= ulp, err.max()
        assert torch.equal(lean.weight.grad, hf.weight.grad)  # the same product and sum


def test_lean_norm_gradients_with_one_input_frozen():
    """LoRA freezes the norm's weight while x needs its gradient; a frozen trunk input with a trained weight is the
    other case. Each gets its own gradient, equal to autograd's through the module, and the other none."""
    hf, lean = _pair("LlamaRMSNorm", torch.bfloat16, torch.bfloat16)
    x = (torch.randn(3, 7, 96) * 3).to(torch.bfloat16)
    for x_grad, weight_grad in ((True, False), (False, True)):
        for m in (hf, lean):
            m.weight.grad = None
            m.weight.requires_grad_(weight_grad)
        xa, xb = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)
        ya, yb = hf(xa), lean(xb)
        grad = torch.randn_like(ya)
        ya.backward(grad)
        yb.backward(grad)
        if x_grad:
            assert lean.weight.grad is None and xb.grad is not None
            ulp = 2.0**-7
            err = (xb.grad.double() - xa.grad.double()).abs() / xa.grad.double().abs().clamp(min=1e-2)
            assert err.max() <= ulp, err.max()
        else:
            assert xb.grad is None and torch.equal(lean.weight.grad, hf.weight.grad)


def test_only_the_listed_norm_classes_are_switched():
    """A norm of another formula is left alone even where it has the same `variance_epsilon` field (Gemma's
    RMSNorm scales by 1 + weight), and so is every other module; switching twice changes nothing."""
    class GemmaRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * (1 + self.weight)

    gemma = GemmaRMSNorm()
    model = torch.nn.Sequential(gemma, torch.nn.Linear(4, 4), _norm_class("LlamaRMSNorm")(4))
    assert use_lean_norms(model) == 1 and use_lean_norms(model) == 0
    assert type(gemma).forward is GemmaRMSNorm.forward and "forward" not in vars(gemma)


def test_lean_norm_keeps_the_16_bit_input_not_an_fp32_copy():
    """What autograd keeps for backward of a bf16 norm: Hugging Face's forward keeps an fp32 copy of x (twice x's
    bytes); the lean one keeps x itself and one fp32 number per token."""
    hf, lean = _pair("LlamaRMSNorm", torch.bfloat16, torch.bfloat16)
    hf.weight.requires_grad_(False)
    lean.weight.requires_grad_(False)  # LoRA: a frozen norm, x still needs its gradient
    x = torch.randn(4, 50, 96, dtype=torch.bfloat16, requires_grad=True)

    def kept_bytes(module) -> tuple[int, list]:
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            module(x)
        new = {t.untyped_storage().data_ptr(): t for t in kept
               if t.untyped_storage().data_ptr() not in (x.untyped_storage().data_ptr(),
                                                         module.weight.untyped_storage().data_ptr())}
        return sum(t.untyped_storage().nbytes() for t in new.values()), kept

    hf_bytes, _ = kept_bytes(hf)
    lean_bytes, lean_kept = kept_bytes(lean)
    assert hf_bytes >= 4 * x.numel()  # the fp32 copy
    assert lean_bytes == 4 * 4 * 50  # the per-token rsqrt only
    assert any(t is x for t in lean_kept)


def test_lean_norm_without_gradient_keeps_nothing_and_computes_the_same():
    hf, lean = _pair("Qwen2RMSNorm", torch.bfloat16, torch.bfloat16)
    x = torch.randn(2, 5, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(hf(x), lean(x))
    assert LeanRMSNorm.apply(x, lean.weight.detach(), 1e-5).grad_fn is None


def test_trainer_switches_the_policys_norms_and_trains_the_same(tmp_path):
    """TPOTrainer(lean_activations=True, the default) switches every RMSNorm of the policy (2 per decoder layer and the
    final one), once; lean_activations=False leaves them. One step's loss and gradients are the same either way (fp32
    model: the same forward, gradients to fp32 rounding)."""
    from tpo_fast.trainer.config import TPOConfig
    from tpo_fast.trainer.trainer import TPOTrainer

    proc = tiny_processor()
    data = tiny_data(str(tmp_path / "data"), num_images=4)
    results = {}
    for lean in (True, False):
        args = TPOConfig(output_dir=str(tmp_path / f"out{lean}"), per_device_train_batch_size=2, report_to="none",
                         use_cpu=True, save_strategy="no", disable_tqdm=True, lean_activations=lean, reference="none",
                         loss_backend="torch")
        trainer = TPOTrainer(tiny_model(proc), args=args, train_dataset=data, processing_class=proc)
        lm = trainer.model.model.language_model
        switched = [m for m in lm.modules() if getattr(m.forward, "__func__", None) is not None
                    and m.forward.__func__.__module__ == "tpo_fast.trainer.activations"]
        norms = [m for m in lm.modules() if type(m).__name__ in LEAN_NORM_CLASSES]
        assert len(norms) == 2 * lm.config.num_hidden_layers + 1
        assert len(switched) == (len(norms) if lean else 0)
        assert use_lean_norms(trainer.model) == (0 if lean else len(norms))  # a second switch changes nothing
        if not lean:  # undo the switch just made, to train with the model's own norms
            for m in norms:
                del m.forward
        batch = trainer._prepare_inputs(trainer.data_collator([data[i] for i in range(2)]))
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results[lean] = (loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                         if p.grad is not None})
    (loss_a, grads_a), (loss_b, grads_b) = results[True], results[False]
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    assert grads_a.keys() == grads_b.keys() and any("norm" in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_lean_activations_option_is_checked():
    from tpo_fast.trainer.config import TPOConfig

    with pytest.raises(ValueError, match="lean_activations must be True or False"):
        TPOConfig(output_dir="x", lean_activations="yes", use_cpu=True)


class _TwoLoRA(torch.nn.Module):
    """q and k read one input, as a decoder layer's q_proj, k_proj and v_proj do."""

    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False)

    def forward(self, x):
        return self.q(x) + self.k(x)  # an add keeps nothing for backward


def _lora_pair():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_TwoLoRA().to(torch.bfloat16), LoraConfig(r=8, target_modules=["q", "k"],
                                                                    init_lora_weights=False))
    assert {p.dtype for n, p in model.named_parameters() if "lora" in n} == {torch.float32}  # peft's fp32 adapters
    return model


def _run(model, x, shared: bool):
    """(output, x's gradient, adapter gradients, the x-shaped tensors autograd kept besides x) of one step
    under CPU bf16 autocast."""
    kept = []
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            with shared_lora_inputs(model, "cpu") if shared else contextlib.nullcontext() as n:
                y = model(x)
    y.float().square().sum().backward()
    copies = {t.untyped_storage().data_ptr() for t in kept
              if t.shape == x.shape and t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return y.detach(), x.grad, grads, len(copies), n


def test_shared_lora_inputs_keep_the_input_once_with_the_same_numbers():
    """Under bf16 autocast, peft's LoRA layers with fp32 adapters keep a bf16 copy of their input each (q and k:
    two copies of one input); inside `shared_lora_inputs` they keep the input itself, and the output and every
    gradient are the same bit for bit. Leaving the context restores peft's cast."""
    model = _lora_pair()
    x = torch.randn(30, 64).bfloat16()
    y0, gx0, g0, copies0, _ = _run(model, x, shared=False)
    y1, gx1, g1, copies1, switched = _run(model, x, shared=True)
    assert (copies0, copies1, switched) == (2, 0, 2)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert g0.keys() == g1.keys() and len(g0) == 4 and all(torch.equal(g0[k], g1[k]) for k in g0)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)]
    assert len(layers) == 2 and all(getattr(m, "cast_input_dtype_enabled", True) for m in layers)


def test_shared_lora_inputs_without_autocast_changes_nothing():
    """No autocast: an fp32 adapter on a bf16 input needs peft's cast, so the context leaves it on (and the
    forward still runs)."""
    model = _lora_pair()
    x = torch.randn(5, 64).bfloat16()
    with shared_lora_inputs(model, "cpu") as switched:
        assert switched == 0
        y = model(x)
    assert y.dtype == torch.bfloat16
