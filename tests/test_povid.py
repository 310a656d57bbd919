"""POVID stage 2 (tpo_fast.methods.povid) against the full-logits reference in methods_reference.py."""

from __future__ import annotations

import copy

import pytest
import torch
from _device import backend_device, moved
from methods_reference import povid_loss_reference, povid_scores, povid_scores_from_logits

from tpo_fast.loss import dpo_loss
from tpo_fast.methods.povid import (
    POVIDLoss,
    povid_loss,
    povid_model_reference_scores,
    povid_reference_scores,
    povid_step,
)

B, T, D, V = 2, 7, 24, 101


def make(bias: bool, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, D, generator=g).to(dtype).requires_grad_()
    hc = (h.detach()[:B] + 0.7 * torch.randn(B, T, D, generator=g)).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, :2] = -100  # prompt
    y[0, -1] = -100  # padding of one chosen row
    y[B + 1, 3:] = -100  # a short hallucinated row
    rh = (h.detach() + 0.1 * torch.randn(2 * B, T, D, generator=g)).to(dtype)
    rhc = (hc.detach() + 0.1 * torch.randn(B, T, D, generator=g)).to(dtype)
    rw = (w.detach() + 0.05 * torch.randn(V, D, generator=g)).to(dtype)
    return h, hc, w, b, y, rh, rhc, rw


def grads(*tensors):
    return [None if t is None else t.grad for t in tensors]


CASES = {
    "sigmoid": dict(),
    "hinge": dict(loss_type="hinge"),
    "smoothing-avg": dict(label_smoothing=0.2, average_log_prob=True),
    "ipo-w0.3": dict(loss_type="ipo", noise_weight=0.3),
}


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_povid_loss_matches_reference(backend, bias, case):
    opts = CASES[case]
    h, hc, w, b, y, rh, rhc, rw = moved(backend_device(backend), *make(bias))
    rb = None if b is None else b.detach() + 0.01
    out = povid_loss(w, h, hc, y, b, ref_hidden=rh, ref_corrupted_hidden=rhc, ref_weight=rw, ref_bias=rb,
                     backend=backend, **opts)
    g_out = torch.randn(())
    (out.loss * g_out).backward()
    got = grads(h, w, b)
    assert hc.grad is None, "the corrupted branch only feeds the argmax: no gradient"

    h2, hc2, w2, b2 = (None if t is None else t.detach().clone().requires_grad_() for t in (h, hc, w, b))
    ref_opts = {k: v for k, v in opts.items()}
    ref_loss, ref_metrics = povid_loss_reference(h2, hc2, y, w2, b2, rh, rhc, rw, rb, **ref_opts)
    (ref_loss * g_out).backward()
    want = grads(h2, w2, b2)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, a, e in zip(("hidden", "weight", "bias"), got, want, strict=True):
        if e is None:
            assert a is None
            continue
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad of {n}: {m}")
    for key in ("rewards/chosen", "rewards/rejected", "logps/noisy"):
        torch.testing.assert_close(out.metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6)


def test_gradient_reaches_noisy_term_through_lse_and_gather():
    # With noise_weight=1 the loss depends only on S_w and S_n; S_n's gradient must flow both through
    # the gathered argmax logit and through the shared lse (a missing path changes the weight grad).
    h, hc, w, b, y, rh, rhc, rw = make(True, seed=3)
    out = povid_loss(w, h, hc, y, b, ref_hidden=rh, ref_corrupted_hidden=rhc, noise_weight=1.0, backend="torch")
    out.loss.backward()
    w2 = w.detach().clone().requires_grad_()
    ref, _ = povid_loss_reference(h.detach(), hc.detach(), y, w2, b.detach(), rh, rhc, w.detach(), b.detach(),
                                  noise_weight=1.0)
    ref.backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-6)


def test_reference_forms_agree_and_get_no_gradient():
    h, hc, w, b, y, rh, rhc, rw = make(True, seed=1)
    rw.requires_grad_()
    a = povid_loss(w, h, hc, y, b, ref_hidden=rh, ref_corrupted_hidden=rhc, ref_weight=rw, backend="torch")
    cached = povid_reference_scores(rw, rh, rhc, y, b, backend="torch")
    assert cached.shape == (3 * B,) and not cached.requires_grad
    c = povid_loss(w, h, hc, y, b, ref_seq_scores=cached, backend="torch")
    torch.testing.assert_close(a.loss, c.loss)
    a.loss.backward()
    assert rw.grad is None
    s_w, s_l, s_n = povid_scores(rh, rhc, y, rw.detach(), b.detach())
    torch.testing.assert_close(cached, torch.cat([s_w, s_l, s_n]), rtol=1e-5, atol=1e-5)


def test_noise_weight_zero_is_dpo():
    h, hc, w, b, y, rh, rhc, rw = make(False, seed=2)
    p = povid_loss(w, h, hc, y, ref_hidden=rh, ref_corrupted_hidden=rhc, ref_weight=rw, noise_weight=0.0,
                   backend="torch")
    d = dpo_loss(w, h, y, ref_hidden=rh, ref_weight=rw, backend="torch")
    torch.testing.assert_close(p.loss, d.loss)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        torch.testing.assert_close(p.metrics[key], d.metrics[key])


def test_argmax_match_metric_and_module():
    # Corrupted hidden equal to the clean hidden of the chosen rows, targets set to that argmax:
    # every noisy token is the chosen token, S_n == S_w and the match rate is 1.
    h, _, w, b, y, rh, rhc, rw = make(False, seed=4)
    hc = h.detach()[:B].clone()
    with torch.no_grad():
        top = (h[:B] @ w.t()).argmax(-1)
    y[:B] = torch.where(y[:B] != -100, top, y[:B])
    loss = POVIDLoss(beta=0.2, backend="torch")
    out = loss(w, h, hc, y, ref_hidden=rh, ref_corrupted_hidden=rhc)
    assert out.metrics["noisy/argmax_match"] == 1.0
    torch.testing.assert_close(out.metrics["logps/noisy"], out.metrics["logps/chosen"])
    assert "beta=0.2" in repr(loss)


def test_errors_say_what_to_fix():
    h, hc, w, b, y, rh, rhc, rw = make(False)
    with pytest.raises(ValueError, match="B chosen rows only"):
        povid_loss(w, h, h, y, ref_hidden=rh, ref_corrupted_hidden=rhc)
    with pytest.raises(ValueError, match="noise_weight must lie in"):
        povid_loss(w, h, hc, y, reference_free=True, noise_weight=1.5)
    with pytest.raises(ValueError, match="exactly one reference"):
        povid_loss(w, h, hc, y)
    with pytest.raises(ValueError, match="exactly one reference"):
        povid_loss(w, h, hc, y, ref_hidden=rh, ref_corrupted_hidden=rhc, ref_seq_scores=torch.zeros(3 * B))
    with pytest.raises(ValueError, match=r"\(3B,\)"):
        povid_loss(w, h, hc, y, ref_seq_scores=torch.zeros(2 * B))
    with pytest.raises(ValueError, match="needs ref_corrupted_hidden"):
        povid_loss(w, h, hc, y, ref_hidden=rh)
    with pytest.raises(ValueError, match="2-D"):
        povid_loss(w, h, hc, y[0], reference_free=True)
    with pytest.raises(ValueError, match="beta"):
        povid_loss(w, h, hc, y, reference_free=True, beta=0)


@pytest.fixture(scope="module")
def tiny_batch(tmp_path_factory):
    from PIL import Image

    from tpo_fast.trainer.collator import TPOCollator
    from tpo_fast.trainer.data import PreferenceDataset
    from tpo_fast.trainer.tiny import build_tiny_llava, build_tiny_processor, words_of

    folder = tmp_path_factory.mktemp("povid")
    records = [
        {"image": "a.png", "prompt": "describe the image .", "chosen": "a red dog on the mat .",
         "rejected": "a cat on the red mat .", "index": 0},
        {"image": "b.png", "prompt": "what is there ?", "chosen": "a cat .", "rejected": "a dog and a cat on a mat .",
         "index": 1},
    ]
    g = torch.Generator().manual_seed(0)
    for name in ("a.png", "b.png"):
        pixels = (torch.rand(30, 36, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / name)
    text = [r[k] for r in records for k in ("prompt", "chosen", "rejected")]
    processor = build_tiny_processor(words_of(text))
    dataset = PreferenceDataset(records, folder)
    batch = TPOCollator(processor)([dataset[0], dataset[1]])
    model = build_tiny_llava(len(processor.tokenizer), seed=1)
    return model, batch


STEP_CASES = {  # povid_step's keywords, and where its reference comes from
    "defaults": dict(),
    "hinge-average": dict(loss_type="hinge", average_log_prob=True, beta=0.3, noise_weight=0.2),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "smoothing-precomputed": dict(label_smoothing=0.2, reference="precomputed"),
    "ignore-index": dict(ignore_index=-7, average_log_prob=True),
    "reference-free": dict(reference="none"),
    "adapter": dict(reference="adapter"),
}


@pytest.mark.parametrize("case", list(STEP_CASES), ids=list(STEP_CASES))
def test_povid_step_on_tiny_llava_matches_full_logits(tiny_batch, case):
    """`povid_step`'s loss, metrics and gradients against full logits (methods_reference.py), each keyword and
    each kind of reference reaching the loss."""
    from methods_reference import dpo_losses

    model, batch = tiny_batch
    opts = dict(STEP_CASES[case])
    reference = opts.pop("reference", "model")
    ignore = opts.get("ignore_index", -100)
    if ignore != -100:
        batch = {**batch, "labels": batch["labels"].masked_fill(batch["labels"] == -100, ignore)}
    ref_model = copy.deepcopy(model)
    policy = copy.deepcopy(model)
    if reference == "adapter":
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    else:
        with torch.no_grad():  # make the policy differ from the reference
            for p in policy.parameters():
                p.add_(0.02 * torch.randn_like(p))

    def full_scores(m):
        n = batch["image_index"].shape[0]
        idx = batch["image_index"]
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"][idx.repeat(2)]).logits[:, :-1]
        corrupted = m(input_ids=batch["input_ids"][:n], attention_mask=batch["attention_mask"][:n],
                      pixel_values=batch["corrupted_pixel_values"][idx]).logits[:, :-1]
        return povid_scores_from_logits(logits, corrupted, batch["labels"][:, 1:],
                                        opts.get("average_log_prob", False), ignore)

    with torch.no_grad():
        refs = full_scores(ref_model) if reference != "none" else (torch.zeros(2),) * 3
    if reference == "model":  # the reference's scores alone, with the case's keywords (and the defaults' backend)
        keys = {k: opts[k] for k in ("average_log_prob", "ignore_index") if k in opts}
        torch.testing.assert_close(povid_model_reference_scores(ref_model, batch, **keys), torch.cat(refs),
                                   rtol=1e-5, atol=1e-5)
    given = {"model": dict(ref_model=ref_model), "precomputed": dict(ref_seq_scores=torch.cat(refs)),
             "none": dict(reference_free=True), "adapter": {}}[reference]
    out = povid_step(policy, batch, **given, **opts)  # the default backend (auto: torch on the CPU)
    if reference != "adapter":
        out.loss.backward()
    twin = copy.deepcopy(policy)  # the oracle's copy: same weights, its own gradients
    for p in twin.parameters():
        p.grad = None
    s_w, s_l, s_n = full_scores(twin)
    r_w, r_l, r_n = refs
    beta, w = opts.get("beta", 0.1), opts.get("noise_weight", 0.5)
    kind = (opts.get("loss_type", "sigmoid"), opts.get("label_smoothing", 0.0))
    noisy, _, _ = dpo_losses(s_w, s_n, r_w, r_n, beta, *kind)
    halluc, chosen, rejected = dpo_losses(s_w, s_l, r_w, r_l, beta, *kind)
    ref_loss = (w * noisy + (1 - w) * halluc).mean()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    for key, want in (("rewards/chosen", chosen.mean()), ("rewards/rejected", rejected.mean()),
                      ("logps/noisy", s_n.mean())):
        torch.testing.assert_close(torch.as_tensor(out.metrics[key]).float(), want.detach(), rtol=1e-5, atol=1e-6,
                                   msg=key)
    if reference == "adapter":
        return
    ref_loss.backward()
    named = dict(twin.named_parameters())
    for name, p in policy.named_parameters():
        if p.grad is None:
            assert named[name].grad is None or named[name].grad.abs().max() == 0, name
            continue
        torch.testing.assert_close(p.grad, named[name].grad, rtol=1e-3, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert all(p.grad is None for p in ref_model.parameters())


def test_povid_step_needs_a_reference(tiny_batch):
    model, batch = tiny_batch
    with pytest.raises(ValueError, match=r"^no reference: pass ref_model \(a frozen copy of the starting model\), "
                                         r"ref_seq_scores, a PEFT model \(its adapters are disabled for the "
                                         r"reference\), or reference_free=True$"):
        povid_step(model, batch)
    with pytest.raises(ValueError, match="^pass ref_model or ref_seq_scores, not both$"):
        povid_step(model, batch, ref_model=model, ref_seq_scores=torch.zeros(6))
    for reference in (dict(ref_model=model), dict(reference_free=True)):  # the backend reaches the primitive
        with pytest.raises(ValueError, match="^backend must be one of .*, got 'abacus'$"):
            povid_step(model, batch, backend="abacus", **reference)
    with pytest.raises(ValueError, match="^backend must be one of .*, got 'abacus'$"):
        povid_model_reference_scores(model, batch, backend="abacus")
    with pytest.raises(KeyError, match="corrupted_pixel_values"):
        povid_step(model, {k: v for k, v in batch.items() if k != "corrupted_pixel_values"}, reference_free=True)
    # a reference passed with reference_free=True was silently ignored
    with pytest.raises(ValueError, match="^reference_free=True uses no reference: drop ref_model / ref_seq_scores, "
                                         "or reference_free$"):
        povid_step(model, batch, ref_model=model, reference_free=True)
    with pytest.raises(ValueError, match="reference_free=True uses no reference"):
        povid_step(model, batch, ref_seq_scores=torch.zeros(3 * batch["input_ids"].shape[0] // 2), reference_free=True)
