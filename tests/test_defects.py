"""Defects found by trying the package as a new user would (issue 18), one test each.

The loss-option defects (beta as a NumPy scalar, ref_seq_scores as a list, TPOLoss(backend=...)
checked at construction) are tested with the loss package.
"""

import json

import pytest
import torch

import tpo_fast
from tpo_fast.trainer.data import load_preference_records, read_records

N, D, V = 6, 8, 11


def _inputs(poison: float, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    corrupted = torch.randn(N, D, generator=g).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[1, 4]] = -100
    hidden[1] = poison
    corrupted[4] = poison
    hidden[4, 0] = poison
    weight = torch.randn(V, D, generator=g).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    return [t.requires_grad_() for t in (hidden, weight, bias, corrupted)], targets


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_ignored_rows_get_zero_gradient_whatever_they_hold(backend, poison):
    (hidden, weight, bias, corrupted), targets = _inputs(poison)
    stats = tpo_fast.token_stats(hidden, weight, targets, bias=bias, corrupted_hidden=corrupted, backend=backend)
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(N, generator=g)).sum()
               for t in (stats.logprobs, stats.target_logits, stats.lse, stats.corrupted_target_logits))
    loss.backward()
    for name, t in (("logprobs", stats.logprobs), ("target_logits", stats.target_logits), ("lse", stats.lse),
                    ("corrupted_target_logits", stats.corrupted_target_logits)):
        assert torch.isfinite(t).all(), f"{backend}: {name} is not finite: {t}"
        assert (t[[1, 4]] == 0).all(), f"{backend}: {name} of ignored rows: {t[[1, 4]]}"
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias), ("corrupted_hidden", corrupted)):
        assert torch.isfinite(t.grad).all(), f"{backend}: {name}.grad is not finite"
    assert (hidden.grad[[1, 4]] == 0).all() and (corrupted.grad[[1, 4]] == 0).all()


def test_reference_and_torch_agree_when_ignored_rows_are_poisoned():
    grads = {}
    for backend in ("reference", "torch"):
        (hidden, weight, bias, corrupted), targets = _inputs(float("nan"))
        stats = tpo_fast.token_stats(hidden, weight, targets, bias=bias, corrupted_hidden=corrupted, backend=backend)
        (stats.logprobs.sum() + stats.corrupted_target_logits.sum()).backward()
        grads[backend] = [t.grad for t in (hidden, weight, bias, corrupted)]
    for a, b in zip(grads["reference"], grads["torch"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_reference_target_logits_ignored_row_poison():
    (hidden, weight, bias, _), targets = _inputs(float("nan"))
    z = tpo_fast.target_logits(hidden, weight, targets, bias, backend="reference")
    z.sum().backward()
    assert torch.isfinite(z).all() and torch.isfinite(weight.grad).all() and torch.isfinite(bias.grad).all()


@pytest.mark.parametrize("fn", ["token_logprobs", "target_logits", "token_stats"])
def test_double_backward_names_the_reference_backend(fn):
    (hidden, weight, bias, corrupted), targets = _inputs(0.0)
    call = {
        "token_logprobs": lambda: tpo_fast.token_logprobs(hidden, weight, targets, bias, backend="torch"),
        "target_logits": lambda: tpo_fast.target_logits(hidden, weight, targets, bias, backend="torch"),
        "token_stats": lambda: tpo_fast.token_stats(
            hidden, weight, targets, bias=bias, corrupted_hidden=corrupted, backend="torch").corrupted_target_logits,
    }[fn]
    out = call()
    with pytest.raises(RuntimeError, match=r"create_graph=True.*backend='reference'"):
        torch.autograd.grad(out.sum(), hidden, create_graph=True)
    # first-order backward is unaffected
    (g,) = torch.autograd.grad(call().sum(), hidden)
    assert torch.isfinite(g).all()


def test_double_backward_works_on_the_reference_backend():
    (hidden, weight, bias, _), targets = _inputs(0.0)
    hidden = hidden.detach().double().float().requires_grad_()
    logp = tpo_fast.token_logprobs(hidden, weight, targets, bias, backend="reference")
    (g,) = torch.autograd.grad(logp.sum(), hidden, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), hidden)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0


def test_malformed_json_file_is_named(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('[{"image": "a.png", "question": "q", "chosen": "a", "rejected": "b"},\n  {"image": ')
    with pytest.raises(ValueError, match=r"pairs\.json: not valid JSON .*line 2"):
        read_records(path)
    with pytest.raises(ValueError, match=r"pairs\.json"):
        load_preference_records(path)


@pytest.mark.parametrize("field", ["chosen", "rejected", "question"])
def test_non_string_response_is_a_wrong_type_not_missing(tmp_path, field):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"image": "a.png", "question": "q", "chosen": "yes", "rejected": "no"}
    bad = dict(good, **{field: 3})
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([good, bad]))
    records, rejected = load_preference_records(path, tmp_path)
    assert len(records) == 1 and [b.index for b in rejected] == [1]
    reason = rejected[0].reason
    assert "missing" not in reason and "must be a string" in reason and "got int" in reason, reason
    missing = {k: v for k, v in good.items() if k != field}
    path.write_text(json.dumps([good, missing]))
    _, rejected = load_preference_records(path, tmp_path)
    assert "missing" in rejected[0].reason, rejected[0].reason


def test_config_picks_the_cpu_and_keeps_bf16_there(tmp_path):
    from tpo_fast.trainer.config import TPOConfig, has_accelerator

    if has_accelerator():
        pytest.skip("this machine has an accelerator")
    args = TPOConfig(output_dir=str(tmp_path), bf16=True, report_to="none")
    assert args.use_cpu and args.bf16 and args.device.type == "cpu"


def test_config_drops_bf16_on_a_gpu_without_it(tmp_path, monkeypatch, caplog):
    import transformers.utils

    from tpo_fast.trainer import config

    monkeypatch.setattr(config, "has_accelerator", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with caplog.at_level("WARNING", logger="tpo_fast"):
        args = config.TPOConfig(output_dir=str(tmp_path), bf16=True, report_to="none")
    assert not args.bf16 and "does not support bf16" in caplog.text


def test_reference_of_a_zero3_partitioned_policy_is_loaded_again(tmp_path):
    from tpo_fast.trainer.tiny import save_tiny_llava
    from tpo_fast.trainer.trainer import copy_of_policy, load_llava

    folder = save_tiny_llava(tmp_path / "llava")
    model = load_llava(str(folder))
    for p in model.parameters():
        p.ds_id = 0  # what deepspeed.zero.Init leaves on every partitioned parameter
    ref = copy_of_policy(model)
    assert ref is not model and not any(hasattr(p, "ds_id") for p in ref.parameters())
    torch.testing.assert_close(dict(ref.named_parameters())["lm_head.weight"], model.lm_head.weight)
    model.name_or_path = model.config._name_or_path = ""
    with pytest.raises(ValueError, match="ZeRO-3.*ref_model"):
        copy_of_policy(model)
