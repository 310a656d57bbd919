"""`TPOConfig`: `transformers.TrainingArguments` plus the TPO options, like TRL's `DPOConfig`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from tpo_fast.trainer.collator import DEFAULT_PROMPT_TEMPLATE

logger = logging.getLogger("tpo_fast")


def has_accelerator() -> bool:
    """Whether torch sees a device other than the CPU (CUDA, ROCm, XPU, MPS, ...)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()


def _env_cpu() -> bool:
    # `accelerate launch --cpu` says so through the environment.
    return os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")


def bf16_supported(use_cpu: bool) -> bool:
    """Whether bf16 autocast runs on the device training will use (always on CPU; Ampere+ on CUDA)."""
    if use_cpu or not has_accelerator():
        return True
    from transformers.utils import is_torch_bf16_gpu_available

    return is_torch_bf16_gpu_available()


@dataclass
class TPOConfig(TrainingArguments):
    """Training arguments for `TPOTrainer` (token-level preference optimization, arXiv 2412.14487).

    Every `transformers.TrainingArguments` field applies (batch size, gradient accumulation,
    learning rate, bf16, gradient checkpointing, DeepSpeed, save/resume, logging), with two
    differences so that one script runs anywhere: without a GPU (or other accelerator) `use_cpu`
    is set for you, and `bf16=True` on a GPU without bf16 support (before Ampere) falls back to
    fp32 with a warning instead of failing. bf16 on CPU is kept (autocast, slow but supported).
    The TPO fields:

    objective: "tpo" (token-level weights from the clean/corrupted visual score, docs/math.md), "dpo"
        (plain DPO on the clean image; no corrupted branch) or "povid" (POVID stage 2, arXiv
        2402.11411: `w DPO(chosen vs the corrupted-image argmax of the chosen text) + (1 - w)
        DPO(chosen vs rejected)`; the corrupted branch runs over the chosen rows only, without gradient).
    povid_noise_weight: POVID's `w` (0.5, the official); 0 is plain DPO. Used with objective="povid".
    beta: 0.1, the official code's (it never sets one). offset: the weight offset `a` (0.5).
    weighting: passed to the loss ("tpo" is the paper's self-calibrated weight).
    detach_weights: False (paper and official code): the corrupted branch keeps its gradient.
        True runs the corrupted branch without gradient (no activations kept, much cheaper).
        TPO only (POVID's corrupted branch never carries gradient).
    loss_type: "sigmoid" (default), "hinge" or "ipo". label_smoothing: conservative DPO.
    average_log_prob: average instead of sum over response tokens (the paper sums).
    reference: where the reference scores come from.
        "auto": a separate frozen model (the `ref_model` argument, or a copy of the policy), or,
        with a LoRA adapter, the policy with its adapter disabled.
        "model", "adapter": those two explicitly. "none": reference-free.
    precompute_reference: score the whole training set with the reference once before training,
        cache the scores to `reference_cache` (default `<output_dir>/reference_scores.pt`), free the
        reference model and train against the cache. Exact only with seeded corruption (the
        dataset's `noise_seed` not None): the same corrupted image at caching and training time.
    noise_step, noise_seed, noise_overflow, corrupted_cache_dir: the image corruption (see
        `PreferenceDataset`; used when the trainer or CLI builds the dataset).
    max_length, prompt_template: the collator's (see `TPOCollator`).
    bad_records: "skip" or "error" for unusable records (see `load_preference_records`).
    loss_backend: the fused kernels' backend ("auto": triton on CUDA, torch on CPU).
    loss_grad_mode: "fused" (default: TPO, DPO and POVID compute their gradient in the forward, chunk
        by chunk of whole pairs, without recomputing the logits) or "recompute" (the per-token
        primitive's recomputing backward).
    shared_prefix: run the image tokens and prompt of a pair once (True, default): one sequence
        [prompt, chosen, rejected] per pair, the rejected tokens masked from the chosen ones and both
        responses positioned after the prompt, on the clean and on the corrupted image; reference
        forwards alike. The loss and gradients are those of the padded rows (trainer/packing.py).
    padding_free: pack the micro-batch's sequences into one row, position ids restarting per sequence
        and no attention between them, so no padding token reaches the trunk or the lm_head.
        None (default): on where the attention skips the other sequences: attn_implementation=
        "flex_attention" (its block mask), and "sdpa" without a sliding window, whose language model is
        switched to "tpo_fast_sdpa" (sdpa for every call; a packed row's attention runs sequence by
        sequence, two SDPA calls per pair, like flash-attn's varlen kernels); off with "eager" (and sdpa
        with a sliding window), which attend over the dense mask of the whole row (quadratic in the
        micro-batch: slower than padded per-pair rows). Both options need a language model that takes
        a 4D attention mask and position ids ("sdpa", "eager", "flex_attention"); a flash_attention_2 (or 3)
        language model is switched to "tpo_fast_sdpa" (logged once), on others the step logs once that it
        runs on padded rows.
    """

    objective: str = field(default="tpo", metadata={"help": "tpo, dpo or povid"})
    povid_noise_weight: float = field(default=0.5, metadata={"help": "POVID: weight of the noisy-argmax DPO term"})
    beta: float = field(default=0.1, metadata={"help": "inverse temperature of the preference loss"})
    weighting: str = field(default="tpo", metadata={"help": "token weighting of the loss (tpo)"})
    offset: float = field(default=0.5, metadata={"help": "offset a of the self-calibrated weight"})
    detach_weights: bool = field(default=False, metadata={"help": "no gradient through the corrupted branch"})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid, hinge or ipo"})
    label_smoothing: float = field(default=0.0, metadata={"help": "conservative DPO label smoothing"})
    average_log_prob: bool = field(default=False, metadata={"help": "average log-probs over tokens"})
    reference: str = field(default="auto", metadata={"help": "auto, model, adapter or none"})
    precompute_reference: bool = field(default=False, metadata={"help": "cache reference scores before training"})
    reference_cache: str | None = field(default=None, metadata={"help": "path of the reference score cache"})
    noise_step: int = field(default=500, metadata={"help": "diffusion step of the image corruption"})
    noise_seed: int | None = field(default=0, metadata={"help": "seed of the corruption noise (None: fresh)"})
    noise_overflow: str = field(default="wrap", metadata={"help": "wrap (official) or clamp"})
    corrupted_cache_dir: str | None = field(default=None, metadata={"help": "cache of corrupted images"})
    max_length: int | None = field(default=None, metadata={"help": "longest row in tokens"})
    prompt_template: str = field(default=DEFAULT_PROMPT_TEMPLATE, metadata={"help": "prompt format"})
    bad_records: str = field(default="skip", metadata={"help": "skip or error"})
    loss_backend: str = field(default="auto", metadata={"help": "fused loss backend"})
    loss_grad_mode: str = field(default="fused", metadata={"help": "fused (gradient in the forward) or recompute"})
    shared_prefix: bool = field(default=True, metadata={"help": "run a pair's image and prompt once"})
    padding_free: bool | None = field(
        default=None, metadata={"help": "one row per micro-batch, no padding (None: with sdpa and flex_attention)"}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "kept False: the collator needs every field"})

    def __post_init__(self):
        # Non-reentrant checkpointing needs no requires_grad inputs (frozen embeddings under LoRA)
        # and works with DDP and the two trunk forwards of a step. transformers 5 renamed the field.
        name = "activation_checkpointing_kwargs" if hasattr(self, "activation_checkpointing_kwargs") else (
            "gradient_checkpointing_kwargs"
        )
        if getattr(self, name) is None and getattr(self, "gradient_checkpointing_kwargs", None) is None:
            setattr(self, name, {"use_reentrant": False})
        if not self.use_cpu and not has_accelerator():
            self.use_cpu = True  # TrainingArguments otherwise rejects bf16 on a machine without a GPU
        if (self.bf16 or self.bf16_full_eval) and not bf16_supported(self.use_cpu or _env_cpu()):
            logger.warning("bf16=True but this GPU does not support bf16: training in fp32")
            self.bf16 = self.bf16_full_eval = False
        super().__post_init__()
        for name, allowed in (
            ("objective", ("tpo", "dpo", "povid")),
            ("reference", ("auto", "model", "adapter", "none")),
            ("loss_type", ("sigmoid", "hinge", "ipo")),
            ("noise_overflow", ("wrap", "clamp")),
            ("bad_records", ("skip", "error")),
            ("loss_grad_mode", ("fused", "recompute")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TPOConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.shared_prefix, bool):
            raise ValueError(f"TPOConfig.shared_prefix must be True or False, got {self.shared_prefix!r}")
        if not (self.padding_free is None or isinstance(self.padding_free, bool)):
            raise ValueError(f"TPOConfig.padding_free must be None, True or False, got {self.padding_free!r}")
        from tpo_fast.loss.povid import check_povid_options

        check_povid_options(self.povid_noise_weight)
        if self.precompute_reference and self.reference == "none":
            raise ValueError("precompute_reference=True needs a reference; reference='none' has none")
