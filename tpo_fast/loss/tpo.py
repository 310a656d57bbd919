"""TPO, Token Preference Optimization (arXiv 2412.14487): token-weighted DPO on the fused primitives.

Not TRL's `TPOTrainer`, which is *Triple* Preference Optimization (a different method, same acronym).

Layout of every batch: `2B` sequences, the `B` chosen ones first, then the `B` rejected ones in the
same pair order (TRL's concatenated DPO batch). Targets are already shifted: hidden row `t` of a
sequence predicts `targets[:, t]`; `ignore_index` marks prompt, image and padding.

Per response token with mask `m_t` (docs/math.md has the derivation):

    s_t = z_t[y_t] - z~_t[y_t]                     visual score (raw logits, clean minus corrupted)
    c_t = a + sigmoid(s_t)      (chosen)           self-calibrated token weight, offset a = 0.5
    c_t = a + 1 - sigmoid(s_t)  (rejected)
    S(y) = sum_t m_t (logp_t + log c_t)            (weighting="tpo"; "none" drops log c: plain DPO)
    l = (S_pi(y^w) - S_pi(y^l)) - (S_ref(y^w) - S_ref(y^l))
    loss = mean over pairs of -log sigmoid(beta * l)   (or hinge / ipo, with label smoothing)

`grad_mode="auto"` (default) is `"fused"`, the faster of the two as measured on the CPU and on an H200
(`"recompute"` for fp16 on the triton backend). `"fused"` computes the loss and its exact gradient in
one pass over whole pairs
(`tpo_fast.ops.fused_pair_loss`: 6NDV, no logits recompute); `"recompute"` builds the loss on the
per-token primitive `token_stats`, whose backward recomputes the logits (8NDV) and which supports
any downstream use. Both run `tpo_loss_from_logprobs`' math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpo_fast.loss._checks import (
    LossOutput,
    _shape,
    as_scores,
    check_flags,
    check_kernel_options,
    check_loss_options,
    check_real,
    check_targets,
    check_tensors,
    num_pairs,
    real_scalar,
    reference_names,
    rows,
    same_device,
    same_shape,
)
from tpo_fast.loss.pairs import (
    mean_visual_score,
    pair_losses,
    preference_loss_from_sequence_scores,
    reward_metrics,
    scores_of,
    sequence_scores,
    token_mask,
)
from tpo_fast.ops import token_stats
from tpo_fast.ops._validate import check_primitive_inputs
from tpo_fast.ops.fused_pairs import PairBranch, PairChunk, fused_pair_loss, uses_fused_gradient

_ROW_HINT = "; targets must be shifted so that hidden row t predicts targets[:, t]"


def _logprob_reference(ref_logprobs, ref_visual_scores, ref_seq_scores, m, weighting, offset, average_log_prob,
                       reference_free, name: str = "ref_logprobs") -> torch.Tensor | None:
    """The (2B,) reference scores of `tpo_loss_from_logprobs` from whichever form was given; `name`: what the
    caller calls `ref_logprobs` (`tpo_loss`: ref_token_logprobs), for the errors."""
    has_tokens = ref_logprobs is not None or ref_visual_scores is not None
    if reference_free:
        if has_tokens or ref_seq_scores is not None:
            raise ValueError(
                "reference_free=True but reference inputs were given; drop them or set reference_free=False"
            )
        return None
    if has_tokens and ref_seq_scores is not None:
        raise ValueError(
            "ambiguous reference: give either ref_seq_scores (2B,) or per-token "
            "ref_logprobs/ref_visual_scores (2B, T), not both"
        )
    if ref_seq_scores is not None:
        return as_scores("ref_seq_scores", ref_seq_scores, m.shape[0], m.device)
    if not has_tokens:
        raise ValueError(
            "reference inputs are missing: pass ref_seq_scores (2B,), or ref_logprobs and ref_visual_scores "
            "(2B, T), or set reference_free=True"
        )
    if ref_logprobs is None:
        raise ValueError("ref_visual_scores was given without ref_logprobs; pass both (2B, T) tensors")
    check_tensors(**{name: ref_logprobs, "ref_visual_scores": ref_visual_scores})
    check_real(**{name: ref_logprobs, "ref_visual_scores": ref_visual_scores})
    same_shape(name, ref_logprobs, m, "policy_logprobs")
    same_device(name, ref_logprobs, m.device)
    if ref_visual_scores is not None:
        same_shape("ref_visual_scores", ref_visual_scores, m, "policy_logprobs")
        same_device("ref_visual_scores", ref_visual_scores, m.device)
    elif weighting == "tpo":
        raise ValueError(
            f"weighting='tpo' needs ref_visual_scores (2B, T) with {name}: "
            "the reference weights its tokens with its own c^ref"
        )
    with torch.no_grad():
        vis = None if ref_visual_scores is None else ref_visual_scores.detach()
        return sequence_scores(ref_logprobs.detach(), vis, m, weighting, offset, average_log_prob)


def tpo_loss_from_logprobs(
    policy_logprobs: torch.Tensor,
    policy_visual_scores: torch.Tensor | None,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    ref_visual_scores: torch.Tensor | None = None,
    *,
    ref_seq_scores: torch.Tensor | None = None,
    beta: float = 0.1,
    weighting: str = "tpo",
    offset: float = 0.5,
    detach_weights: bool = False,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    average_log_prob: bool = False,
) -> LossOutput:
    """TPO (or, with `weighting="none"`, DPO) from precomputed per-token tensors.

    Args:
        policy_logprobs: (2B, T) `logp_t` of the policy on the clean image, chosen sequences first.
        policy_visual_scores: (2B, T) `s_t = z_t[y_t] - z~_t[y_t]` of the policy (raw logits), or None
            when `weighting="none"` (the visual-score metrics are then left out).
        mask: (2B, T) bool, True at response tokens (or 0 / 1 values; labels or token ids are refused).
        ref_logprobs, ref_visual_scores: (2B, T) the same for the reference model (no gradient), or
        ref_seq_scores: (2B,) its precomputed `S_ref` (a tensor or a list of numbers, e.g. from
            `reference_sequence_scores`); exactly one of the two forms unless `reference_free`.
        beta: 0.1 (any real scalar). weighting: "tpo" (default) or "none". offset: `a` = 0.5.
        detach_weights: False (the paper: gradients flow through `c`); True detaches `s`.
        loss_type: "sigmoid" (default), "hinge" or "ipo". label_smoothing: 0.0, in [0, 0.5], sigmoid only.
        reference_free: False; True sets the reference terms to 0.
        average_log_prob: False; True divides each `S` by its number of response tokens.

    Returns:
        `LossOutput(loss, metrics)`; metrics: "rewards/{chosen,rejected,margins,accuracies}" (rewards
        include the `log c` terms), "logps/{chosen,rejected}" (policy `sum_t m logp`, averaged over
        tokens when `average_log_prob`, no `log c`), and "visual_score/{chosen,rejected}" (the
        official per-sequence `sum m s / (sum m + 1e-8)`, batch mean) when policy visual scores exist.
    """
    check_loss_options(beta, weighting, offset, loss_type, label_smoothing)
    check_flags(detach_weights=detach_weights, reference_free=reference_free, average_log_prob=average_log_prob)
    if not isinstance(policy_logprobs, torch.Tensor) or policy_logprobs.dim() != 2:
        raise ValueError(f"policy_logprobs must be 2-D (2B, T), got {_shape(policy_logprobs)}")
    num_pairs(policy_logprobs.shape[0], "policy_logprobs")  # raises for an odd number of rows
    m = token_mask(mask, policy_logprobs, "policy_logprobs")
    if weighting == "tpo" and policy_visual_scores is None:
        raise ValueError(
            "weighting='tpo' needs policy_visual_scores (2B, T) from the corrupted-image branch; "
            "pass them or use weighting='none' (plain DPO)"
        )
    check_tensors(policy_visual_scores=policy_visual_scores)
    check_real(policy_logprobs=policy_logprobs, policy_visual_scores=policy_visual_scores)
    if policy_visual_scores is not None:
        same_shape("policy_visual_scores", policy_visual_scores, policy_logprobs, "policy_logprobs")
        same_device("policy_visual_scores", policy_visual_scores, policy_logprobs.device)
    ref_scores = _logprob_reference(ref_logprobs, ref_visual_scores, ref_seq_scores, m, weighting, offset,
                                    average_log_prob, reference_free)
    s = policy_visual_scores
    if s is not None and detach_weights:
        s = s.detach()
    policy_scores = sequence_scores(policy_logprobs, s, m, weighting, offset, average_log_prob)
    out = preference_loss_from_sequence_scores(
        policy_scores, ref_scores, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        reference_free=reference_free,
    )
    return LossOutput(out.loss, _token_metrics(out.metrics, policy_logprobs, policy_visual_scores, m, average_log_prob))


def _token_metrics(metrics: dict, logprobs: torch.Tensor, visual_scores: torch.Tensor | None, m: torch.Tensor,
                   average_log_prob: bool) -> dict:
    """`metrics` plus the policy's "logps/*" and (with visual scores) "visual_score/*" entries."""
    n_pairs = logprobs.shape[0] // 2
    with torch.no_grad():
        rows = [sequence_scores(logprobs.detach(), None, m, "none", average_log_prob=average_log_prob)]
        names = ["logps/chosen", "logps/rejected"]
        if visual_scores is not None:
            rows.append(mean_visual_score(visual_scores, m))
            names += ["visual_score/chosen", "visual_score/rejected"]
        # the chosen and rejected halves of each row, averaged together (one mean, not one per entry)
        means = torch.stack(rows).view(2 * len(rows), n_pairs).mean(1)
    metrics.update(zip(names, means.unbind(), strict=True))
    return metrics


def _branch_stats(weight, hidden, corrupted_hidden, targets, bias, ignore_index, backend, valid_rows=None,
                  check_rows=True):
    """(2B, T) fp32 logp and visual score `z - z~` (None without corrupted hidden) from one primitive call."""
    stats = token_stats(hidden, weight, targets.flatten(), bias=bias, corrupted_hidden=corrupted_hidden,
                        ignore_index=ignore_index, backend=backend, valid_rows=valid_rows, check_rows=check_rows)
    logp = stats.logprobs.view(targets.shape)
    s = None
    if stats.corrupted_target_logits is not None:
        s = (stats.target_logits - stats.corrupted_target_logits).view(targets.shape)
    return logp, s


def _branch_rows(hidden, corrupted_hidden, targets, weighting, names=("hidden", "corrupted_hidden"), weight=None):
    """Flattened (2B*T, D) clean and corrupted rows, checked against targets, `weight`'s D and each other."""
    n_seq, n_tok = targets.shape
    h = rows(names[0], hidden, n_seq, n_tok, hint=_ROW_HINT, weight=weight)
    if weighting == "tpo" and corrupted_hidden is None:
        if names[0] == "ref_hidden":
            raise ValueError("weighting='tpo' needs ref_corrupted_hidden with ref_hidden: "
                             "the reference weights its tokens with its own c^ref")
        raise ValueError(
            "corrupted_hidden is required when weighting='tpo' (hidden states of the same sequences on the "
            "corrupted image); use weighting='none' or dpo_loss for plain DPO"
        )
    hc = None
    if corrupted_hidden is not None:
        hc = rows(names[1], corrupted_hidden, n_seq, n_tok, hint=_ROW_HINT, weight=weight)
        if hc.shape != h.shape:
            raise ValueError(f"{names[1]} must have the shape of hidden {tuple(hidden.shape)}, "
                             f"got {_shape(corrupted_hidden)}")
    return h, hc


def reference_sequence_scores(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    corrupted_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    weighting: str = "tpo",
    offset: float = 0.5,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    valid_rows: torch.Tensor | None = None,
    check_rows: bool = True,
) -> torch.Tensor:
    """The reference model's `S_ref` per sequence, fp32 (2B,), under `torch.no_grad()`.

    What a trainer computes once and caches (exact when the corrupted image is seeded per example),
    then passes as `ref_seq_scores`. Same inputs and options as the policy side of `tpo_loss`:
    weight (V, D), hidden and corrupted_hidden (2B, T, D) or (2B*T, D), targets (2B, T), bias (V,).
    `corrupted_hidden` may be None only when `weighting="none"`. `valid_rows`: the flat indices of the targets
    that are not `ignore_index`, counted and range-checked by the caller (`tpo_fast.token_stats`'s), so that the
    call reads nothing back from the device (a trainer's host copy of its labels holds the count); `check_rows`: as
    for `token_stats` (checked on the device unless False).
    """
    check_loss_options(0.1, weighting, offset)
    check_flags(average_log_prob=average_log_prob)
    check_kernel_options("fused", backend, ignore_index)
    targets = check_targets(targets)
    h, hc = _branch_rows(hidden, corrupted_hidden if weighting == "tpo" else None, targets, weighting, weight=weight)
    with torch.no_grad():
        logp, s = _branch_stats(weight, h, hc, targets, bias, ignore_index, backend, valid_rows, check_rows)
        return scores_of(logp, s, targets != ignore_index, weighting, float(offset), bool(average_log_prob))


@dataclass(frozen=True)
class _Options:
    beta: float
    weighting: str
    offset: float
    detach_weights: bool
    loss_type: str
    label_smoothing: float
    reference_free: bool
    average_log_prob: bool
    ignore_index: int
    backend: str
    grad_mode: str


def _visual(z: torch.Tensor, zc: torch.Tensor | None, o: _Options) -> torch.Tensor | None:
    return z - zc if o.weighting == "tpo" else None


def _fused(weight, h, hc, targets, bias, reference, o: _Options) -> LossOutput:
    """The loss and its gradient from one pass (`fused_pair_loss`); metrics from the detached grids.

    `reference`: the (2B,) reference scores, None (reference-free), or a `PairBranch` (a model reference's
    hidden states), which the same pass scores chunk by chunk, within its one host read-back."""
    branch = reference if isinstance(reference, PairBranch) else None
    ref_scores = None if branch is not None else reference
    parts = []  # each chunk's detached (first, stop, policy scores, reference scores): the metrics' rewards

    def chunk_loss(c: PairChunk) -> torch.Tensor:
        s = None
        if o.weighting == "tpo":
            s = c.target_logits - c.corrupted_target_logits
            s = s.detach() if o.detach_weights else s
        scores = scores_of(c.logprobs, s, c.mask, o.weighting, o.offset, o.average_log_prob)
        if branch is not None:
            ref_s = _visual(c.ref_target_logits, c.ref_corrupted_target_logits, o)
            ref = scores_of(c.ref_logprobs, ref_s, c.mask, o.weighting, o.offset, o.average_log_prob)
        else:
            ref = torch.zeros_like(scores) if ref_scores is None else c.rows_of(ref_scores)
        parts.append((c.first, c.stop, scores.detach(), ref))
        return pair_losses(scores, ref, o.beta, o.loss_type, o.label_smoothing).sum() / c.n_pairs

    out = fused_pair_loss(h, weight, targets, chunk_loss, bias=bias, corrupted_hidden=hc,
                          ignore_index=o.ignore_index, backend=o.backend, reference=branch, check_graph=False)
    # the metrics from the scores the chunks computed (none recomputed from the grids; reference-free: zeros)
    policy_scores, chunk_ref = (_batch_order(parts, k) for k in (2, 3))
    s_full = None if out.corrupted_target_logits is None else out.target_logits - out.corrupted_target_logits
    metrics = _token_metrics(reward_metrics(policy_scores, chunk_ref, o.beta), out.logprobs, s_full,
                             targets != o.ignore_index, o.average_log_prob)
    return LossOutput(out.loss, metrics)


def _batch_order(parts: list, k: int) -> torch.Tensor:
    """Entry k of each chunk's (first, stop, policy scores, reference scores), as one (2B,) tensor in batch order
    (the chunks' chosen sequences, then their rejected ones)."""
    if len(parts) == 1:  # one chunk of every pair: already in batch order
        return parts[0][k]
    sizes = [stop - first for first, stop, *_ in parts]
    return torch.cat([p[k][:n] for p, n in zip(parts, sizes, strict=True)]
                     + [p[k][n:] for p, n in zip(parts, sizes, strict=True)])


def _check_reference_form(given, reference_free, ref_visual_scores, ref_token_logprobs, ref_corrupted_hidden,
                          ref_hidden, ref_weight, ref_bias) -> None:
    if ref_visual_scores is not None and ref_token_logprobs is None:
        raise ValueError("ref_visual_scores was given without ref_token_logprobs; pass both (2B, T) tensors")
    if ref_corrupted_hidden is not None and ref_hidden is None:
        raise ValueError("ref_corrupted_hidden was given without ref_hidden; pass both")
    if (ref_weight is not None or ref_bias is not None) and ref_hidden is None:
        raise ValueError("ref_weight/ref_bias only apply to ref_hidden; drop them when passing precomputed scores")
    if reference_free:
        if given:
            raise ValueError(
                f"reference_free=True but reference inputs were given ({', '.join(given)}); "
                "drop them or set reference_free=False"
            )
    elif len(given) > 1:
        raise ValueError(
            f"ambiguous reference: got {', '.join(given)}; give exactly one of ref_hidden "
            "(+ ref_corrupted_hidden), ref_seq_scores, or ref_token_logprobs (+ ref_visual_scores)"
        )
    elif not given:
        raise ValueError(
            "reference inputs are missing: pass ref_hidden (+ ref_corrupted_hidden for weighting='tpo'), "
            "ref_seq_scores (2B,), or ref_token_logprobs (+ ref_visual_scores), or set reference_free=True"
        )


def _model_reference(weight, bias, h, targets, ref, o: _Options, as_branch: bool = False):
    """(2B,) reference scores from whichever reference form `ref` (a dict of the ref_* arguments) holds;
    None when reference-free. With `as_branch`, a model reference (ref_hidden) comes back unscored, as the
    `PairBranch` that the fused pass scores on its own rows."""
    given = [k for k in ("ref_hidden", "ref_seq_scores", "ref_token_logprobs") if ref[k] is not None]
    for name in ("ref_token_logprobs", "ref_visual_scores"):
        t = ref[name]
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != targets.shape):
            raise ValueError(f"{name} must be (2B, T) = {tuple(targets.shape)} like targets, got {_shape(t)}")
    _check_reference_form(given, o.reference_free, ref["ref_visual_scores"], ref["ref_token_logprobs"],
                          ref["ref_corrupted_hidden"], ref["ref_hidden"], ref["ref_weight"], ref["ref_bias"])
    mask = targets != o.ignore_index
    if o.reference_free:
        return None
    if ref["ref_seq_scores"] is not None:
        return as_scores("ref_seq_scores", ref["ref_seq_scores"], targets.shape[0], targets.device)
    if ref["ref_token_logprobs"] is not None:
        return _logprob_reference(ref["ref_token_logprobs"], ref["ref_visual_scores"], None, mask, o.weighting,
                                  o.offset, o.average_log_prob, False, name="ref_token_logprobs")
    ref_w = weight if ref["ref_weight"] is None else ref["ref_weight"]
    ref_b = bias if ref["ref_bias"] is None else ref["ref_bias"]
    if ref_w.shape != weight.shape:
        raise ValueError(f"ref_weight must have the (V, D) shape of weight {tuple(weight.shape)}, got {_shape(ref_w)}")
    if rows("ref_hidden", ref["ref_hidden"], *targets.shape, hint=_ROW_HINT).shape != h.shape:
        raise ValueError(f"ref_hidden must have the shape of hidden {tuple(h.shape)}, got {_shape(ref['ref_hidden'])}")
    rh, rhc = _branch_rows(ref["ref_hidden"], ref["ref_corrupted_hidden"] if o.weighting == "tpo" else None,
                           targets, o.weighting, names=("ref_hidden", "ref_corrupted_hidden"), weight=ref_w)
    # named after the reference's own arguments on both paths: the fused pass checks its branch under these names
    names = reference_names(ref["ref_weight"], ref["ref_bias"])
    if as_branch:
        return PairBranch(*(None if t is None else t.detach() for t in (rh, ref_w, ref_b, rhc)), names=names)
    check_primitive_inputs(rh, ref_w, targets.reshape(-1), ref_b, rhc, names=names)
    with torch.no_grad():
        logp, s = _branch_stats(ref_w, rh, rhc, targets, ref_b, o.ignore_index, o.backend)
        return scores_of(logp, s, mask, o.weighting, o.offset, o.average_log_prob)


def tpo_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    corrupted_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_corrupted_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_seq_scores: torch.Tensor | None = None,
    ref_token_logprobs: torch.Tensor | None = None,
    ref_visual_scores: torch.Tensor | None = None,
    beta: float = 0.1,
    weighting: str = "tpo",
    offset: float = 0.5,
    detach_weights: bool = False,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    grad_mode: str = "auto",
) -> LossOutput:
    """Token Preference Optimization loss (arXiv 2412.14487) from final hidden states and the lm_head.

    Args:
        weight: (V, D) policy lm_head weight; bias: optional (V,).
        hidden: (2B, T, D) or (2B*T, D) policy hidden states on the clean image, B chosen sequences
            first, then B rejected. corrupted_hidden: the same on the corrupted image; None only when
            `weighting="none"` (when given there, it only feeds the visual-score metrics).
        targets: (2B, T) integer ids, already shifted (row t predicts targets[:, t]); `ignore_index`
            (-100) marks prompt, image and padding positions.
        Reference, exactly one form unless `reference_free` (all under `torch.no_grad()`):
          - ref_hidden and ref_corrupted_hidden (shapes of hidden; the corrupted one only for "tpo"),
            with ref_weight (defaults to `weight`, as with LoRA) and ref_bias (defaults to `bias`);
          - ref_seq_scores: (2B,) precomputed `S_ref` (see `reference_sequence_scores`);
          - ref_token_logprobs and ref_visual_scores: (2B, T) precomputed per-token tensors.
        beta, weighting, offset, detach_weights, loss_type, label_smoothing, reference_free,
        average_log_prob: see `tpo_loss_from_logprobs` (defaults 0.1, "tpo", 0.5, False, "sigmoid",
            0.0, False, False).
        ignore_index: -100. backend: primitive backend, "auto" (triton on CUDA, torch on CPU),
            "triton", "torch" or "reference".
        grad_mode: "auto" (default): "fused" (measured faster on the CPU and on an H200; "recompute" for fp16
            on the triton backend).
            "fused": the gradient is computed in the forward, chunk by chunk of whole
            pairs, and backward only scales it (no logits recompute; backward once, no double
            backward). "recompute": the per-token primitive's recomputing backward. The reference
            backend always differentiates through plain autograd.

    Returns:
        `LossOutput(loss, metrics)`, see `tpo_loss_from_logprobs`. With `detach_weights=False`
        gradients reach weight, bias, hidden and corrupted_hidden; the reference gets none.
    """
    check_loss_options(beta, weighting, offset, loss_type, label_smoothing)
    check_flags(detach_weights=detach_weights, reference_free=reference_free, average_log_prob=average_log_prob)
    check_kernel_options(grad_mode, backend, ignore_index)
    check_tensors(weight=weight, bias=bias, ref_weight=ref_weight, ref_bias=ref_bias)
    if weight is None:
        raise TypeError("weight must be a torch.Tensor (the (V, D) lm_head weight), got None")
    o = _Options(real_scalar("beta", beta), weighting, real_scalar("offset", offset), bool(detach_weights), loss_type,
                 real_scalar("label_smoothing", label_smoothing), bool(reference_free), bool(average_log_prob),
                 int(ignore_index), backend, grad_mode)
    targets = check_targets(targets)
    h, hc = _branch_rows(hidden, corrupted_hidden, targets, weighting, weight=weight)
    ref = dict(ref_hidden=ref_hidden, ref_corrupted_hidden=ref_corrupted_hidden, ref_weight=ref_weight,
               ref_bias=ref_bias, ref_seq_scores=ref_seq_scores, ref_token_logprobs=ref_token_logprobs,
               ref_visual_scores=ref_visual_scores)
    fused = uses_fused_gradient(o.grad_mode, o.backend, h.device, weight.dtype)
    ref_scores = _model_reference(weight, bias, h, targets, ref, o, as_branch=fused)
    if hc is not None and (weighting == "none" or detach_weights):
        # Out of the graph entirely: corrupted_hidden gets no gradient (None, not a zero buffer).
        hc = hc.detach()
    if fused:
        return _fused(weight, h, hc, targets, bias, ref_scores, o)
    policy_logprobs, policy_s = _branch_stats(weight, h, hc, targets, bias, ignore_index, backend)
    return tpo_loss_from_logprobs(
        policy_logprobs, policy_s, targets != ignore_index, ref_seq_scores=ref_scores, beta=o.beta,
        weighting=weighting, offset=o.offset, detach_weights=detach_weights, loss_type=loss_type,
        label_smoothing=o.label_smoothing, reference_free=reference_free, average_log_prob=average_log_prob,
    )
