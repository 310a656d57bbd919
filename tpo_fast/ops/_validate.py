"""Input checks shared by every backend: errors name the argument and say what to fix."""

from __future__ import annotations

import numbers

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _desc(t: object) -> str:
    """"bfloat16 of shape (2, 3)" for a tensor; the type's name for anything else (what an error says was given)."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{str(t.dtype).replace('torch.', '')} of shape {tuple(t.shape)}"


def is_token_id_dtype(dtype: torch.dtype) -> bool:
    """Whether a targets tensor of `dtype` holds integer token ids: any integer dtype, not float, complex or bool."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_float(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {_desc(t)}")
    return t


def check_ignore_index(ignore_index: object) -> int:
    """`ignore_index` as a plain int. TypeError unless it is an integer (not a bool): None or a float would compare
    unequal to every target and ignore nothing, or fail inside the kernels. ValueError outside int64 (the targets'
    dtype). Numpy integers pass and come back as int (Triton's launcher refuses them)."""
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int (default -100), got {ignore_index!r}")
    value = int(ignore_index)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (targets are int64), got {value}")
    return value


def check_primitive_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    corrupted_hidden: torch.Tensor | None = None,
    names: dict[str, str] | None = None,
) -> None:
    """Validate shapes, dtypes and devices of the token-log-prob primitives.

    hidden (N, D), weight (V, D), targets (N,) integer, bias (V,) or None,
    corrupted_hidden (N, D) or None. Target values are checked separately (they need a sync).
    `names`: what a caller calls these inputs, where not the names above (e.g. {"hidden": "ref_hidden"} for a
    loss's reference branch), so that an error names the argument the user passed.
    """
    n = {k: k for k in ("hidden", "weight", "targets", "bias", "corrupted_hidden")} | (names or {})
    hid, wt, tg, bs, ch = (n[k] for k in ("hidden", "weight", "targets", "bias", "corrupted_hidden"))
    check_float(hid, hidden)
    check_float(wt, weight)
    if hidden.dim() != 2:
        raise ValueError(f"{hid} must be 2-D (N, D), got {_desc(hidden)}; flatten (B, T, D) with .flatten(0, 1)")
    if weight.dim() != 2:
        raise ValueError(f"{wt} must be 2-D (V, D), got {_desc(weight)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{hid} and {wt} must share the hidden size D: {hid} is {_desc(hidden)}, {wt} is {_desc(weight)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{wt} must have at least one vocabulary row, got {_desc(weight)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"{hid} and {wt} must have the same dtype, got {hid} {_desc(hidden)} and {wt} {_desc(weight)}; "
            f"cast one of them (e.g. {hid}.to({wt}.dtype))"
        )
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{tg} must be a torch.Tensor, got {type(targets).__name__}")
    if not is_token_id_dtype(targets.dtype):
        raise TypeError(f"{tg} must be an integer tensor (int64) of shape (N,), got {_desc(targets)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"{tg} must be of shape (N,) = ({hidden.shape[0]},) to match {hid} {tuple(hidden.shape)}, "
            f"got {_desc(targets)}"
        )
    devices = {hid: hidden.device, wt: weight.device, tg: targets.device}
    if bias is not None:
        check_float(bs, bias)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bs} must be of shape (V,) = ({weight.shape[0]},), got {_desc(bias)}")
        devices[bs] = bias.device
    if corrupted_hidden is not None:
        check_float(ch, corrupted_hidden)
        if corrupted_hidden.shape != hidden.shape:
            raise ValueError(f"{ch} must have the shape of {hid} {tuple(hidden.shape)}, got {_desc(corrupted_hidden)}")
        if corrupted_hidden.dtype != hidden.dtype:
            raise TypeError(f"{ch} must have the dtype of {hid} ({hidden.dtype}), got {_desc(corrupted_hidden)}")
        devices[ch] = corrupted_hidden.device
    check_same_device(devices)


def check_same_device(devices: dict[str, torch.device]) -> None:
    """Raise if the named inputs do not all live on one device, or all live on the meta device (no values)."""
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all inputs must be on the same device, got {listing}")
    if any(v.type == "meta" for v in devices.values()):
        raise ValueError(
            "the inputs are on the meta device, which holds shapes but no values; materialize them (e.g. "
            "model.to_empty(device=...), then load the weights) before computing log-probs or a loss"
        )


def out_of_range(targets: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The device-side bool mask of the non-ignored targets outside [0, V): no host sync.

    Callers count it in the one read-back they make anyway (the rows that carry a target) and call
    `raise_out_of_range` when the count is not 0."""
    return valid & ((targets < 0) | (targets >= vocab_size))


def raise_out_of_range(targets: torch.Tensor, bad: torch.Tensor, vocab_size: int, ignore_index: int,
                       name: str = "targets") -> None:
    """Raise the error of a non-ignored target outside [0, V), naming the first (flat index) in `bad`."""
    flat, bad = targets.reshape(-1), bad.reshape(-1)
    first = int(bad.nonzero()[0, 0])
    raise ValueError(
        f"{name} must lie in [0, V) = [0, {vocab_size}) or equal ignore_index={ignore_index}; "
        f"{name}[{first}] = {int(flat[first])}"
    )


def check_target_range(targets: torch.Tensor, valid: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise if a non-ignored target lies outside [0, V). One host sync."""
    bad = out_of_range(targets, valid, vocab_size)
    if bool(bad.any()):
        raise_out_of_range(targets, bad, vocab_size, ignore_index)
