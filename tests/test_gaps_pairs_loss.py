"""`tpo_fast.loss.pairs`, `tpo_fast.loss._checks` and `tpo_fast.loss.dpo` edges that mutation testing found
unguarded (docs/testing.md): every input error with its whole message, raised through the public functions of
`tpo_fast.loss`; fp32 results on the inputs' device whatever torch's default dtype and device are.

Expected messages are written out literally; expected values come from tests/loss_reference.py, which shares
no code with tpo_fast.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from loss_reference import weighted_scores

from tpo_fast.loss import (
    check_loss_options,
    dpo_loss,
    log_token_weights,
    preference_loss_from_sequence_scores,
    sequence_scores,
    tpo_loss_from_logprobs,
)

EVEN = "must hold an even, non-zero number of sequences 2B (B chosen, then B rejected), got"
REAL = "must be a real number (int, float, NumPy scalar or 0-d tensor), got"
HINT = "; targets must be shifted so that hidden row t predicts targets[:, t]"


def _inputs(seed=0):
    """(2B, T) = (4, 3) fp32 logprobs and visual scores; 3, 1, 2, 0 response tokens."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(4, 3, generator=g, dtype=torch.float32) * 3
    s = torch.randn(4, 3, generator=g, dtype=torch.float32) * 4
    mask = torch.tensor([[1, 1, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    return lp, s, mask


LP, S, M = _inputs()
POL = torch.tensor([-1.0, -2.0, -3.5, -0.5])
REF = torch.tensor([-1.5, -1.0, -3.0, -1.0])

# dpo_loss: (2B, T, D) = (4, 5, 6) hidden, V = 7, prompts masked.
_g = torch.Generator().manual_seed(1)
W = torch.randn(7, 6, generator=_g)
H = torch.randn(4, 5, 6, generator=_g)
Y = torch.randint(0, 7, (4, 5), generator=_g)
Y[:, 0] = -100
RSEQ = torch.tensor([0.1, -0.2, 0.3, 0.4])


def _ss(*args, **kwargs):
    return lambda: sequence_scores(*args, **kwargs)


def _pl(*args, **kwargs):
    return lambda: preference_loss_from_sequence_scores(*args, **kwargs)


def _opts(*args, **kwargs):
    return lambda: check_loss_options(*args, **kwargs)


def _dpo(weight=W, hidden=H, targets=Y, **kwargs):
    kwargs.setdefault("backend", "torch")
    return lambda: dpo_loss(weight, hidden, targets, **kwargs)


MESSAGES = [
    # ---- pairs.py: log_token_weights
    pytest.param(lambda: log_token_weights(S[:3]), ValueError, f"visual_scores {EVEN} 3", id="ltw-odd"),
    pytest.param(lambda: log_token_weights(S[:0]), ValueError, f"visual_scores {EVEN} 0", id="ltw-empty"),
    # ---- pairs.py: sequence_scores
    pytest.param(_ss(LP, S, M, weighting="dpo"), ValueError, "weighting must be one of ('tpo', 'none'), got 'dpo'",
                 id="ss-weighting"),
    pytest.param(_ss(LP.tolist(), S, M), ValueError, "logprobs must be 2-D (2B, T), got list", id="ss-logprobs-list"),
    pytest.param(_ss(LP[:, 0], S[:, 0], M[:, 0]), ValueError, "logprobs must be 2-D (2B, T), got float32 of shape (4,)",
                 id="ss-logprobs-1d"),
    pytest.param(_ss(LP[None], S, M), ValueError, "logprobs must be 2-D (2B, T), got float32 of shape (1, 4, 3)",
                 id="ss-logprobs-3d"),
    pytest.param(_ss(LP, S, M[:, :2]), ValueError,
                 "mask must have the shape (2B, T) = (4, 3) of logprobs, got bool of shape (4, 2)", id="ss-mask-shape"),
    pytest.param(_ss(LP, S, M[:, :2], weighting="none"), ValueError,
                 "mask must have the shape (2B, T) = (4, 3) of logprobs, got bool of shape (4, 2)",
                 id="ss-mask-shape-none"),
    pytest.param(_ss(LP, None, M), ValueError,
                 "weighting='tpo' needs visual scores (the corrupted branch); pass them or use 'none'",
                 id="ss-visual-missing"),
    pytest.param(_ss(LP, S[:, :2], M), ValueError,
                 "visual_scores must have the shape of logprobs (4, 3), got float32 of shape (4, 2)",
                 id="ss-visual-shape"),
    pytest.param(_ss(LP, S.double().T, M), ValueError,
                 "visual_scores must have the shape of logprobs (4, 3), got float64 of shape (3, 4)",
                 id="ss-visual-shape-f64"),
    pytest.param(_ss(LP[:3], S[:3], M[:3]), ValueError, f"visual_scores {EVEN} 3", id="ss-tpo-odd"),
    pytest.param(_ss(LP, S, M, offset=-1.0), ValueError, "offset must be a finite number >= 0 (the paper uses 0.5, "
                 "ablating 0, 0.5, 1), got -1.0", id="ss-offset-negative"),
    # ---- pairs.py: preference_loss_from_sequence_scores
    pytest.param(_pl(POL.tolist(), REF), ValueError, "policy_seq_scores must be a 1-D (2B,) tensor, got list",
                 id="pl-policy-list"),
    pytest.param(_pl(POL[:, None], REF), ValueError,
                 "policy_seq_scores must be a 1-D (2B,) tensor, got float32 of shape (4, 1)", id="pl-policy-2d"),
    pytest.param(_pl(POL[0], REF), ValueError,
                 "policy_seq_scores must be a 1-D (2B,) tensor, got float32 of shape ()", id="pl-policy-0d"),
    pytest.param(_pl(POL[:3], REF[:3]), ValueError, f"policy_seq_scores {EVEN} 3", id="pl-policy-odd"),
    pytest.param(_pl(POL[:0], REF[:0]), ValueError, f"policy_seq_scores {EVEN} 0", id="pl-policy-empty"),
    pytest.param(_pl(POL, REF, reference_free=True), ValueError,
                 "reference_free=True but ref_seq_scores was given; drop it or set reference_free=False",
                 id="pl-free-with-ref"),
    pytest.param(_pl(POL), ValueError, "ref_seq_scores (2B,) is required unless reference_free=True",
                 id="pl-ref-missing"),
    pytest.param(_pl(POL, REF[:3]), ValueError,
                 "ref_seq_scores must be of shape (2B,) = (4,), got float32 of shape (3,)", id="pl-ref-shape"),
    pytest.param(_pl(POL, REF[None]), ValueError,
                 "ref_seq_scores must be of shape (2B,) = (4,), got float32 of shape (1, 4)", id="pl-ref-2d"),
    pytest.param(_pl(POL, [0.1, 0.2, 0.3]), ValueError,
                 "ref_seq_scores must be of shape (2B,) = (4,), got float32 of shape (3,)", id="pl-ref-short-list"),
    pytest.param(_pl(POL, ["a", 1, 2, 3]), TypeError, "ref_seq_scores must be a tensor or a list of 4 numbers",
                 id="pl-ref-list-str"),
    pytest.param(_pl(POL, (None, 1, 2, 3)), TypeError, "ref_seq_scores must be a tensor or a list of 4 numbers",
                 id="pl-ref-tuple-none"),
    pytest.param(_pl(POL, "1234"), TypeError,
                 "ref_seq_scores must be a tensor (or a list of numbers) of shape (2B,) = (4,), got str",
                 id="pl-ref-str"),
    pytest.param(_pl(POL, np.zeros(4)), TypeError,
                 "ref_seq_scores must be a tensor (or a list of numbers) of shape (2B,) = (4,), got ndarray",
                 id="pl-ref-ndarray"),
    pytest.param(_pl(POL, REF, beta="0.1"), TypeError, f"beta {REAL} str", id="pl-beta-str"),
    pytest.param(_pl(POL, REF, beta=-0.1), ValueError,
                 "beta must be a finite number > 0 (TPO and DPO use 0.1), got -0.1", id="pl-beta-negative"),
    pytest.param(_pl(POL, REF, loss_type="kto"), ValueError,
                 "loss_type must be one of ('sigmoid', 'hinge', 'ipo'), got 'kto'", id="pl-loss-type"),
    pytest.param(_pl(POL, REF, label_smoothing=0.7), ValueError,
                 "label_smoothing must lie in [0, 0.5] (the assumed probability that a pair's label is flipped), "
                 "got 0.7", id="pl-smoothing-range"),
    pytest.param(_pl(POL, REF, loss_type="ipo", label_smoothing=0.2), ValueError,
                 "label_smoothing only applies to loss_type='sigmoid' (conservative DPO), got loss_type='ipo' "
                 "with label_smoothing=0.2; set label_smoothing=0.0", id="pl-smoothing-ipo"),
    # ---- _checks.py: real_scalar through check_loss_options (beta, offset, label_smoothing)
    pytest.param(_opts(None), TypeError, f"beta {REAL} NoneType", id="beta-none"),
    pytest.param(_opts(True), TypeError, f"beta {REAL} bool", id="beta-bool"),
    pytest.param(_opts(1 + 2j), TypeError, f"beta {REAL} complex", id="beta-complex"),
    pytest.param(_opts(torch.tensor([0.1, 0.2])), TypeError, f"beta {REAL} float32 of shape (2,)",
                 id="beta-2-elements"),
    pytest.param(_opts(torch.tensor(0.1, dtype=torch.complex64)), TypeError, f"beta {REAL} complex64 of shape ()",
                 id="beta-complex-tensor"),
    pytest.param(_opts(torch.tensor(True)), TypeError, f"beta {REAL} bool of shape ()", id="beta-bool-tensor"),
    pytest.param(_opts(np.array(True)), TypeError, f"beta {REAL} ndarray", id="beta-0d-bool-ndarray"),
    pytest.param(_opts(np.array([0.1])), TypeError, f"beta {REAL} ndarray", id="beta-1d-ndarray"),
    pytest.param(_opts(0.1, offset="0.5"), TypeError, f"offset {REAL} str", id="offset-str"),
    pytest.param(_opts(0.1, label_smoothing=[0.1]), TypeError, f"label_smoothing {REAL} list",
                 id="smoothing-list"),
    # ---- _checks.py: check_loss_options domains
    pytest.param(_opts(0), ValueError, "beta must be a finite number > 0 (TPO and DPO use 0.1), got 0.0", id="beta-0"),
    pytest.param(_opts(float("nan")), ValueError, "beta must be a finite number > 0 (TPO and DPO use 0.1), got nan",
                 id="beta-nan"),
    pytest.param(_opts(np.float64("inf")), ValueError,
                 "beta must be a finite number > 0 (TPO and DPO use 0.1), got inf", id="beta-inf"),
    pytest.param(_opts(torch.tensor(-2.0)), ValueError,
                 "beta must be a finite number > 0 (TPO and DPO use 0.1), got -2.0", id="beta-negative-tensor"),
    pytest.param(_opts(0.1, weighting="TPO"), ValueError,
                 "weighting must be one of ('tpo', 'none') ('tpo': token-weighted TPO, 'none': plain DPO), got 'TPO'",
                 id="weighting"),
    pytest.param(_opts(0.1, weighting=None), ValueError,
                 "weighting must be one of ('tpo', 'none') ('tpo': token-weighted TPO, 'none': plain DPO), got None",
                 id="weighting-none-object"),
    pytest.param(_opts(0.1, offset=-1), ValueError,
                 "offset must be a finite number >= 0 (the paper uses 0.5, ablating 0, 0.5, 1), got -1.0",
                 id="offset-negative"),
    pytest.param(_opts(0.1, offset=float("inf")), ValueError,
                 "offset must be a finite number >= 0 (the paper uses 0.5, ablating 0, 0.5, 1), got inf",
                 id="offset-inf"),
    pytest.param(_opts(0.1, loss_type="Sigmoid"), ValueError,
                 "loss_type must be one of ('sigmoid', 'hinge', 'ipo'), got 'Sigmoid'", id="loss-type"),
    pytest.param(_opts(0.1, label_smoothing=-0.1), ValueError,
                 "label_smoothing must lie in [0, 0.5] (the assumed probability that a pair's label is flipped), "
                 "got -0.1", id="smoothing-negative"),
    pytest.param(_opts(0.1, label_smoothing=float("nan")), ValueError,
                 "label_smoothing must lie in [0, 0.5] (the assumed probability that a pair's label is flipped), "
                 "got nan", id="smoothing-nan"),
    pytest.param(_opts(0.1, loss_type="hinge", label_smoothing=0.5), ValueError,
                 "label_smoothing only applies to loss_type='sigmoid' (conservative DPO), got loss_type='hinge' "
                 "with label_smoothing=0.5; set label_smoothing=0.0", id="smoothing-hinge"),
    # ---- dpo.py (through tpo_loss) and the _checks.py helpers it reaches
    pytest.param(_dpo(ref_seq_scores=RSEQ, beta=0), ValueError,
                 "beta must be a finite number > 0 (TPO and DPO use 0.1), got 0.0", id="dpo-beta"),
    pytest.param(_dpo(ref_seq_scores=RSEQ, beta="x"), TypeError, f"beta {REAL} str", id="dpo-beta-str"),
    pytest.param(_dpo(ref_seq_scores=RSEQ, loss_type="hinge", label_smoothing=0.1), ValueError,
                 "label_smoothing only applies to loss_type='sigmoid' (conservative DPO), got loss_type='hinge' "
                 "with label_smoothing=0.1; set label_smoothing=0.0", id="dpo-smoothing-hinge"),
    pytest.param(_dpo(ref_seq_scores=RSEQ, label_smoothing=None), TypeError, f"label_smoothing {REAL} NoneType",
                 id="dpo-smoothing-none"),
    pytest.param(_dpo(ref_seq_scores=RSEQ, grad_mode="double"), ValueError,
                 "grad_mode must be one of ('auto', 'fused', 'recompute') ('auto': fused, except fp16 on triton; "
                 "'fused': gradient computed in the forward, no logits recompute; 'recompute': the per-token "
                 "primitive's backward), got 'double'",
                 id="dpo-grad-mode"),
    pytest.param(_dpo(ref_seq_scores=RSEQ, backend="cuda"), ValueError,
                 "backend must be one of ('auto', 'triton', 'torch', 'reference'), got 'cuda'", id="dpo-backend"),
    pytest.param(_dpo(ref_seq_scores=RSEQ, ignore_index=-100.0), TypeError,
                 "ignore_index must be an int (default -100), got -100.0", id="dpo-ignore-index-float"),
    pytest.param(_dpo(ref_seq_scores=RSEQ, ignore_index=True), TypeError,
                 "ignore_index must be an int (default -100), got True", id="dpo-ignore-index-bool"),
    pytest.param(_dpo(targets=Y.tolist(), ref_seq_scores=RSEQ), TypeError,
                 "targets must be a torch.Tensor, got list", id="dpo-targets-list"),
    pytest.param(_dpo(targets=Y[:, 0], ref_seq_scores=RSEQ), ValueError,
                 "targets must be 2-D (2B, T) (chosen sequences first, then rejected), got int64 of shape (4,)",
                 id="dpo-targets-1d"),
    pytest.param(_dpo(hidden=H[:3], targets=Y[:3], ref_seq_scores=RSEQ[:3]), ValueError, f"targets {EVEN} 3",
                 id="dpo-targets-odd"),
    pytest.param(_dpo(hidden=H[:0], targets=Y[:0], ref_seq_scores=RSEQ[:0]), ValueError, f"targets {EVEN} 0",
                 id="dpo-targets-empty"),
    pytest.param(_dpo(hidden=H.numpy(), ref_seq_scores=RSEQ), TypeError, "hidden must be a torch.Tensor, got ndarray",
                 id="dpo-hidden-ndarray"),
    pytest.param(_dpo(hidden=H[:, :4], ref_seq_scores=RSEQ), ValueError,
                 "hidden must be (2B, T, D) = (4, 5, D) or (2B*T, D) = (20, D) to match the targets, "
                 f"got float32 of shape (4, 4, 6){HINT}", id="dpo-hidden-unshifted"),
    pytest.param(_dpo(hidden=H.flatten(0, 1)[:16], ref_seq_scores=RSEQ), ValueError,
                 "hidden must be (2B, T, D) = (4, 5, D) or (2B*T, D) = (20, D) to match the targets, "
                 f"got float32 of shape (16, 6){HINT}", id="dpo-hidden-rows"),
    pytest.param(_dpo(ref_seq_scores=RSEQ[:2]), ValueError,
                 "ref_seq_scores must be of shape (2B,) = (4,), got float32 of shape (2,)", id="dpo-ref-seq-shape"),
    pytest.param(_dpo(ref_seq_scores=[0, "x", 0, 0]), TypeError,
                 "ref_seq_scores must be a tensor or a list of 4 numbers", id="dpo-ref-seq-bad-list"),
    pytest.param(_dpo(ref_seq_scores={"a": 1}), TypeError,
                 "ref_seq_scores must be a tensor (or a list of numbers) of shape (2B,) = (4,), got dict",
                 id="dpo-ref-seq-dict"),
    pytest.param(_dpo(), ValueError,
                 "reference inputs are missing: pass ref_hidden (+ ref_corrupted_hidden for weighting='tpo'), "
                 "ref_seq_scores (2B,), or ref_token_logprobs (+ ref_visual_scores), or set reference_free=True",
                 id="dpo-ref-missing"),
    pytest.param(_dpo(ref_seq_scores=RSEQ, reference_free=True), ValueError,
                 "reference_free=True but reference inputs were given (ref_seq_scores); "
                 "drop them or set reference_free=False", id="dpo-free-with-ref"),
    pytest.param(_dpo(ref_seq_scores=RSEQ, ref_hidden=H), ValueError,
                 "ambiguous reference: got ref_hidden, ref_seq_scores; give exactly one of ref_hidden "
                 "(+ ref_corrupted_hidden), ref_seq_scores, or ref_token_logprobs (+ ref_visual_scores)",
                 id="dpo-ambiguous"),
    pytest.param(_dpo(ref_weight=W), ValueError,
                 "ref_weight/ref_bias only apply to ref_hidden; drop them when passing precomputed scores",
                 id="dpo-ref-weight-alone"),
    pytest.param(_dpo(ref_token_logprobs=LP), ValueError,
                 "ref_token_logprobs must be (2B, T) = (4, 5) like targets, got float32 of shape (4, 3)",
                 id="dpo-ref-token-logprobs-shape"),
    pytest.param(_dpo(ref_hidden=H, ref_weight=W[:, :5]), ValueError,
                 "ref_weight must have the (V, D) shape of weight (7, 6), got float32 of shape (7, 5)",
                 id="dpo-ref-weight-shape"),
    pytest.param(_dpo(ref_hidden=H[:, :4]), ValueError,
                 "ref_hidden must be (2B, T, D) = (4, 5, D) or (2B*T, D) = (20, D) to match the targets, "
                 f"got float32 of shape (4, 4, 6){HINT}", id="dpo-ref-hidden-rows"),
    pytest.param(_dpo(ref_hidden=H[..., :5]), ValueError,
                 "ref_hidden must have the shape of hidden (20, 6), got float32 of shape (4, 5, 5)",
                 id="dpo-ref-hidden-width"),
    # ---- _checks.py: same_shape, through tpo_loss_from_logprobs
    pytest.param(lambda: tpo_loss_from_logprobs(LP, S, M, LP[:, :2], S), ValueError,
                 "ref_logprobs must have the shape of policy_logprobs (4, 3), got float32 of shape (4, 2)",
                 id="same-shape-ref-logprobs"),
    pytest.param(lambda: tpo_loss_from_logprobs(LP, None, M, LP, S[:2], weighting="none"), ValueError,
                 "ref_visual_scores must have the shape of policy_logprobs (4, 3), got float32 of shape (2, 3)",
                 id="same-shape-ref-visual"),
]


@pytest.mark.parametrize(("call", "exc", "expected"), MESSAGES)
def test_error_messages(call, exc, expected):
    with pytest.raises(exc, match="^" + re.escape(expected) + "$"):
        call()


# ---------------------------------------------------------------------------------------------------------
# Values: fp32, on the inputs' device, whatever torch's default dtype and device.


def _oracle_log_weights(s, offset):
    sig = torch.sigmoid(s.double())
    n = s.shape[0] // 2
    return torch.log(torch.cat([offset + sig[:n], offset + 1 - sig[n:]])).float()


@pytest.mark.parametrize("offset", [0.5, 0.0, 1.0])
def test_log_token_weights_fp32_under_float64_default(default_float64, offset):
    out = log_token_weights(S, offset)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _oracle_log_weights(S, offset), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighting", ["tpo", "none"])
def test_sequence_scores_fp32_under_float64_default(default_float64, weighting):
    expected = weighted_scores(LP.double(), S.double(), M, weighting, 0.5, False).float()
    out = sequence_scores(LP, S, M, weighting)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offset", [0.5, 0.0])
def test_log_token_weights_on_input_device_under_meta_default(offset):
    expected = _oracle_log_weights(S, offset)
    with torch.device("meta"):
        out = log_token_weights(S, offset)
    assert out.device == S.device
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighting", ["tpo", "none"])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_scores_on_input_device_under_meta_default(weighting, average):
    expected = weighted_scores(LP, S, M, weighting, 0.5, average)
    with torch.device("meta"):
        out = sequence_scores(LP, S, M, weighting, average_log_prob=average)
    assert out.device == LP.device
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ref", [REF, REF.tolist()], ids=["tensor", "list"])
def test_preference_loss_list_reference_on_policy_device_under_meta_default(ref):
    margin = (POL[:2] - POL[2:]) - (REF[:2] - REF[2:])
    expected = -F.logsigmoid(0.1 * margin).mean()
    with torch.device("meta"):
        out = preference_loss_from_sequence_scores(POL, ref)
    assert out.loss.device == POL.device
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["rewards/margins"], 0.1 * margin.mean(), rtol=1e-5, atol=1e-6)


def test_visual_score_metrics_on_input_device_under_meta_default():
    m = M.float()
    vis = (S * m).sum(-1) / (m.sum(-1) + 1e-8)
    with torch.device("meta"):
        out = tpo_loss_from_logprobs(LP, S, M, reference_free=True)
    for key, part in (("visual_score/chosen", vis[:2]), ("visual_score/rejected", vis[2:])):
        assert out.metrics[key].device == S.device
        torch.testing.assert_close(out.metrics[key], part.mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("average", [False, True])
def test_dpo_loss_average_log_prob_against_materialized_logits(average):
    """dpo_loss passes average_log_prob on: the per-sequence mean (or sum) of target log-probs, from full logits."""
    g = torch.Generator().manual_seed(3)
    n_seq, t, d, v = 4, 5, 6, 11
    h = torch.randn(n_seq, t, d, generator=g)
    w = torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n_seq, t), generator=g)
    y[0, :2] = -100
    y[3, 1:] = -100  # a one-token response
    ref = torch.randn(n_seq, generator=g)
    logp = (h @ w.t()).log_softmax(-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    mask = (y != -100).float()
    s = (logp * mask).sum(-1)
    if average:
        s = s / mask.sum(-1)
    margin = 0.1 * ((s[:2] - ref[:2]) - (s[2:] - ref[2:]))
    want = -F.logsigmoid(margin).mean()
    for grad_mode, backend in (("fused", "torch"), ("recompute", "reference")):
        got = dpo_loss(w, h.reshape(-1, d), y, ref_seq_scores=ref, average_log_prob=average, grad_mode=grad_mode,
                       backend=backend).loss
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sigmoid_loss_without_smoothing_at_an_infinite_margin():
    """label_smoothing=0: the loss is -logsigmoid(beta * margin) alone, so an infinite margin gives 0 (or inf),
    never the 0 * inf = NaN of a zero-weighted second term; with smoothing both terms count."""
    from tpo_fast.loss.pairs import pair_losses

    inf = float("inf")
    policy, ref = torch.tensor([inf, -inf, 0.0, 0.0]), torch.zeros(4)  # pairs: (inf, 0), (-inf, 0)
    assert pair_losses(policy, ref, 0.1).tolist() == [0.0, inf]
    smoothed = pair_losses(torch.tensor([2.0, 0.0]), torch.zeros(2), 0.5, label_smoothing=0.2)
    want = -torch.nn.functional.logsigmoid(torch.tensor(1.0)) * 0.8 - torch.nn.functional.logsigmoid(
        torch.tensor(-1.0)) * 0.2
    torch.testing.assert_close(smoothed, want.reshape(1))


def test_log_token_weights_default_offset_is_one_half():
    """The paper's a = 0.5 when no offset is passed: chosen rows log(0.5 + sigmoid(s)), rejected rows
    log(1.5 - sigmoid(s))."""
    s = torch.tensor([[0.0, 2.0], [0.0, -1.0]])
    sig = torch.sigmoid(s)
    expected = torch.stack([torch.log(0.5 + sig[0]), torch.log(1.5 - sig[1])])
    torch.testing.assert_close(log_token_weights(s), expected)
