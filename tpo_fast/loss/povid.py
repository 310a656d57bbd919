"""POVID (arXiv 2402.11411, github YiyangZhou/POVID) on the fused token primitive.

Stage 1 is plain DPO on (ground truth, hallucination-injected answer): `tpo_fast.loss.dpo_loss`.
Stage 2, as the official trainer (`tool/dpo_trainer_inherent.py`) computes it, adds a second
dispreferred sequence made by the model itself. For the chosen text teacher-forced on the
**corrupted** image it takes per position the argmax token

    a_t = argmax_v z~_t[v]

and scores that token sequence under the **clean** image, with the same logsumexp as the chosen
log-probs (the official gathers `a_t` from `chosen_logits.log_softmax(-1)`):

    logp(a_t) = z_t[a_t] - lse_t,      S_n = sum_t m_t logp(a_t)     (m_t: the chosen tokens' mask)
    loss = w * DPO(S_w vs S_n) + (1 - w) * DPO(S_w vs S_l),          w = noise_weight = 0.5

The reference computes its own argmax on its own corrupted branch. Nothing of size N x V exists:
the argmax comes from the primitive's vocabulary sweep over the corrupted rows (no gradient, the
official's `torch.max` has none either), `z_t[a_t]` is the O(N D) gather `target_logits`, and
`lse_t` is the differentiable logsumexp returned by the same `token_stats` call that gives the
chosen log-probs. Like the official code, `a_t` may equal the chosen token `y_t`.

Metrics: "rewards/*" come from the hallucinated pair (what the official logs), "rewards_noisy/*"
from the noisy pair; "logps/{chosen,rejected,noisy}" and "noisy/argmax_match" (the fraction of
chosen tokens whose corrupted-image argmax is the chosen token itself).

`grad_mode="fused"` (what the default "auto" runs, except for fp16 on the triton backend) computes the
loss and its gradient in one pass over whole pairs (the noisy argmax is a second target of the chosen rows,
scored against the same clean softmax);
`"recompute"` builds it on `token_stats` and `target_logits` with their recomputing backward.

Training: `TPOTrainer` with `TPOConfig(objective="povid", povid_noise_weight=0.5)` runs `povid_loss`
inside the wrapped model's forward (`tpo_fast.trainer.model.policy_loss`); `tpo_fast.methods.povid_step`
is that same step for one batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from tpo_fast.loss._checks import (
    LossOutput,
    _shape,
    as_scores,
    check_flags,
    check_kernel_options,
    check_loss_options,
    check_tensors,
    integer_targets,
    real_scalar,
    reference_names,
    rows,
)
from tpo_fast.loss.pairs import pair_losses, reward_metrics
from tpo_fast.ops import resolve_backend, target_logits, token_stats
from tpo_fast.ops._compile import eager_under_compile
from tpo_fast.ops._validate import check_float, check_primitive_inputs, out_of_range
from tpo_fast.ops.fused_pairs import PairChunk, count_rows_per_sequence, fused_pair_loss, uses_fused_gradient
from tpo_fast.ops.token_logprobs import valid_row_index


def _check_targets(targets: object) -> tuple[int, int]:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 2 or targets.shape[0] % 2 != 0 or targets.shape[0] == 0:
        raise ValueError(
            f"targets must be 2-D (2B, T): B chosen rows, then B hallucinated (rejected) rows, got {_shape(targets)}"
        )
    integer_targets(targets)
    return targets.shape[0] // 2, targets.shape[1]


def _povid_rows(hidden, corrupted_hidden, n_pairs: int, n_tok: int, weight=None,
                names=("hidden", "corrupted_hidden")) -> tuple[torch.Tensor, torch.Tensor]:
    h = rows(names[0], hidden, 2 * n_pairs, n_tok, weight=weight)
    hc = rows(names[1], corrupted_hidden, n_pairs, n_tok, label="B",
              hint="; corrupted hidden states cover the B chosen rows only", weight=weight)
    if hc.shape[1] != h.shape[1]:
        raise ValueError(f"{names[1]} must have the hidden size {h.shape[1]} of {names[0]}, got {_shape(hc)}")
    if isinstance(weight, torch.Tensor):
        # the corrupted rows' dtype and device against the weight's here, where the error can name them (the argmax
        # sweep would call them `hidden`); the clean rows' where the primitives' checks run
        check_float(names[1], corrupted_hidden)
        if hc.dtype != weight.dtype:
            raise TypeError(f"{names[1]} must have the lm_head weight's dtype ({weight.dtype}), got "
                            f"{_shape(corrupted_hidden)}; e.g. {names[1]}.to(weight.dtype)")
        if hc.device != weight.device:
            raise ValueError(f"{names[1]} is on {hc.device} but the lm_head weight is on {weight.device}; move it "
                             "there first")
    return h, hc


def no_noisy_token(ignore_index: int) -> int:
    """The noisy sequence's "no token here" marker: `ignore_index` when it is negative (no argmax can
    equal it), else -1. A non-negative ignore_index (e.g. a pad id) is a real token id that the argmax
    may equal, and such an argmax token is scored like any other."""
    return ignore_index if ignore_index < 0 else -1


class _Rows(NamedTuple):
    """The target-carrying rows of a POVID batch from one read-back (which also checks the targets' range), shared
    by every primitive call of the loss, so that none reads the device back again."""

    per_sequence: tuple[int, ...]  # (2B,) counts: the fused pass's plan
    all: torch.Tensor  # ascending flat indices into the (2B*T) rows
    chosen: torch.Tensor  # those among the B chosen sequences' rows (a prefix of `all`)


def _target_rows(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> _Rows:
    n_pairs = targets.shape[0] // 2
    valid = targets != ignore_index
    flat = targets.reshape(-1)
    check = (flat, out_of_range(flat, valid.reshape(-1), vocab_size), ignore_index, "targets")
    per_seq = tuple(count_rows_per_sequence(valid, vocab_size, [check]))  # the one host sync of the loss
    rows = valid_row_index(valid, sum(per_seq))
    return _Rows(per_seq, rows, rows[: sum(per_seq[:n_pairs])])


def _read_rows(weight, h, targets, bias, ignore_index: int, backend: str) -> _Rows | None:
    """The batch's `_Rows` (None on the reference backend, which compacts nothing), after the input checks the
    first primitive call would make, so that a bad input gets its own error before the read-back touches it."""
    check_primitive_inputs(h, weight, targets.reshape(-1), bias)
    if resolve_backend(backend, h.device) == "reference":
        return None
    return _target_rows(targets.long(), weight.shape[0], ignore_index)


def noisy_argmax(weight, corrupted_hidden, chosen_targets, bias, ignore_index: int, backend: str,
                 valid_rows: torch.Tensor | None = None) -> torch.Tensor:
    """(B*T,) argmax of the corrupted-image logits of the chosen rows (`no_noisy_token(ignore_index)`
    where the chosen token is ignored), from one no-grad vocabulary sweep: POVID's noisy sequence.
    `valid_rows`: the chosen rows that carry a target, when the caller has read them back (`token_stats`)."""
    with torch.no_grad():
        argmax = token_stats(
            corrupted_hidden.detach(), weight.detach(), chosen_targets, bias=None if bias is None else bias.detach(),
            ignore_index=ignore_index, return_argmax=True, backend=backend, valid_rows=valid_rows, check_rows=False,
        ).argmax
    none = no_noisy_token(ignore_index)
    return torch.where(chosen_targets != ignore_index, argmax, torch.full_like(argmax, none))


def check_povid_options(noise_weight: float) -> None:
    """Raise ValueError unless `noise_weight` lies in [0, 1]."""
    noise_weight = real_scalar("noise_weight", noise_weight)
    if not math.isfinite(noise_weight) or not 0 <= noise_weight <= 1:
        raise ValueError(
            f"noise_weight must lie in [0, 1] (the official POVID uses 0.5; 0 is plain DPO), got {noise_weight!r}"
        )


@eager_under_compile  # one read-back shared by its primitive calls: not for Dynamo to trace
def povid_sequence_scores(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    corrupted_hidden: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sequence scores `(S_w, S_l, S_n)` stacked as one fp32 (3B,) tensor, differentiable.

    Args:
        weight: (V, D) lm_head weight; bias: optional (V,).
        hidden: (2B, T, D) or (2B*T, D) hidden states on the clean image, B chosen rows then B
            hallucinated rows.
        corrupted_hidden: (B, T, D) or (B*T, D) hidden states of the B chosen rows on the corrupted
            image (only their per-row argmax is used: no gradient reaches them).
        targets: (2B, T) shifted targets, `ignore_index` outside the responses.
        average_log_prob: divide each score by its number of response tokens (official: False).

    Returns:
        (scores, extras): scores = cat(S_w (B,), S_l (B,), S_n (B,)); extras holds the detached
        per-token "argmax" (B, T) (-1 at ignored positions) for diagnostics.
    """
    check_flags(average_log_prob=average_log_prob)
    n_pairs, n_tok = _check_targets(targets)
    h, hc = _povid_rows(hidden, corrupted_hidden, n_pairs, n_tok, weight)
    return _sequence_scores(weight, h, hc, targets, bias, None, average_log_prob, ignore_index, backend)


def _sequence_scores(weight, h, hc, targets, bias, rows: _Rows | None, average_log_prob: bool, ignore_index: int,
                     backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`povid_sequence_scores` on flattened rows; `rows` (None: read back here) spares its three primitive calls
    their own read-backs."""
    n_pairs, n_tok = targets.shape[0] // 2, targets.shape[1]
    flat = targets.reshape(-1).long()
    if rows is None:
        rows = _read_rows(weight, h, targets, bias, ignore_index, backend)
    n_chosen = n_pairs * n_tok
    chosen_flat = flat[:n_chosen]
    valid = (targets != ignore_index)
    all_rows, chosen_rows = (None, None) if rows is None else (rows.all, rows.chosen)

    # Clean branch, chosen and hallucinated rows: logp and the differentiable lse in one sweep.
    # its own count of the rows (`check_rows=False`: no device checks of what it made itself)
    stats = token_stats(h, weight, flat, bias=bias, ignore_index=ignore_index, backend=backend, valid_rows=all_rows,
                        check_rows=False)
    chosen_valid = chosen_flat != ignore_index
    noisy_targets = noisy_argmax(weight, hc, chosen_flat, bias, ignore_index, backend, chosen_rows)
    # Second gather from the same lse: logp(a_t) = z_t[a_t] - lse_t under the clean image. Its targets carry a
    # token exactly where the chosen ones do (an argmax is always in range).
    z_noisy = target_logits(h[:n_chosen], weight, noisy_targets, bias=bias, ignore_index=no_noisy_token(ignore_index),
                            backend=backend, valid_rows=chosen_rows, check_rows=False)
    zero = torch.zeros((), dtype=torch.float32, device=h.device)
    logp_noisy = torch.where(chosen_valid, z_noisy - stats.lse[:n_chosen], zero)

    logp = torch.where(valid.reshape(-1), stats.logprobs, zero).view(2 * n_pairs, n_tok)
    logp_noisy = logp_noisy.view(n_pairs, n_tok)
    scores = torch.cat([logp.sum(-1), logp_noisy.sum(-1)])
    if average_log_prob:
        counts = valid.sum(-1)
        counts = torch.cat([counts, counts[:n_pairs]]).clamp(min=1)
        scores = scores / counts
    extras = {"argmax": noisy_targets.view(n_pairs, n_tok).masked_fill(~valid[:n_pairs], -1)}
    return scores, extras


@eager_under_compile  # one read-back shared by its primitive calls: not for Dynamo to trace
def povid_reference_scores(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    corrupted_hidden: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """The reference's (3B,) `(S_w, S_l, S_n)` under `no_grad`, with its own argmax; pass as `ref_seq_scores`.

    Same inputs as `povid_sequence_scores`. Caching these is exact only when the corrupted image is
    seeded per example (the official draws fresh noise at every load).
    """
    check_flags(average_log_prob=average_log_prob)
    n_pairs, n_tok = _check_targets(targets)
    h, hc = _povid_rows(hidden, corrupted_hidden, n_pairs, n_tok, weight)
    return _reference_scores(weight, h, hc, targets, bias, None, average_log_prob, ignore_index, backend)


def _reference_scores(weight, h, hc, targets, bias, rows, average_log_prob, ignore_index, backend) -> torch.Tensor:
    with torch.no_grad():
        return _sequence_scores(weight, h, hc, targets, bias, rows, average_log_prob, ignore_index, backend)[0]


def _check_reference_form(ref: dict, reference_free: bool) -> None:
    """Exactly one reference form (or none with `reference_free`), before any device work."""
    given = [n for n in ("ref_hidden", "ref_seq_scores") if ref[n] is not None]
    if ref["ref_corrupted_hidden"] is not None and ref["ref_hidden"] is None:
        raise ValueError("ref_corrupted_hidden was given without ref_hidden; pass both")
    if (ref["ref_weight"] is not None or ref["ref_bias"] is not None) and ref["ref_hidden"] is None:
        raise ValueError("ref_weight/ref_bias only apply to ref_hidden; drop them when passing ref_seq_scores")
    if reference_free and given:
        raise ValueError(
            f"reference_free=True but reference inputs were given ({', '.join(given)}); "
            "drop them or set reference_free=False"
        )
    if not reference_free and len(given) != 1:
        raise ValueError(
            "give exactly one reference: ref_hidden with ref_corrupted_hidden (the reference takes its own "
            "argmax), or ref_seq_scores (3B,) from povid_reference_scores, or set reference_free=True; "
            f"got {given or 'none'}"
        )


def _povid_reference(weight, bias, targets, ref: dict, opts: dict, rows: _Rows | None) -> torch.Tensor | None:
    """The (3B,) reference scores from `ref_hidden` + `ref_corrupted_hidden` (on the policy's `rows`) or
    `ref_seq_scores`, of a form `_check_reference_form` accepted."""
    n_pairs = targets.shape[0] // 2
    if ref["ref_seq_scores"] is not None:
        return as_scores("ref_seq_scores", ref["ref_seq_scores"], 3 * n_pairs, targets.device, label="3B")
    if ref["ref_hidden"] is None:
        return None
    if ref["ref_corrupted_hidden"] is None:
        raise ValueError("ref_hidden needs ref_corrupted_hidden: the reference scores its own noisy argmax")
    ref_w = weight if ref["ref_weight"] is None else ref["ref_weight"]
    ref_b = bias if ref["ref_bias"] is None else ref["ref_bias"]
    if ref_w.shape != weight.shape:
        raise ValueError(f"ref_weight must have the (V, D) shape of weight {tuple(weight.shape)}, got {_shape(ref_w)}")
    n_pairs, n_tok = targets.shape[0] // 2, targets.shape[1]
    ref_h, ref_hc = _povid_rows(ref["ref_hidden"], ref["ref_corrupted_hidden"], n_pairs, n_tok, ref_w,
                                ("ref_hidden", "ref_corrupted_hidden"))
    # checked here, named after the reference's own arguments (the policy's read-back counted the same targets)
    check_primitive_inputs(ref_h, ref_w, targets.reshape(-1), ref_b, names=reference_names(ref["ref_weight"],
                                                                                           ref["ref_bias"]))
    return _reference_scores(ref_w, ref_h, ref_hc, targets, ref_b, rows, **opts)


def _objective(s_w, s_l, s_n, r_w, r_l, r_n, noise_weight: float, dpo: dict) -> torch.Tensor:
    """Per-pair `w DPO(w vs noisy) + (1 - w) DPO(w vs hallucinated)` (reference terms may be None: 0)."""
    zero = torch.zeros_like(s_w)
    r_w, r_l, r_n = (zero if r is None else r for r in (r_w, r_l, r_n))
    noisy = pair_losses(torch.cat([s_w, s_n]), torch.cat([r_w, r_n]), **dpo)
    halluc = pair_losses(torch.cat([s_w, s_l]), torch.cat([r_w, r_l]), **dpo)
    return noise_weight * noisy + (1 - noise_weight) * halluc


def _fused_scores(weight, h, hc, targets, bias, ref_scores, noise_weight, dpo, rows: _Rows, average_log_prob,
                  ignore_index, backend):
    """(loss, detached (3B,) scores, (B, T) argmax) from one fused pass over the clean rows; `rows` spares the
    argmax sweep and the pass their read-backs."""
    n_pairs, n_tok = targets.shape[0] // 2, targets.shape[1]
    flat = targets.reshape(-1).long()
    noisy = noisy_argmax(weight, hc, flat[: n_pairs * n_tok], bias, ignore_index, backend, rows.chosen)
    none = no_noisy_token(ignore_index)
    second = torch.cat([noisy, torch.full_like(noisy, none)]).view(targets.shape)
    counts = (targets != ignore_index).sum(-1).clamp(min=1).float()

    def scores_of(logp, logp2, c):
        s, s_n = logp.sum(-1), logp2[: logp2.shape[0] // 2].sum(-1)
        if average_log_prob:
            n = counts if c is None else c.rows_of(counts)
            s, s_n = s / n, s_n / n[: n.shape[0] // 2]
        return s, s_n

    def chunk_loss(c: PairChunk) -> torch.Tensor:
        (s, s_n), p = scores_of(c.logprobs, c.second_logprobs, c), c.stop - c.first
        ref = (None,) * 3
        if ref_scores is not None:  # (3B,): chosen, rejected, noisy; the chunk's pairs of each
            ref = tuple(ref_scores[k * c.n_pairs + c.first:k * c.n_pairs + c.stop] for k in range(3))
        return _objective(s[:p], s[p:], s_n, *ref, noise_weight, dpo).sum() / c.n_pairs

    out = fused_pair_loss(h, weight, targets, chunk_loss, bias=bias, second_targets=second,
                          ignore_index=ignore_index, backend=backend, second_ignore_index=none,
                          rows_per_sequence=rows.per_sequence, check_graph=False)
    s, s_n = scores_of(out.logprobs, out.second_logprobs, None)
    valid = targets[:n_pairs] != ignore_index
    return out.loss, torch.cat([s, s_n]), noisy.view(n_pairs, n_tok).masked_fill(~valid, -1)


def _metrics(scores, ref_scores, argmax, targets, n_pairs, beta: float, ignore_index) -> dict:
    """The rewards of both pairs (the hallucinated one's as "rewards/*", the noisy one's as "rewards_noisy/*"; no
    reference: zeros), the three sequences' mean log-probs and the argmax match, from the loss's own scores."""
    s_w, s_l, s_n = scores.detach().split(n_pairs)
    r_w, r_l, r_n = (torch.zeros_like(s_w),) * 3 if ref_scores is None else ref_scores.float().split(n_pairs)
    metrics = reward_metrics(torch.cat([s_w, s_l]), torch.cat([r_w, r_l]), beta)
    noisy = reward_metrics(torch.cat([s_w, s_n]), torch.cat([r_w, r_n]), beta)
    metrics.update({k.replace("rewards/", "rewards_noisy/"): v for k, v in noisy.items()})
    logps = scores.detach().float().view(3, n_pairs).mean(1)
    metrics["logps/chosen"], metrics["logps/rejected"], metrics["logps/noisy"] = logps.unbind()
    chosen_targets = targets[:n_pairs]
    valid = chosen_targets != ignore_index
    match = (argmax == chosen_targets) & valid
    metrics["noisy/argmax_match"] = match.sum().float() / valid.sum().clamp(min=1)
    return metrics


@eager_under_compile  # one read-back shared by its primitive calls: not for Dynamo to trace
def povid_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    corrupted_hidden: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_corrupted_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_seq_scores: torch.Tensor | None = None,
    beta: float = 0.1,
    noise_weight: float = 0.5,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    grad_mode: str = "auto",
) -> LossOutput:
    """POVID stage-2 loss: `w DPO(chosen vs noisy argmax) + (1 - w) DPO(chosen vs hallucinated)`.

    Args:
        weight: (V, D) policy lm_head weight; bias: optional (V,).
        hidden: (2B, T, D) or (2B*T, D) policy hidden states on the clean image: B chosen rows, then
            B hallucinated rows in the same pair order.
        corrupted_hidden: (B, T, D) or (B*T, D) policy hidden states of the chosen rows on the
            corrupted image (argmax only: they receive no gradient).
        targets: (2B, T) shifted targets; `ignore_index` (-100) on prompt, image and padding.
        Reference, exactly one form unless `reference_free` (no gradient either way):
          - ref_hidden (shape of hidden) and ref_corrupted_hidden (shape of corrupted_hidden), with
            ref_weight / ref_bias defaulting to weight / bias (LoRA);
          - ref_seq_scores: (3B,) precomputed `(S_w, S_l, S_n)`, see `povid_reference_scores`.
        beta: 0.1. noise_weight: `w` = 0.5 (official); 0 gives plain DPO.
        loss_type, label_smoothing, reference_free, average_log_prob: as for `tpo_fast.loss.dpo_loss`
            (the official uses "sigmoid" or "hinge", no smoothing, summed log-probs).
        ignore_index: -100. A non-negative one (a pad id) is a real token id: a noisy argmax equal to
            it is scored like any other token. backend: primitive backend ("auto", "triton", "torch",
            "reference").
        grad_mode: "auto" (default: "fused"; "recompute" for fp16 on triton), "fused" (gradient in the
            forward, backward once) or "recompute".

    Returns:
        `LossOutput(loss, metrics)`; see the module docstring for the metric names.
    """
    check_loss_options(beta, loss_type=loss_type, label_smoothing=label_smoothing)
    check_povid_options(noise_weight)
    check_flags(reference_free=reference_free, average_log_prob=average_log_prob)
    check_kernel_options(grad_mode, backend, ignore_index)
    check_tensors(weight=weight, bias=bias, ref_weight=ref_weight, ref_bias=ref_bias)
    if weight is None:
        raise TypeError("weight must be a torch.Tensor (the (V, D) lm_head weight), got None")
    n_pairs, n_tok = _check_targets(targets)
    h, hc = _povid_rows(hidden, corrupted_hidden, n_pairs, n_tok, weight)
    opts = dict(average_log_prob=average_log_prob, ignore_index=ignore_index, backend=backend)
    ref = dict(ref_hidden=ref_hidden, ref_corrupted_hidden=ref_corrupted_hidden, ref_weight=ref_weight,
               ref_bias=ref_bias, ref_seq_scores=ref_seq_scores)
    _check_reference_form(ref, reference_free)
    # the loss's one read-back: every primitive call below (policy and model reference) takes these rows
    rows = _read_rows(weight, h, targets, bias, ignore_index, backend)
    ref_scores = _povid_reference(weight, bias, targets, ref, opts, rows)
    w = real_scalar("noise_weight", noise_weight)
    dpo = dict(beta=real_scalar("beta", beta), loss_type=loss_type,
               label_smoothing=real_scalar("label_smoothing", label_smoothing))
    if uses_fused_gradient(grad_mode, backend, h.device, weight.dtype):  # never on the reference backend
        loss, scores, argmax = _fused_scores(weight, h, hc, targets, bias, ref_scores, w, dpo, rows, **opts)
    else:
        scores, extras = _sequence_scores(weight, h, hc, targets, bias, rows, **opts)
        argmax = extras["argmax"]
        r = (None,) * 3 if ref_scores is None else ref_scores.split(n_pairs)
        loss = _objective(*scores.split(n_pairs), *r, w, dpo).mean()
    with torch.no_grad():
        metrics = _metrics(scores, ref_scores, argmax, targets, n_pairs, dpo["beta"], ignore_index)
    return LossOutput(loss, metrics)
