"""Shared types and argument checks of the loss layer (every loss family uses these)."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from tpo_fast.ops import BACKENDS
from tpo_fast.ops._validate import _desc as _shape  # what an error says was given
from tpo_fast.ops._validate import check_ignore_index, is_token_id_dtype

WEIGHTINGS = ("tpo", "none")
LOSS_TYPES = ("sigmoid", "hinge", "ipo")
GRAD_MODES = ("auto", "fused", "recompute")


class LossOutput(NamedTuple):
    """What every loss returns.

    loss: fp32 scalar, the mean over pairs (differentiable).
    metrics: detached fp32 scalars keyed like TRL's DPO trainer logs ("rewards/chosen", ...).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def real_scalar(name: str, value: object) -> float:
    """`value` as a Python float when it is a real scalar (int, float, NumPy scalar, 0-d or 1-element
    real tensor; not bool), else a TypeError that says what to pass."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool:
            return float(value.detach().reshape(()).item())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    elif hasattr(value, "dtype") and getattr(value, "shape", None) == () and hasattr(value, "item"):
        item = value.item()  # a 0-d NumPy array
        if isinstance(item, numbers.Real) and not isinstance(item, bool):
            return float(item)
    raise TypeError(f"{name} must be a real number (int, float, NumPy scalar or 0-d tensor), got {_shape(value)}")


def check_loss_options(
    beta: float,
    weighting: str = "tpo",
    offset: float = 0.5,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> None:
    """Raise ValueError for an option outside its domain (TypeError for a non-number); the message says
    what to pass instead."""
    beta = real_scalar("beta", beta)
    if not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0 (TPO and DPO use 0.1), got {beta!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"weighting must be one of {WEIGHTINGS} ('tpo': token-weighted TPO, 'none': plain DPO), "
            f"got {weighting!r}"
        )
    check_offset(offset)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    check_label_smoothing(label_smoothing, loss_type)


def check_label_smoothing(label_smoothing: object, loss_type: str) -> float:
    """conservative DPO's `label_smoothing` as a float: TypeError for a non-number, ValueError outside [0, 0.5] or
    above 0 with a `loss_type` other than "sigmoid" (which has no such term and would drop it)."""
    label_smoothing = real_scalar("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(
            f"label_smoothing must lie in [0, 0.5] (the assumed probability that a pair's label is flipped), "
            f"got {label_smoothing!r}"
        )
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(
            f"label_smoothing only applies to loss_type='sigmoid' (conservative DPO), "
            f"got loss_type={loss_type!r} "
            f"with label_smoothing={label_smoothing}; set label_smoothing=0.0"
        )
    return label_smoothing


def check_offset(offset: object) -> float:
    """TPO's token-weight offset `a` as a float; TypeError for a non-number, ValueError outside [0, inf)."""
    offset = real_scalar("offset", offset)
    if not math.isfinite(offset) or offset < 0:
        raise ValueError(
            f"offset must be a finite number >= 0 (the paper uses 0.5, ablating 0, 0.5, 1), got {offset!r}"
        )
    return offset


def check_flags(**flags: object) -> None:
    """TypeError naming the first flag that is not True or False (a bool, a NumPy bool, or the int 0 or 1): a string
    such as "False" would otherwise count as true."""
    for name, value in flags.items():
        if isinstance(value, bool) or (str(getattr(value, "dtype", "")) == "bool" and getattr(value, "shape", 0) == ()):
            continue  # a bool, or a NumPy one
        if isinstance(value, numbers.Integral) and value in (0, 1):
            continue
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_kernel_options(grad_mode: str, backend: str, ignore_index: object) -> None:
    """Raise ValueError for an unknown `grad_mode` or `backend`, TypeError for a non-integer ignore_index."""
    if grad_mode not in GRAD_MODES:
        raise ValueError(
            f"grad_mode must be one of {GRAD_MODES} ('auto': fused, except fp16 on triton; 'fused': "
            f"gradient computed in the forward, no logits recompute; 'recompute': the per-token primitive's "
            f"backward), got {grad_mode!r}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_ignore_index(ignore_index)


def num_pairs(n_seq: int, what: str) -> int:
    if n_seq % 2 != 0 or n_seq == 0:
        raise ValueError(
            f"{what} must hold an even, non-zero number of sequences 2B (B chosen, then B rejected), "
            f"got {n_seq}"
        )
    return n_seq // 2


def as_scores(
    name: str, scores: object, n: int, device: torch.device | None = None, label: str = "2B"
) -> torch.Tensor:
    """Sequence scores of shape (n,) as a detached fp32 tensor; a list/tuple of numbers is accepted.

    A tensor must already be on `device` (that of the loss inputs, when given): it is not moved, and
    the error says so (a silent copy would hide a host-device transfer in every step).
    """
    if isinstance(scores, (list, tuple)):
        try:
            scores = torch.tensor([float(x) for x in scores], dtype=torch.float32, device=device)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a tensor or a list of {n} numbers") from None
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (or a list of numbers) of shape ({label},) = ({n},), "
                        f"got {_shape(scores)}")
    if scores.dtype.is_complex or scores.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers (a float tensor of shape ({label},) = ({n},)), got "
                        f"{_shape(scores)}")
    if scores.shape != (n,):
        raise ValueError(f"{name} must be of shape ({label},) = ({n},), got {_shape(scores)}")
    if device is not None:
        same_device(name, scores, torch.device(device))
    return scores.detach().float()


def same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    """Raise ValueError unless `t` lives on `device`, the device of the loss inputs."""
    if t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but the loss inputs are on {device}; move it there first "
            f"({name}.to({str(device)!r}))"
        )


def check_targets(targets: object) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 2:
        raise ValueError(
            f"targets must be 2-D (2B, T) (chosen sequences first, then rejected), got {_shape(targets)}"
        )
    integer_targets(targets)
    num_pairs(targets.shape[0], "targets")
    return targets


def integer_targets(targets: torch.Tensor, shape: str = "(2B, T)") -> None:
    """TypeError unless the targets hold integer token ids (not float, complex or bool); `shape` names their shape."""
    if not is_token_id_dtype(targets.dtype):
        raise TypeError(
            f"targets must be an integer tensor (int64) of token ids, shape {shape}, got {_shape(targets)}; "
            "e.g. targets.long()"
        )


def check_tensors(**named: object) -> None:
    """TypeError naming the first argument that is neither a torch.Tensor nor None (None: an optional input left
    out; required ones are checked where they are used)."""
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_real(**named: object) -> None:
    """TypeError naming the first tensor that does not hold floating-point values (None: left out). Per-token
    log-probabilities and scores of an integer or bool dtype are a mix-up (targets or a mask passed in their place),
    which would otherwise be summed as if they were log-probabilities."""
    for name, t in named.items():
        if isinstance(t, torch.Tensor) and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (log-probabilities or scores), got {_shape(t)}; "
                            "were token ids or a mask passed in its place?")


def rows(name: str, t: object, n_seq: int, n_tok: int, label: str = "2B", hint: str = "",
         weight: object = None) -> torch.Tensor:
    """(n_seq, n_tok, D) or (n_seq*n_tok, D) -> (n_seq*n_tok, D); `label` names n_seq in the error. With a 2-D
    `weight` (V, D), D must be its hidden size: checked here, before `t` is compared with another branch's rows,
    so that the error names the tensor that is wrong."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and t.dim() in (2, 3) and t.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name} must have the weight's hidden size D = {weight.shape[1]} (weight is "
                         f"{_shape(weight)}), got {_shape(t)}")
    if t.dim() == 3 and t.shape[:2] == (n_seq, n_tok):
        return t.flatten(0, 1)
    if t.dim() == 2 and t.shape[0] == n_seq * n_tok:
        return t
    raise ValueError(
        f"{name} must be ({label}, T, D) = ({n_seq}, {n_tok}, D) or ({label}*T, D) = ({n_seq * n_tok}, D) to "
        f"match the targets, got {_shape(t)}{hint}"
    )


def reference_names(ref_weight: object, ref_bias: object) -> dict[str, str]:
    """The names of a loss's reference inputs for `check_primitive_inputs`' errors: `ref_hidden`,
    `ref_corrupted_hidden`, and `ref_weight` / `ref_bias` where given (else the policy's `weight` / `bias`, which
    the reference then shares)."""
    return {"hidden": "ref_hidden", "corrupted_hidden": "ref_corrupted_hidden",
            "weight": "weight" if ref_weight is None else "ref_weight",
            "bias": "bias" if ref_bias is None else "ref_bias"}


def same_shape(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {_shape(t)}")
