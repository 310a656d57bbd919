"""`nn.Module` faces of the losses: the options are held by the module and validated at construction."""

from __future__ import annotations

import torch
from torch import nn

from tpo_fast.loss._checks import LossOutput, check_flags, check_kernel_options, check_loss_options
from tpo_fast.loss.dpo import dpo_loss
from tpo_fast.loss.povid import check_povid_options, povid_loss
from tpo_fast.loss.tpo import tpo_loss


class _LossModule(nn.Module):
    """Options held as plain attributes, named by `_OPTIONS` in the loss function's order: `loss.beta = 0.2`
    changes what the next call uses; `options` is their current dict, handed to the loss as keywords."""

    _OPTIONS: tuple[str, ...] = ()

    @property
    def options(self) -> dict:
        """The loss options the module holds now (a new dict; set the attributes to change them)."""
        return {k: getattr(self, k) for k in self._OPTIONS}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def _call_options(self, inputs: dict) -> dict:
        """`options`, after a TypeError naming any of them that the call's keyword inputs repeat (Python would say
        only "got multiple values for keyword argument", not where the option belongs)."""
        given = [k for k in self._OPTIONS if k in inputs]
        if given:
            name = type(self).__name__
            raise TypeError(
                f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of {name}, held by the "
                f"module, not passed to its call: set it on the module (loss_fn.{given[0]} = ...) or build it with "
                f"{name}({given[0]}=...)"
            )
        return self.options


class TPOLoss(_LossModule):
    """`tpo_loss` with its options held by the module (validated at construction).

    forward(weight, hidden, corrupted_hidden, targets, bias=None, *, ref_hidden=None,
    ref_corrupted_hidden=None, ref_weight=None, ref_bias=None, ref_seq_scores=None,
    ref_token_logprobs=None, ref_visual_scores=None) -> LossOutput. Token *Preference* Optimization,
    not TRL's Triple Preference Optimization `TPOTrainer`.
    """

    _OPTIONS = ("beta", "weighting", "offset", "detach_weights", "loss_type", "label_smoothing", "reference_free",
                "average_log_prob", "ignore_index", "backend", "grad_mode")

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        check_loss_options(beta, weighting, offset, loss_type, label_smoothing)
        check_flags(detach_weights=detach_weights, reference_free=reference_free, average_log_prob=average_log_prob)
        check_kernel_options(grad_mode, backend, ignore_index)
        self.beta = beta
        self.weighting = weighting
        self.offset = offset
        self.detach_weights = detach_weights
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.reference_free = reference_free
        self.average_log_prob = average_log_prob
        self.ignore_index = ignore_index
        self.backend = backend
        self.grad_mode = grad_mode

    def forward(
        self,
        weight: torch.Tensor,
        hidden: torch.Tensor,
        corrupted_hidden: torch.Tensor | None,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
        **ref_inputs: torch.Tensor | None,
    ) -> LossOutput:
        options = self._call_options(ref_inputs)
        return tpo_loss(weight, hidden, corrupted_hidden, targets, bias, **ref_inputs, **options)


class DPOLoss(_LossModule):
    """`dpo_loss` with its options held by the module (validated at construction).

    forward(weight, hidden, targets, bias=None, *, ref_hidden=None, ref_weight=None, ref_bias=None,
    ref_seq_scores=None, ref_token_logprobs=None) -> LossOutput.
    """

    _OPTIONS = ("beta", "loss_type", "label_smoothing", "reference_free", "average_log_prob", "ignore_index",
                "backend", "grad_mode")

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        average_log_prob: bool = False,
        ignore_index: int = -100,
        backend: str = "auto",
        grad_mode: str = "auto",
    ) -> None:
        super().__init__()
        check_loss_options(beta, loss_type=loss_type, label_smoothing=label_smoothing)
        check_flags(reference_free=reference_free, average_log_prob=average_log_prob)
        check_kernel_options(grad_mode, backend, ignore_index)
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.reference_free = reference_free
        self.average_log_prob = average_log_prob
        self.ignore_index = ignore_index
        self.backend = backend
        self.grad_mode = grad_mode

    def forward(
        self,
        weight: torch.Tensor,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
        **ref_inputs: torch.Tensor | None,
    ) -> LossOutput:
        return dpo_loss(weight, hidden, targets, bias, **ref_inputs, **self._call_options(ref_inputs))


class POVIDLoss(_LossModule):
    """`povid_loss` with its options held by the module (validated at construction).

    forward(weight, hidden, corrupted_hidden, targets, bias=None, *, ref_hidden=None,
    ref_corrupted_hidden=None, ref_weight=None, ref_bias=None, ref_seq_scores=None) -> LossOutput.
    """

    _OPTIONS = ("beta", "noise_weight", "loss_type", "label_smoothing", "reference_free", "average_log_prob",
                "ignore_index", "backend", "grad_mode")

    def __init__(
        self,
        beta: float = 0.1,
        noise_weight: float = 0.5,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        average_log_prob: bool = False,
        ignore_index: int = -100,
        backend: str = "auto",
        grad_mode: str = "auto",
    ) -> None:
        super().__init__()
        check_loss_options(beta, loss_type=loss_type, label_smoothing=label_smoothing)
        check_povid_options(noise_weight)
        check_flags(reference_free=reference_free, average_log_prob=average_log_prob)
        check_kernel_options(grad_mode, backend, ignore_index)
        self.beta = beta
        self.noise_weight = noise_weight
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.reference_free = reference_free
        self.average_log_prob = average_log_prob
        self.ignore_index = ignore_index
        self.backend = backend
        self.grad_mode = grad_mode

    def forward(
        self,
        weight: torch.Tensor,
        hidden: torch.Tensor,
        corrupted_hidden: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
        **ref_inputs: torch.Tensor | None,
    ) -> LossOutput:
        options = self._call_options(ref_inputs)
        return povid_loss(weight, hidden, corrupted_hidden, targets, bias, **ref_inputs, **options)
