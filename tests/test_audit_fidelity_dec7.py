"""Fidelity audit of 2026-12-07: tpo_fast's TPO against the official code (github.com/alibaba/TPO,
trl/trainer/tpo_trainer.py and llava/train/scaling_train.py), each official formula written here again, in float64,
from its description (not copied):

- `_get_token_batch_logps` (chosen) and `_get_token_batch_logps_reciprocal` (rejected): labels shifted (position i
  scores token i + 1), the label -100 masked; s = raw logit of the label on the clean image minus the same on the
  corrupted image, same model, not detached; chosen weight sigmoid(s) + 0.5, rejected (1 - sigmoid(s)) + 0.5; the
  sequence score sum over unmasked tokens of log_softmax + log(weight); the reference the same from its own two
  branches, under no_grad;
- `dpo_loss`: -logsigmoid(beta l) ("sigmoid") or relu(1 - beta l) ("hinge"), l = (S_pi(w) - S_pi(l)) - (S_ref(w)
  - S_ref(l)); rewards beta (S_pi - S_ref) with the log-weight terms; its "logps/*" metrics are the weighted S;
- `add_diffusion_noise` + torchvision's ToTensor / ToPILImage: x0 = bytes / 255 (float32, channels first), the
  float32 sigmoid schedule, x = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, then `mul(255).byte()`.

Also: the argument checks of tpo_fast/trainer/corruption.py (a float or bool step, a NumPy seed, a non-image).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tpo_fast.loss import tpo_loss, tpo_loss_from_logprobs
from tpo_fast.trainer.corruption import add_diffusion_noise, diffusion_coefficients

B, L, D, V = 2, 7, 5, 11  # pairs, unshifted sequence length, hidden size, vocabulary


def _official_side(logits, noisy_logits, labels, chosen):
    """(sequence score with log weights, the same without them, the mean visual score) of one side, from unshifted
    (n, L, V) logits."""
    labels = labels[:, 1:].clone()
    logits, noisy_logits = logits[:, :-1], noisy_logits[:, :-1]
    keep = labels != -100
    labels[~keep] = 0
    idx = labels.unsqueeze(-1)
    s = logits.gather(2, idx).squeeze(-1) - noisy_logits.gather(2, idx).squeeze(-1)
    weight = torch.sigmoid(s) + 0.5 if chosen else (1 - torch.sigmoid(s)) + 0.5
    logp = logits.log_softmax(-1).gather(2, idx).squeeze(-1)
    mean_s = (s * keep).sum(-1) / (keep.sum(-1) + 1e-8)
    return ((logp + weight.log()) * keep).sum(-1), (logp * keep).sum(-1), mean_s


def _official_loss(w, b, h, h_noisy, ref_h, ref_h_noisy, labels, loss_type, beta=0.1):
    """The official TPO loss and its metrics from (2B, L, D) hidden states: logits are h @ w.T + b."""
    logits = lambda x: x @ w.T + b  # noqa: E731
    pc, pc_plain, sc = _official_side(logits(h[:B]), logits(h_noisy[:B]), labels[:B], True)
    pr, pr_plain, sr = _official_side(logits(h[B:]), logits(h_noisy[B:]), labels[B:], False)
    with torch.no_grad():
        rc = _official_side(logits(ref_h[:B]), logits(ref_h_noisy[:B]), labels[:B], True)[0]
        rr = _official_side(logits(ref_h[B:]), logits(ref_h_noisy[B:]), labels[B:], False)[0]
    margin = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(beta * margin) if loss_type == "sigmoid" else torch.relu(1 - beta * margin)
    chosen, rejected = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    metrics = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
               "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).double().mean(),
               "official logps/chosen": pc.detach().mean(), "official logps/rejected": pr.detach().mean(),
               "logps/chosen": pc_plain.detach().mean(), "logps/rejected": pr_plain.detach().mean(),
               "visual_score/chosen": sc.detach().mean(), "visual_score/rejected": sr.detach().mean()}
    return losses.mean(), metrics


def _inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, D, generator=g) * 2
    b = torch.randn(V, generator=g)
    h = torch.randn(2 * B, L, D, generator=g)
    h_noisy = h + 0.7 * torch.randn(2 * B, L, D, generator=g)
    ref_h = h + 0.3 * torch.randn(2 * B, L, D, generator=g)
    ref_h_noisy = ref_h + 0.7 * torch.randn(2 * B, L, D, generator=g)
    labels = torch.randint(0, V, (2 * B, L), generator=g)
    labels[:, :3] = -100  # prompt and image
    labels[1, 6] = -100
    labels[3, 5:] = -100  # padding
    return w, b, h, h_noisy, ref_h, ref_h_noisy, labels


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize(("backend", "grad_mode"), [("torch", "fused"), ("torch", "recompute"), ("reference", "auto")])
def test_tpo_loss_is_the_official_loss_and_gradient(loss_type, backend, grad_mode):
    """Same loss, same gradient on the lm_head, its bias, the clean and the corrupted hidden states (the official
    corrupted branch is not detached), same rewards; tpo_fast takes the already shifted rows and targets."""
    w, b, h, h_noisy, ref_h, ref_h_noisy, labels = _inputs()
    ours = [t.clone().requires_grad_() for t in (w, b, h, h_noisy)]
    theirs = [t.double().requires_grad_() for t in (w, b, h, h_noisy)]
    want, want_metrics = _official_loss(*theirs, ref_h.double(), ref_h_noisy.double(), labels, loss_type)
    want.backward()
    out = tpo_loss(ours[0], ours[2][:, :-1], ours[3][:, :-1], labels[:, 1:], ours[1], ref_hidden=ref_h[:, :-1],
                   ref_corrupted_hidden=ref_h_noisy[:, :-1], loss_type=loss_type, backend=backend, grad_mode=grad_mode)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    for name, mine, oracle in zip(("weight", "bias", "hidden", "corrupted_hidden"), ours, theirs, strict=True):
        torch.testing.assert_close(mine.grad.double(), oracle.grad, rtol=1e-5, atol=1e-7, msg=name)
    # positions 0 and 1 predict the prompt's labels 1 and 2: no gradient; position 2 predicts the first response token
    assert ours[2].grad[:, :2].abs().sum() == 0 and (ours[2].grad[:, 2].abs().sum(-1) > 0).all()
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected", "visual_score/chosen", "visual_score/rejected"):
        assert out.metrics[name].item() == pytest.approx(want_metrics[name].item(), rel=1e-6, abs=1e-6), name
    # the official logs logps/* with the log-weight terms (its S); tpo_fast without them (docs/loss.md)
    assert abs(out.metrics["logps/chosen"].item() - want_metrics["official logps/chosen"].item()) > 0.1


def test_one_pair_by_hand_weights_the_rejected_token_by_one_minus_sigmoid():
    """One token per response. Policy: chosen logp -1 with s = 0 (weight 1), rejected logp -2 with s = ln 3
    (sigmoid 3/4, weight 1 - 3/4 + 1/2 = 3/4). Reference: logps -1.5 and -2, s = 0 (weights 1). The margin is
    (-1 - (-2 + ln 3/4)) - (-1.5 + 2) = 1/2 - ln(3/4); loss -log sigmoid(beta margin), beta 0.1. Giving the rejected
    token the chosen formula (sigmoid + 1/2 = 5/4) would give margin 1/2 - ln(5/4) instead."""
    logp = torch.tensor([[-1.0], [-2.0]])
    s = torch.tensor([[0.0], [math.log(3.0)]])
    ref_logp = torch.tensor([[-1.5], [-2.0]])
    out = tpo_loss_from_logprobs(logp, s, torch.ones(2, 1, dtype=torch.bool), ref_logp, torch.zeros(2, 1))
    margin = 0.5 - math.log(0.75)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.1 * margin)), rel=1e-6)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(0.1 * math.log(0.75), rel=1e-6)


def _official_noise(pixels: np.ndarray, step: int, eps_hwc: torch.Tensor) -> np.ndarray:
    """The official pipeline in float32 with the given noise: ToTensor, the schedule, mul(255).byte(), ToPILImage."""
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)
    x0 = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)
    x = abar.sqrt()[step] * x0 + (1 - abar).sqrt()[step] * eps_hwc.permute(2, 0, 1)
    return x.mul(255).byte().permute(1, 2, 0).numpy()


def test_corrupted_pixels_are_the_official_pipeline_to_one_level():
    """Same noise in, the official float32 pipeline's pixels out, except where its float32 schedule (about one ulp
    from tpo_fast's float64 one) moves a value across an integer: one level, some 5 values in 100,000; and about
    38% of the values wrapped like `.byte()`."""
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    eps = torch.randn((256, 256, 3), generator=torch.Generator().manual_seed(5))
    want = _official_noise(pixels, 500, eps)
    got = np.asarray(add_diffusion_noise(Image.fromarray(pixels), 500, seed=5))
    diff = got.astype(np.int64) - want.astype(np.int64)
    assert set(np.unique(diff).tolist()) <= {-1, 0, 1} and (diff != 0).sum() <= 20
    a, b = diffusion_coefficients(500)
    exact = (a * pixels.astype(np.float64) / 255 + b * eps.double().numpy()) * 255
    assert 0.30 < ((exact < 0) | (exact >= 256)).mean() < 0.45  # the wrap is exercised


@pytest.mark.parametrize("step", [500.0, True, "500", None])
def test_a_step_that_is_not_an_int_is_refused_by_name(step):
    """Before: 500.0 crashed inside torch indexing (IndexError), True with 'only one element tensors'."""
    with pytest.raises(ValueError, match=r"^noise step must be an int in \[0, 999\], got "):
        diffusion_coefficients(step)
    with pytest.raises(ValueError, match=r"^noise step must be an int in \[0, 999\], got "):
        add_diffusion_noise(Image.new("RGB", (2, 2)), step, seed=0)


def test_a_numpy_seed_is_the_same_seed_and_bad_seeds_are_refused_by_name():
    """Before: np.int64(3) raised 'TypeError: an integer is required' from the generator, True and 2**64 deep
    RuntimeError / ValueError."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8))
    want = np.asarray(add_diffusion_noise(image, 300, seed=3))
    np.testing.assert_array_equal(np.asarray(add_diffusion_noise(image, 300, seed=np.int64(3))), want)
    np.testing.assert_array_equal(np.asarray(add_diffusion_noise(image, 300, seed=np.uint64(3))), want)
    for seed in (True, 1.5, "7", 2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match=r"^seed must be an int in \[-2\*\*63, 2\*\*64 - 1\], or None for fresh "):
            add_diffusion_noise(image, seed=seed)
    add_diffusion_noise(image, seed=2**64 - 1)  # the edges of the generator's range are seeds
    add_diffusion_noise(image, seed=-(2**63))


def test_an_image_that_is_not_a_pil_image_is_refused_by_name():
    want = r"^image must be a PIL\.Image\.Image \(e\.g\. Image\.open\(path\)\), got ndarray$"
    with pytest.raises(TypeError, match=want):
        add_diffusion_noise(np.zeros((2, 2, 3), dtype=np.uint8), seed=0)
