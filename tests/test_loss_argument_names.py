"""Every input error of the losses names the argument the user passed, the same on every path (fused and
recompute gradient, torch and reference backend): a reference's inputs are `ref_hidden`, `ref_weight`,
`ref_bias`, `ref_corrupted_hidden` and `ref_token_logprobs` (never the policy's `hidden` or the primitives'
`ref_logprobs`), POVID's corrupted rows are `corrupted_hidden` (never `hidden`, the name its argmax sweep gives
them). And the public pair helpers refuse what would crash inside torch or give a silently wrong number: an odd
count of scores, a negative or NaN offset, a list for a tensor, a tensor on another device, boolean or complex
reference scores. Expected messages are written out whole."""

from __future__ import annotations

import re

import pytest
import torch

from tpo_fast.loss import (
    DPOLoss,
    POVIDLoss,
    TPOLoss,
    log_token_weights,
    pair_losses,
    povid_loss,
    povid_reference_scores,
    povid_sequence_scores,
    preference_loss_from_sequence_scores,
    reference_sequence_scores,
    sequence_scores,
    tpo_loss,
    tpo_loss_from_logprobs,
)

B, T, D, V = 2, 5, 8, 20
PATHS = [pytest.param("fused", "torch", id="fused-torch"), pytest.param("recompute", "torch", id="recompute-torch"),
         pytest.param("recompute", "reference", id="recompute-reference")]


def _inputs():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    h, hc = torch.randn(2 * B, T, D, generator=g), torch.randn(2 * B, T, D, generator=g)
    rh, rhc = torch.randn(2 * B, T, D, generator=g), torch.randn(2 * B, T, D, generator=g)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, :2] = -100
    return w, b, h, hc, rh, rhc, y


W, BIAS, H, HC, RH, RHC, Y = _inputs()


def _raises(kind, message, call):
    with pytest.raises(kind, match="^" + re.escape(message) + "$"):
        call()


# the reference's errors that TPO and POVID share (ref_weight left out: the policy's `weight` in the message)
REF_HIDDEN_DTYPE = pytest.param(
    {"ref_hidden": RH.bfloat16()}, TypeError, "ref_hidden and weight must have the same dtype, got ref_hidden bfloat16 "
    "of shape (20, 8) and weight float32 of shape (20, 8); cast one of them (e.g. ref_hidden.to(weight.dtype))",
    id="ref-hidden-dtype")
REF_BIAS_SHAPE = pytest.param({"ref_bias": BIAS[:3]}, ValueError,
                              "ref_bias must be of shape (V,) = (20,), got float32 of shape (3,)", id="ref-bias-shape")

TPO_REFERENCE = [
    REF_HIDDEN_DTYPE,
    REF_BIAS_SHAPE,
    pytest.param({"ref_weight": W.double()}, TypeError,
                 "ref_weight must be float32, float16 or bfloat16, got float64 of shape (20, 8)", id="weight-dtype"),
    pytest.param({"ref_corrupted_hidden": RHC.bfloat16()}, TypeError,
                 "ref_corrupted_hidden must have the dtype of ref_hidden (torch.float32), got bfloat16 of shape "
                 "(20, 8)",
                 id="corrupted-dtype"),
    pytest.param({"ref_hidden": RH.to("meta")}, ValueError,
                 "all inputs must be on the same device, got ref_hidden on meta, weight on cpu, targets on cpu, "
                 "bias on cpu, ref_corrupted_hidden on cpu", id="hidden-device"),
]


@pytest.mark.parametrize(("grad_mode", "backend"), PATHS)
@pytest.mark.parametrize(("change", "kind", "message"), TPO_REFERENCE)
def test_tpo_reference_errors_name_the_reference_arguments(grad_mode, backend, change, kind, message):
    ref = {"ref_hidden": RH, "ref_corrupted_hidden": RHC} | change
    _raises(kind, message, lambda: tpo_loss(W, H, HC, Y, BIAS, **ref, grad_mode=grad_mode, backend=backend))


def test_tpo_per_token_reference_on_another_device_is_named_as_passed():
    _raises(ValueError, "ref_token_logprobs is on meta but the loss inputs are on cpu; move it there first "
            "(ref_token_logprobs.to('cpu'))",
            lambda: tpo_loss(W, H, HC, Y, BIAS, ref_token_logprobs=torch.zeros(2 * B, T, device="meta"),
                             ref_visual_scores=torch.zeros(2 * B, T)))
    _raises(ValueError, "weighting='tpo' needs ref_visual_scores (2B, T) with ref_token_logprobs: the reference "
            "weights its tokens with its own c^ref",
            lambda: tpo_loss(W, H, HC, Y, BIAS, ref_token_logprobs=torch.zeros(2 * B, T)))


POVID_INPUTS = [
    pytest.param({"corrupted_hidden": HC[:B].bfloat16()}, TypeError,
                 "corrupted_hidden must have the lm_head weight's dtype (torch.float32), got bfloat16 of shape "
                 "(2, 5, 8); e.g. corrupted_hidden.to(weight.dtype)", id="corrupted-dtype"),
    pytest.param({"corrupted_hidden": HC[:B].double()}, TypeError,
                 "corrupted_hidden must be float32, float16 or bfloat16, got float64 of shape (2, 5, 8)",
                 id="corrupted-float64"),
    pytest.param({"corrupted_hidden": HC[:B].to("meta")}, ValueError,
                 "corrupted_hidden is on meta but the lm_head weight is on cpu; move it there first",
                 id="corrupted-device"),
    pytest.param({"hidden": H.double()}, TypeError,
                 "hidden must be float32, float16 or bfloat16, got float64 of shape (20, 8)", id="hidden-first"),
    REF_BIAS_SHAPE,
    REF_HIDDEN_DTYPE,
]


@pytest.mark.parametrize(("grad_mode", "backend"), PATHS)
@pytest.mark.parametrize(("change", "kind", "message"), POVID_INPUTS)
def test_povid_errors_name_the_arguments(grad_mode, backend, change, kind, message):
    args = {"hidden": H, "corrupted_hidden": HC[:B], "ref_hidden": RH, "ref_corrupted_hidden": RHC[:B]} | change
    hidden, corrupted = args.pop("hidden"), args.pop("corrupted_hidden")
    _raises(kind, message, lambda: povid_loss(W, hidden, corrupted, Y, BIAS, **args, grad_mode=grad_mode,
                                              backend=backend))


def test_pair_losses_takes_two_equal_even_score_vectors():
    """An odd count paired a chosen score with a chosen one (3 scores gave 2 losses); unequal lengths failed inside
    torch's broadcasting."""
    _raises(ValueError, "policy must hold an even, non-zero number of sequences 2B (B chosen, then B rejected), got 3",
            lambda: pair_losses(torch.zeros(3), torch.zeros(3), beta=0.1))
    _raises(ValueError, "policy and ref must be 1-D (2B,) scores of one shape, got float32 of shape (4,) and float32 "
            "of shape (6,)", lambda: pair_losses(torch.zeros(4), torch.zeros(6), beta=0.1))
    _raises(ValueError, "policy and ref must be 1-D (2B,) scores of one shape, got float32 of shape (2, 2) and "
            "float32 of shape (2, 2)", lambda: pair_losses(torch.zeros(2, 2), torch.zeros(2, 2), beta=0.1))
    _raises(TypeError, "ref must be a torch.Tensor, got list", lambda: pair_losses(torch.zeros(4), [0.0] * 4, beta=0.1))
    _raises(TypeError, "policy must be a torch.Tensor, got list",
            lambda: pair_losses([0.0] * 4, torch.zeros(4), beta=0.1))
    _raises(ValueError, "policy and ref must be 1-D (2B,) scores of one shape, got NoneType and float32 of shape (4,)",
            lambda: pair_losses(None, torch.zeros(4), beta=0.1))
    _raises(ValueError, "policy and ref must be 1-D (2B,) scores of one shape, got float32 of shape (4,) and NoneType",
            lambda: pair_losses(torch.zeros(4), None, beta=0.1))
    _raises(ValueError, "loss_type must be 'sigmoid', 'hinge' or 'ipo', got 'ipo2'",
            lambda: pair_losses(torch.zeros(4), torch.zeros(4), beta=0.1, loss_type="ipo2"))
    for beta in (0.0, -1.0):
        _raises(ValueError, f"beta must be a finite number > 0 (DPO uses 0.1), got {beta}",
                lambda beta=beta: pair_losses(torch.zeros(4), torch.zeros(4), beta=beta))
    margin = torch.tensor([1.0, -2.0, 0.5, 0.5])  # policy margins 0.5 and -2.5 against a zero reference
    torch.testing.assert_close(pair_losses(margin, torch.zeros(4), beta=1.0),
                               torch.nn.functional.softplus(-torch.tensor([0.5, -2.5])))


@pytest.mark.parametrize("offset", [-1.0, float("nan"), float("inf")])
def test_token_weight_offset_outside_its_domain_is_refused(offset):
    message = f"offset must be a finite number >= 0 (the paper uses 0.5, ablating 0, 0.5, 1), got {offset!r}"
    s, lp, m = torch.randn(4, 3), -torch.rand(4, 3), torch.ones(4, 3, dtype=torch.bool)
    _raises(ValueError, message, lambda: log_token_weights(s, offset=offset))
    _raises(TypeError, "visual_scores must be a torch.Tensor, got list", lambda: log_token_weights(s.tolist()))
    _raises(ValueError, message, lambda: sequence_scores(lp, s, m, "tpo", offset=offset))


def test_per_token_helpers_name_a_list_or_a_tensor_on_another_device():
    lp, s, m = -torch.rand(4, 3), torch.randn(4, 3), torch.ones(4, 3, dtype=torch.bool)
    _raises(ValueError, "mask must have the shape (2B, T) = (4, 3) of logprobs, got list",
            lambda: sequence_scores(lp, s, m.tolist()))
    _raises(ValueError, "mask is on meta but the loss inputs are on cpu; move it there first (mask.to('cpu'))",
            lambda: sequence_scores(lp, s, m.to("meta")))
    _raises(TypeError, "visual_scores must be a torch.Tensor, got list", lambda: sequence_scores(lp, s.tolist(), m))
    _raises(ValueError, "visual_scores is on meta but the loss inputs are on cpu; move it there first "
            "(visual_scores.to('cpu'))", lambda: sequence_scores(lp, s.to("meta"), m))
    _raises(TypeError, "policy_visual_scores must be a torch.Tensor, got list",
            lambda: tpo_loss_from_logprobs(lp, s.tolist(), m, reference_free=True))
    _raises(TypeError, "ref_logprobs must be a torch.Tensor, got list",
            lambda: tpo_loss_from_logprobs(lp, s, m, lp.tolist(), s))
    _raises(TypeError, "ref_visual_scores must be a torch.Tensor, got list",
            lambda: tpo_loss_from_logprobs(lp, s, m, lp, s.tolist()))
    _raises(ValueError, "mask is on meta but the loss inputs are on cpu; move it there first (mask.to('cpu'))",
            lambda: tpo_loss_from_logprobs(lp, s, m.to("meta"), reference_free=True))
    _raises(ValueError, "policy_visual_scores is on meta but the loss inputs are on cpu; move it there first "
            "(policy_visual_scores.to('cpu'))",
            lambda: tpo_loss_from_logprobs(lp, s.to("meta"), m, reference_free=True))


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_reference_scores_must_be_real_numbers(dtype):
    """Boolean scores passed as 0/1 and complex ones lost their imaginary part, silently."""
    scores = torch.tensor([1, 0, 0, 1]).to(dtype)
    name = str(dtype).replace("torch.", "")
    message = f"ref_seq_scores must hold real numbers (a float tensor of shape (2B,) = (4,)), got {name} of shape (4,)"
    _raises(TypeError, message, lambda: preference_loss_from_sequence_scores(torch.zeros(4), scores))
    _raises(TypeError, message, lambda: tpo_loss(W, H, HC, Y, BIAS, ref_seq_scores=scores, backend="torch"))
    # integers are real numbers: reference margins 1 and -1, so the pairs' beta * l are -0.1 and 0.1
    ints = preference_loss_from_sequence_scores(torch.zeros(4), torch.tensor([1, 0, 0, 1])).loss
    torch.testing.assert_close(ints, torch.nn.functional.softplus(torch.tensor([0.1, -0.1])).mean())


FLAG_CALLS = [
    pytest.param(lambda v: tpo_loss(W, H, HC, Y, BIAS, reference_free=True, backend="torch", detach_weights=v),
                 "detach_weights", id="tpo_loss"),
    pytest.param(lambda v: tpo_loss_from_logprobs(-torch.rand(4, 3), torch.randn(4, 3), torch.ones(4, 3, dtype=bool),
                                                  reference_free=v), "reference_free", id="tpo_loss_from_logprobs"),
    pytest.param(lambda v: preference_loss_from_sequence_scores(torch.zeros(4), reference_free=v), "reference_free",
                 id="preference_loss"),
    pytest.param(lambda v: sequence_scores(-torch.rand(4, 3), None, torch.ones(4, 3, dtype=bool), "none",
                                           average_log_prob=v), "average_log_prob", id="sequence_scores"),
    pytest.param(lambda v: povid_loss(W, H, HC[:B], Y, BIAS, reference_free=True, average_log_prob=v),
                 "average_log_prob", id="povid_loss"),
    pytest.param(lambda v: povid_sequence_scores(W, H, HC[:B], Y, average_log_prob=v), "average_log_prob",
                 id="povid_sequence_scores"),
    pytest.param(lambda v: povid_reference_scores(W, H, HC[:B], Y, average_log_prob=v), "average_log_prob",
                 id="povid_reference_scores"),
    pytest.param(lambda v: reference_sequence_scores(W, H, HC, Y, average_log_prob=v), "average_log_prob",
                 id="reference_sequence_scores"),
    pytest.param(lambda v: TPOLoss(detach_weights=v), "detach_weights", id="TPOLoss"),
    pytest.param(lambda v: DPOLoss(average_log_prob=v), "average_log_prob", id="DPOLoss"),
    pytest.param(lambda v: POVIDLoss(reference_free=v), "reference_free", id="POVIDLoss"),
]


@pytest.mark.parametrize(("call", "name"), FLAG_CALLS)
def test_a_flag_that_is_not_true_or_false_is_refused(call, name):
    """A string "False" counted as true (`bool("False")`); 0 and 1 and NumPy booleans are flags."""
    import numpy as np

    for bad in ("False", 2, None, 0.5):
        _raises(TypeError, f"{name} must be True or False, got {bad!r}", lambda bad=bad: call(bad))
    for good in (True, 1, np.bool_(True)):
        call(good)
