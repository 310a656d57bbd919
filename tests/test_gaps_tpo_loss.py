"""`tpo_fast.loss.tpo` edges that mutation testing found unguarded (docs/testing.md): every input error with
its whole message, options validated before the tensors, the keyword defaults, a custom ignore_index on the
fused, recompute and reference-scoring paths, the options reaching each path, a corrupted branch that
`weighting="none"` ignores, and the chunk-to-sequence indices.

Expected values come from tests/loss_reference.py (materialized logits, `log_softmax`, `gather`), which
shares no code with tpo_fast; expected messages are written out literally.
"""

from __future__ import annotations

import re

import pytest
import torch
from _spies import record_calls
from loss_reference import reference_loss, reference_scores, weighted_scores

import tpo_fast.loss.tpo as tpo_module
from tpo_fast.loss import reference_sequence_scores, tpo_loss, tpo_loss_from_logprobs
from tpo_fast.ops.fused_pairs import PairChunk

N_PAIRS, T, D, V = 2, 5, 6, 11
IGNORE = -100
HINT = "; targets must be shifted so that hidden row t predicts targets[:, t]"


def _close(actual, expected):
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=1e-5, atol=1e-6)


def batch(seed=0, ignore_index=IGNORE):
    """Policy and a separate reference lm_head and hidden states; prompts masked, response lengths differ."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    hidden = randn(2 * N_PAIRS, T, D)
    b = {
        "weight": randn(V, D, scale=0.5),
        "bias": randn(V, scale=0.5),
        "hidden": hidden,
        "corrupted_hidden": hidden + randn(2 * N_PAIRS, T, D, scale=0.7),
        "ref_weight": randn(V, D, scale=0.5),
        "ref_bias": randn(V, scale=0.5),
        "ref_hidden": randn(2 * N_PAIRS, T, D),
        "ref_corrupted_hidden": randn(2 * N_PAIRS, T, D),
    }
    targets = torch.randint(0, V, (2 * N_PAIRS, T), generator=g)
    for i, (prompt, length) in enumerate([(1, T), (2, T - 1), (1, T - 2), (2, T)]):
        targets[i, :prompt] = ignore_index
        targets[i, length:] = ignore_index
    b["targets"] = targets
    return b


def logprob_inputs(seed=1):
    """(2B, T) = (4, 3) policy and reference logprobs and visual scores; 3, 1, 2, 2 response tokens."""
    g = torch.Generator().manual_seed(seed)
    lp, s = -torch.rand(4, 3, generator=g) * 3, torch.randn(4, 3, generator=g)
    rlp, rs = -torch.rand(4, 3, generator=g) * 3, torch.randn(4, 3, generator=g)
    mask = torch.tensor([[1, 1, 1], [0, 1, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    return lp, s, mask, rlp, rs


def dpo_oracle(policy, ref, beta=0.1):
    margin = (policy[:N_PAIRS] - policy[N_PAIRS:]) - (ref[:N_PAIRS] - ref[N_PAIRS:])
    return -torch.nn.functional.logsigmoid(beta * margin).mean()


def policy_args(b):
    return b["weight"], b["hidden"], b["corrupted_hidden"], b["targets"], b["bias"]


def model_ref(b):
    return {k: b[k] for k in ("ref_hidden", "ref_corrupted_hidden", "ref_weight", "ref_bias")}


# ---------------------------------------------------------------------------------------------------------
# Input errors, whole messages.

LP, S, M, RLP, RS = logprob_inputs()
RSEQ = torch.tensor([0.1, -0.2, 0.3, 0.4])
B0 = batch()
W, H, HC, Y, BIAS = policy_args(B0)


def _lp(*args, **kwargs):
    return lambda: tpo_loss_from_logprobs(*args, **kwargs)


def _tpo(**kwargs):
    args = {"weight": W, "hidden": H, "corrupted_hidden": HC, "targets": Y, "bias": BIAS}
    for k in list(args):
        if k in kwargs:
            args[k] = kwargs.pop(k)
    return lambda: tpo_loss(args["weight"], args["hidden"], args["corrupted_hidden"], args["targets"], args["bias"],
                            backend="torch", **kwargs)


MESSAGES = [
    # tpo_loss_from_logprobs
    pytest.param(_lp(LP, S, [[True] * 3] * 4, ref_seq_scores=RSEQ),
                 "mask must have the shape (2B, T) = (4, 3) of policy_logprobs, got list", id="mask-list"),
    pytest.param(_lp(LP, S, M[:, :2], ref_seq_scores=RSEQ),
                 "mask must have the shape (2B, T) = (4, 3) of policy_logprobs, got bool of shape (4, 2)",
                 id="mask-shape"),
    pytest.param(_lp(LP.tolist(), S, M, ref_seq_scores=RSEQ),
                 "policy_logprobs must be 2-D (2B, T), got list", id="policy-list"),
    pytest.param(_lp(LP[:, 0], S, M, ref_seq_scores=RSEQ),
                 "policy_logprobs must be 2-D (2B, T), got float32 of shape (4,)", id="policy-1d"),
    pytest.param(_lp(LP[:3], S[:3], M[:3], ref_seq_scores=RSEQ[:3]),
                 "policy_logprobs must hold an even, non-zero number of sequences 2B (B chosen, then B rejected), "
                 "got 3", id="policy-odd"),
    pytest.param(_lp(LP, None, M, ref_seq_scores=RSEQ),
                 "weighting='tpo' needs policy_visual_scores (2B, T) from the corrupted-image branch; "
                 "pass them or use weighting='none' (plain DPO)", id="policy-visual-missing"),
    pytest.param(_lp(LP, S[:, :2], M, ref_seq_scores=RSEQ),
                 "policy_visual_scores must have the shape of policy_logprobs (4, 3), got float32 of shape (4, 2)",
                 id="policy-visual-shape"),
    pytest.param(_lp(LP, S, M, ref_seq_scores=RSEQ, reference_free=True),
                 "reference_free=True but reference inputs were given; drop them or set reference_free=False",
                 id="lp-free-with-seq-scores"),
    pytest.param(_lp(LP, S, M, RLP, RS, reference_free=True),
                 "reference_free=True but reference inputs were given; drop them or set reference_free=False",
                 id="lp-free-with-tokens"),
    pytest.param(_lp(LP, S, M, RLP, RS, ref_seq_scores=RSEQ),
                 "ambiguous reference: give either ref_seq_scores (2B,) or per-token "
                 "ref_logprobs/ref_visual_scores (2B, T), not both", id="lp-ambiguous"),
    pytest.param(_lp(LP, S, M, ref_seq_scores=RSEQ[:3]),
                 "ref_seq_scores must be of shape (2B,) = (4,), got float32 of shape (3,)", id="lp-seq-scores-shape"),
    pytest.param(_lp(LP, S, M),
                 "reference inputs are missing: pass ref_seq_scores (2B,), or ref_logprobs and ref_visual_scores "
                 "(2B, T), or set reference_free=True", id="lp-missing"),
    pytest.param(_lp(LP, S, M, None, RS),
                 "ref_visual_scores was given without ref_logprobs; pass both (2B, T) tensors",
                 id="lp-visual-without-logprobs"),
    pytest.param(_lp(LP, S, M, RLP[:, :2], RS),
                 "ref_logprobs must have the shape of policy_logprobs (4, 3), got float32 of shape (4, 2)",
                 id="lp-ref-logprobs-shape"),
    pytest.param(_lp(LP, S, M, RLP, RS[:, :2]),
                 "ref_visual_scores must have the shape of policy_logprobs (4, 3), got float32 of shape (4, 2)",
                 id="lp-ref-visual-shape"),
    pytest.param(_lp(LP, S, M, RLP),
                 "weighting='tpo' needs ref_visual_scores (2B, T) with ref_logprobs: "
                 "the reference weights its tokens with its own c^ref", id="lp-tpo-without-ref-visual"),
    # An invalid option is reported before any tensor is looked at (here: the missing reference).
    pytest.param(_lp(LP, S, M, label_smoothing=0.7),
                 "label_smoothing must lie in [0, 0.5] (the assumed probability that a pair's label is flipped), "
                 "got 0.7", id="lp-label-smoothing-first"),
    # tpo_loss: policy hidden states
    pytest.param(_tpo(hidden=H[:, :-1], ref_seq_scores=RSEQ),
                 "hidden must be (2B, T, D) = (4, 5, D) or (2B*T, D) = (20, D) to match the targets, "
                 "got float32 of shape (4, 4, 6)" + HINT, id="hidden-shape"),
    pytest.param(_tpo(corrupted_hidden=HC[:, :-1], ref_seq_scores=RSEQ),
                 "corrupted_hidden must be (2B, T, D) = (4, 5, D) or (2B*T, D) = (20, D) to match the targets, "
                 "got float32 of shape (4, 4, 6)" + HINT, id="corrupted-hidden-rows"),
    pytest.param(_tpo(corrupted_hidden=torch.zeros(20, D + 1), ref_seq_scores=RSEQ),
                 "corrupted_hidden must have the weight's hidden size D = 6 (weight is float32 of shape (11, 6)), "
                 "got float32 of shape (20, 7)",
                 id="corrupted-hidden-width"),
    # the wrong one is named: hidden's D against the weight's, before corrupted_hidden is compared with it
    pytest.param(_tpo(hidden=torch.zeros(4, T, D + 1), ref_seq_scores=RSEQ),
                 "hidden must have the weight's hidden size D = 6 (weight is float32 of shape (11, 6)), "
                 "got float32 of shape (4, 5, 7)", id="hidden-width"),
    pytest.param(_tpo(corrupted_hidden=None, ref_seq_scores=RSEQ),
                 "corrupted_hidden is required when weighting='tpo' (hidden states of the same sequences on the "
                 "corrupted image); use weighting='none' or dpo_loss for plain DPO", id="corrupted-hidden-missing"),
    # tpo_loss: reference forms
    pytest.param(_tpo(ref_hidden=B0["ref_hidden"]),
                 "weighting='tpo' needs ref_corrupted_hidden with ref_hidden: "
                 "the reference weights its tokens with its own c^ref", id="ref-corrupted-missing"),
    pytest.param(_tpo(ref_hidden=B0["ref_hidden"], ref_corrupted_hidden=B0["ref_corrupted_hidden"][:, :-1]),
                 "ref_corrupted_hidden must be (2B, T, D) = (4, 5, D) or (2B*T, D) = (20, D) to match the targets, "
                 "got float32 of shape (4, 4, 6)" + HINT, id="ref-corrupted-rows"),
    pytest.param(_tpo(ref_hidden=B0["ref_hidden"][:, :-1], ref_corrupted_hidden=B0["ref_corrupted_hidden"]),
                 "ref_hidden must be (2B, T, D) = (4, 5, D) or (2B*T, D) = (20, D) to match the targets, "
                 "got float32 of shape (4, 4, 6)" + HINT, id="ref-hidden-rows"),
    pytest.param(_tpo(ref_hidden=torch.zeros(4, T, D + 1), ref_corrupted_hidden=B0["ref_corrupted_hidden"]),
                 "ref_hidden must have the shape of hidden (20, 6), got float32 of shape (4, 5, 7)",
                 id="ref-hidden-width"),
    pytest.param(_tpo(ref_hidden=B0["ref_hidden"], ref_corrupted_hidden=B0["ref_corrupted_hidden"],
                      ref_weight=B0["ref_weight"][:, :-1]),
                 "ref_weight must have the (V, D) shape of weight (11, 6), got float32 of shape (11, 5)",
                 id="ref-weight-shape"),
    pytest.param(_tpo(ref_token_logprobs=torch.zeros(4, T - 1)),
                 "ref_token_logprobs must be (2B, T) = (4, 5) like targets, got float32 of shape (4, 4)",
                 id="ref-token-logprobs-shape"),
    pytest.param(_tpo(ref_token_logprobs=torch.zeros(4, T), ref_visual_scores=[0.0] * 4),
                 "ref_visual_scores must be (2B, T) = (4, 5) like targets, got list", id="ref-visual-list"),
    pytest.param(_tpo(ref_visual_scores=torch.zeros(4, T), ref_seq_scores=RSEQ),
                 "ref_visual_scores was given without ref_token_logprobs; pass both (2B, T) tensors",
                 id="ref-visual-without-logprobs"),
    pytest.param(_tpo(ref_corrupted_hidden=B0["ref_corrupted_hidden"], ref_seq_scores=RSEQ),
                 "ref_corrupted_hidden was given without ref_hidden; pass both", id="ref-corrupted-without-hidden"),
    pytest.param(_tpo(ref_weight=B0["ref_weight"], ref_seq_scores=RSEQ),
                 "ref_weight/ref_bias only apply to ref_hidden; drop them when passing precomputed scores",
                 id="ref-weight-without-hidden"),
    pytest.param(_tpo(ref_bias=B0["ref_bias"], ref_seq_scores=RSEQ),
                 "ref_weight/ref_bias only apply to ref_hidden; drop them when passing precomputed scores",
                 id="ref-bias-without-hidden"),
    pytest.param(_tpo(ref_hidden=B0["ref_hidden"], ref_seq_scores=RSEQ, reference_free=True),
                 "reference_free=True but reference inputs were given (ref_hidden, ref_seq_scores); "
                 "drop them or set reference_free=False", id="free-with-two"),
    pytest.param(_tpo(ref_seq_scores=RSEQ, ref_token_logprobs=torch.zeros(4, T)),
                 "ambiguous reference: got ref_seq_scores, ref_token_logprobs; give exactly one of ref_hidden "
                 "(+ ref_corrupted_hidden), ref_seq_scores, or ref_token_logprobs (+ ref_visual_scores)",
                 id="ambiguous"),
    pytest.param(_tpo(),
                 "reference inputs are missing: pass ref_hidden (+ ref_corrupted_hidden for weighting='tpo'), "
                 "ref_seq_scores (2B,), or ref_token_logprobs (+ ref_visual_scores), or set reference_free=True",
                 id="missing"),
    pytest.param(_tpo(ref_seq_scores=RSEQ[:3]),
                 "ref_seq_scores must be of shape (2B,) = (4,), got float32 of shape (3,)", id="seq-scores-shape"),
    pytest.param(_tpo(label_smoothing=0.7),
                 "label_smoothing must lie in [0, 0.5] (the assumed probability that a pair's label is flipped), "
                 "got 0.7", id="label-smoothing-first"),
    # reference_sequence_scores
    pytest.param(lambda: reference_sequence_scores(W, H[:, :-1], HC, Y),
                 "hidden must be (2B, T, D) = (4, 5, D) or (2B*T, D) = (20, D) to match the targets, "
                 "got float32 of shape (4, 4, 6)" + HINT, id="rss-hidden-shape"),
    pytest.param(lambda: reference_sequence_scores(W, H, None, Y, weighting="none", offset=-1.0),
                 "offset must be a finite number >= 0 (the paper uses 0.5, ablating 0, 0.5, 1), got -1.0",
                 id="rss-offset"),
]


@pytest.mark.parametrize(("call", "expected"), MESSAGES)
def test_error_message(call, expected):
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        call()


# ---------------------------------------------------------------------------------------------------------
# Values against the oracle.


def test_logprob_defaults_are_summed_scores_offset_half():
    lp, s, mask, rlp, rs = logprob_inputs()
    out = tpo_loss_from_logprobs(lp, s, mask, rlp, rs)
    policy = weighted_scores(lp, s, mask, "tpo", 0.5, False)
    ref = weighted_scores(rlp, rs, mask, "tpo", 0.5, False)
    _close(out.loss, dpo_oracle(policy, ref))
    _close(out.metrics["logps/chosen"], (lp * mask)[:N_PAIRS].sum(-1).mean())


def test_logprob_reference_without_visual_scores_for_plain_dpo():
    lp, _, mask, rlp, _ = logprob_inputs()
    out = tpo_loss_from_logprobs(lp, None, mask, rlp, weighting="none")
    _close(out.loss, dpo_oracle((lp * mask).sum(-1), (rlp * mask).sum(-1)))
    assert "visual_score/chosen" not in out.metrics


def test_reference_sequence_scores_defaults_are_summed_tpo_offset_half():
    b = batch(seed=2)
    got = reference_sequence_scores(*policy_args(b))
    expected, _, _ = reference_scores(*policy_args(b), "tpo", 0.5, False, IGNORE)
    _close(got, expected)


def test_reference_sequence_scores_ignores_the_corrupted_branch_without_token_weights():
    b = batch(seed=3)
    expected, _, _ = reference_scores(b["weight"], b["hidden"], None, b["targets"], b["bias"], "none", 0.5, False,
                                      IGNORE)
    # weighting="none" never reads corrupted_hidden: a tensor of any shape is ignored, not rejected.
    got = reference_sequence_scores(b["weight"], b["hidden"], torch.zeros(1), b["targets"], b["bias"],
                                    weighting="none")
    _close(got, expected)


@pytest.mark.parametrize("grad_mode", ["fused", "recompute"])
def test_model_reference_ignores_its_corrupted_branch_without_token_weights(grad_mode):
    b = batch(seed=4)
    expected, metrics = reference_loss(*policy_args(b), ref_hidden=b["ref_hidden"], ref_weight=b["ref_weight"],
                                       ref_bias=b["ref_bias"], weighting="none")
    out = tpo_loss(*policy_args(b), ref_hidden=b["ref_hidden"], ref_corrupted_hidden=torch.zeros(1),
                   ref_weight=b["ref_weight"], ref_bias=b["ref_bias"], weighting="none", backend="torch",
                   grad_mode=grad_mode)
    _close(out.loss, expected)
    _close(out.metrics["rewards/chosen"], metrics["rewards/chosen"])


@pytest.mark.parametrize("grad_mode", ["fused", "recompute"])
@pytest.mark.parametrize("ref_mode", ["hidden", "seq"])
def test_custom_ignore_index_on_every_path(grad_mode, ref_mode):
    b = batch(seed=5, ignore_index=-1)
    assert (b["targets"] == -1).any()
    ref = model_ref(b)
    if ref_mode == "seq":
        ref = {"ref_seq_scores": reference_sequence_scores(
            b["ref_weight"], b["ref_hidden"], b["ref_corrupted_hidden"], b["targets"], b["ref_bias"],
            ignore_index=-1, backend="torch")}
    expected, metrics = reference_loss(*policy_args(b), **model_ref(b), ignore_index=-1)
    out = tpo_loss(*policy_args(b), **ref, ignore_index=-1, backend="torch", grad_mode=grad_mode)
    _close(out.loss, expected)
    for k, v in metrics.items():
        _close(out.metrics[k], v)


OPTIONS = [
    {"loss_type": "hinge", "beta": 0.7, "offset": 0.3},
    {"loss_type": "ipo", "beta": 0.3, "offset": 0.3},
    {"loss_type": "sigmoid", "label_smoothing": 0.2, "offset": 0.3},
    {"loss_type": "sigmoid", "offset": 1.0, "average_log_prob": True},
]


@pytest.mark.parametrize("grad_mode", ["fused", "recompute"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options_reach_the_loss_with_the_in_model_reference(grad_mode, options):
    b = batch(seed=6)
    leaves = [b[k].clone().requires_grad_() for k in ("weight", "hidden", "corrupted_hidden", "bias")]
    w, h, hc, bias = leaves
    expected, metrics = reference_loss(w, h, hc, b["targets"], bias, **model_ref(b), **options)
    expected_grads = torch.autograd.grad(expected, leaves)
    out = tpo_loss(w, h, hc, b["targets"], bias, **model_ref(b), **options, backend="torch", grad_mode=grad_mode)
    _close(out.loss, expected)
    for k, v in metrics.items():
        _close(out.metrics[k], v)
    for got, want in zip(torch.autograd.grad(out.loss, leaves), expected_grads, strict=True):
        _close(got, want)


def test_recording_the_lower_layer(monkeypatch):
    """backend and ignore_index reach `fused_pair_loss` (fused) and `token_stats` (recompute, reference). The
    fused path scores an in-model reference in its own pass (`reference=`), not in a `token_stats` call."""
    calls = []
    record_calls(monkeypatch, tpo_module, ("fused_pair_loss", "token_stats"), calls)

    def seen():  # (function, backend, ignore_index) of each call since the last look
        out = [(name, a["backend"], a["ignore_index"]) for name, a in calls]
        calls.clear()
        return out

    b = batch(seed=7, ignore_index=-7)
    tpo_loss(*policy_args(b), **model_ref(b), ignore_index=-7, backend="torch")
    branch = calls[0][1]["reference"]
    ref = model_ref(b)
    assert branch.hidden.equal(ref["ref_hidden"].flatten(0, 1))
    assert branch.corrupted_hidden.equal(ref["ref_corrupted_hidden"].flatten(0, 1))
    assert seen() == [("fused_pair_loss", "torch", -7)]
    tpo_loss(*policy_args(b), **model_ref(b), ignore_index=-7, backend="torch", grad_mode="recompute")
    assert seen() == [("token_stats", "torch", -7), ("token_stats", "torch", -7)]
    tpo_loss(*policy_args(b), ref_seq_scores=RSEQ, ignore_index=-7, backend="torch", grad_mode="recompute")
    assert seen() == [("token_stats", "torch", -7)]
    reference_sequence_scores(*policy_args(b), ignore_index=-7, backend="reference")
    assert seen() == [("token_stats", "reference", -7)]


def test_recompute_on_the_reference_backend_allows_double_backward():
    b = batch(seed=8)
    h = b["hidden"].clone().requires_grad_()
    out = tpo_loss(b["weight"], h, b["corrupted_hidden"], b["targets"], b["bias"], ref_seq_scores=RSEQ,
                   backend="reference", grad_mode="recompute")
    (g,) = torch.autograd.grad(out.loss, h, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), h)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# Device placement: what the loss builds itself follows its inputs, not torch's default device.


def test_rows_of_a_chunk_are_its_chosen_then_rejected_sequences():
    mask = torch.ones(4, 3, dtype=torch.bool)
    grid = torch.zeros(4, 3)
    chunk = PairChunk(1, 3, 4, grid, grid, None, None, mask)  # pairs 1, 2 of 4: sequences 1, 2 and 5, 6
    per_seq = torch.arange(8.0) * 10
    assert chunk.rows_of(per_seq).tolist() == [10.0, 20.0, 50.0, 60.0]
    with torch.device("meta"):  # a default device other than the inputs' (e.g. torch.set_default_device("cuda"))
        rows = chunk.rows_of(per_seq)
    assert rows.device == per_seq.device and rows.tolist() == [10.0, 20.0, 50.0, 60.0]


def test_list_reference_scores_follow_the_inputs_not_the_default_device():
    lp, s, mask, _, _ = logprob_inputs()
    ref = [0.1, -0.2, 0.3, 0.4]
    expected = dpo_oracle(weighted_scores(lp, s, mask, "tpo", 0.5, False), torch.tensor(ref))
    with torch.device("meta"):
        out = tpo_loss_from_logprobs(lp, s, mask, ref_seq_scores=ref)
    _close(out.loss, expected)
    b = batch(seed=9)
    expected, _, _ = reference_scores(*policy_args(b), "tpo", 0.5, False, IGNORE)
    expected = dpo_oracle(expected, torch.tensor(ref))
    with torch.device("meta"):
        out = tpo_loss(*policy_args(b), ref_seq_scores=ref, backend="torch", grad_mode="recompute")
    _close(out.loss, expected)
