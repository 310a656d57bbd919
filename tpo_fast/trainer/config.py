"""`TPOConfig`: `transformers.TrainingArguments` plus the TPO options, like TRL's `DPOConfig`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from tpo_fast.trainer._versions import require_transformers

require_transformers()  # before transformers' own imports: a clear message, not a missing name

from transformers import TrainingArguments  # noqa: E402

from tpo_fast.trainer.collator import DEFAULT_PROMPT_TEMPLATE  # noqa: E402

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


CHECKPOINTING_NAMES = (
    ("gradient_checkpointing", "activation_checkpointing"),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
)


def adopt_checkpointing_names(args: TrainingArguments) -> None:
    """Move `gradient_checkpointing(_kwargs)` values to `activation_checkpointing(_kwargs)` where this transformers
    has the new names (5.2x renamed them and warns on the old ones), before `TrainingArguments.__post_init__`.

    The old names stay the documented spelling, valid on every supported transformers; the result is what
    transformers' own alias resolution gives (a value set under the new name wins), without its FutureWarning.
    """
    for old, new in CHECKPOINTING_NAMES:
        if hasattr(args, new) and getattr(args, new) is None and getattr(args, old, None) is not None:
            setattr(args, new, getattr(args, old))
            setattr(args, old, None)


@dataclass
class TPOConfig(TrainingArguments):
    """Training arguments for `TPOTrainer` (token-level preference optimization, arXiv 2412.14487).

    Every `transformers.TrainingArguments` field applies (batch size, gradient accumulation,
    learning rate, bf16, gradient checkpointing, DeepSpeed, save/resume, logging), with three
    differences so that one script runs anywhere: without a GPU (or other accelerator) `use_cpu`
    is set for you, `bf16=True` on a GPU without bf16 support (before Ampere) falls back to
    fp32 with a warning instead of failing, and `gradient_checkpointing(_kwargs)` is taken without the
    FutureWarning of transformers versions that renamed it `activation_checkpointing(_kwargs)` (either
    name works there). bf16 on CPU is kept (autocast, slow but supported). Checkpointing defaults to
    the non-reentrant kind.
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
    noise_step, noise_seed, noise_overflow, corrupted_cache_dir, bad_records: how `tpo-fast train` builds its
        `PreferenceDataset` (`noise_step`, `noise_seed`, `overflow`, `corrupted_cache_dir`, `on_bad`; see there and
        `load_preference_records`). `TPOTrainer` never builds a dataset: it uses the one it is given, with that
        dataset's own values, and logs a warning when a `PreferenceDataset` it is given was built with other values
        than these. Checked here all the same (noise_step in [0, 999], noise_overflow "wrap" or "clamp", a
        corrupted_cache_dir or precompute_reference needs noise_seed not None).
    max_length, prompt_template: the collator's (see `TPOCollator`); max_length None or >= 1, the template holds
        "{prompt}" (the collator also checks for the processor's image token).
    loss_backend: the fused kernels' backend ("auto": triton on CUDA, torch on CPU).
    loss_grad_mode: "auto" (default: "fused", measured the faster on the CPU and on an H200; "recompute"
        for fp16 on the triton backend), "fused" (TPO, DPO and POVID compute their gradient in the
        forward, chunk by chunk of whole pairs, without recomputing the logits) or "recompute" (the
        per-token primitive's recomputing backward).
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
    lean_activations: True (default): fewer copies kept for backward, the same forward bit for bit
        (trainer/activations.py). The policy's Llama-family RMSNorms (Llama, Mistral, Qwen2, Qwen3: the
        language models of LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision) keep their 16-bit input, not the fp32
        copy Hugging Face's forward makes; and under bf16/fp16 autocast the LoRA adapters of a layer keep its
        input itself, not a copy each (peft's cast to the adapter's fp32 is off during the step's trunk
        forward). On a bf16 LoRA model at LLaVA-1.5-7B's proportions: a fifth less activation memory (counted
        at hidden size 512); nothing changes on fp32. False keeps the model's and peft's own behaviour.
    freeze_vision_tower: True (default, the official TPO recipe): the vision tower does not train; a full fine-tune
        trains the language model and the projector, and a LoRA adapter from `peft_config` leaves the tower's
        modules out (CLIP's attention also has q_proj, k_proj and v_proj). A `PeftModel` passed as the model keeps
        its own adapters. False trains what the model and the adapter's targets leave trainable
        (trainer/vision.py).
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
    loss_grad_mode: str = field(default="auto", metadata={
        "help": "auto (fused; recompute for fp16 on triton), fused (gradient in the forward) or recompute"})
    shared_prefix: bool = field(default=True, metadata={"help": "run a pair's image and prompt once"})
    padding_free: bool | None = field(
        default=None, metadata={"help": "one row per micro-batch, no padding (None: with sdpa and flex_attention)"}
    )
    lean_activations: bool = field(default=True, metadata={
        "help": "RMSNorms keep their 16-bit input, LoRA adapters their layer's input, not copies"})
    freeze_vision_tower: bool = field(default=True, metadata={
        "help": "keep the vision tower out of training (the official TPO recipe: language model and projector)"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "kept False: the collator needs every field"})

    def __post_init__(self):
        adopt_checkpointing_names(self)
        # Non-reentrant checkpointing needs no requires_grad inputs (frozen embeddings under LoRA)
        # and works with DDP and a step's trunk forwards.
        name = "activation_checkpointing_kwargs" if hasattr(self, "activation_checkpointing_kwargs") else (
            "gradient_checkpointing_kwargs"
        )
        if getattr(self, name) is None:
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
            ("loss_grad_mode", ("auto", "fused", "recompute")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TPOConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.shared_prefix, bool):
            raise ValueError(f"TPOConfig.shared_prefix must be True or False, got {self.shared_prefix!r}")
        if not isinstance(self.freeze_vision_tower, bool):
            raise ValueError(f"TPOConfig.freeze_vision_tower must be True or False, got {self.freeze_vision_tower!r}")
        if not isinstance(self.lean_activations, bool):
            raise ValueError(f"TPOConfig.lean_activations must be True or False, got {self.lean_activations!r}")
        if not (self.padding_free is None or isinstance(self.padding_free, bool)):
            raise ValueError(f"TPOConfig.padding_free must be None, True or False, got {self.padding_free!r}")
        for name in ("detach_weights", "average_log_prob", "precompute_reference"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TPOConfig.{name} must be True or False, got {getattr(self, name)!r}")
        self._check_loss_options()
        self._check_data_options()
        self._check_liger_options()
        if self.precompute_reference and self.reference == "none":
            raise ValueError("precompute_reference=True needs a reference; reference='none' has none")
        if self.reference_cache is not None and not self.precompute_reference:
            logger.warning("TPOConfig.reference_cache=%r is unused without precompute_reference=True",
                           self.reference_cache)
        if self.detach_weights and self.objective != "tpo":
            logger.warning("TPOConfig.detach_weights=True has no effect with objective=%r (TPO only: DPO has no "
                           "corrupted branch, POVID's never carries gradient)", self.objective)

    def _check_liger_options(self) -> None:
        """`use_liger_kernel=True` (the Trainer applies Liger's kernels when `train()` starts) keeps Liger off the
        lm_head: the step's loss is tpo_fast's, and Liger's fused linear cross-entropy would replace the model's
        forward, through which the trainer routes its step. Its other kernels (RMSNorm, SwiGLU, RoPE) apply."""
        if not self.use_liger_kernel:
            return
        config = dict(self.liger_kernel_config or {})
        if config.get("fused_linear_cross_entropy"):
            raise ValueError(
                "liger_kernel_config={'fused_linear_cross_entropy': True} would replace the model's forward, "
                "through which TPOTrainer runs its step (its loss is tpo_fast's, on the hidden states): leave it "
                "out; use_liger_kernel=True applies Liger's other kernels"
            )
        config["fused_linear_cross_entropy"] = False
        self.liger_kernel_config = config

    def _check_loss_options(self) -> None:
        """The loss options, by the loss layer's own checks (the same domains as `tpo_loss` / `dpo_loss`)."""
        from tpo_fast.loss import check_loss_options
        from tpo_fast.loss._checks import check_kernel_options
        from tpo_fast.loss.povid import check_povid_options

        try:
            check_loss_options(self.beta, self.weighting, self.offset, self.loss_type, self.label_smoothing)
        except (TypeError, ValueError) as e:
            raise type(e)(f"invalid TPOConfig: {e}") from e
        try:
            check_povid_options(self.povid_noise_weight)
        except (TypeError, ValueError) as e:
            raise type(e)(f"invalid TPOConfig.povid_noise_weight: {e}") from e
        try:  # loss_grad_mode was checked above: an error here is about the backend
            check_kernel_options(self.loss_grad_mode, self.loss_backend, -100)
        except (TypeError, ValueError) as e:
            raise type(e)(f"invalid TPOConfig.loss_backend: {e}") from e

    def _check_data_options(self) -> None:
        """The corruption, collator and cache options (see the class docstring)."""
        from tpo_fast.trainer.data import check_noise_options

        try:
            check_noise_options(self.noise_step, self.noise_seed, self.noise_overflow)
        except ValueError as e:
            raise ValueError(f"invalid TPOConfig: {e}") from e
        if self.noise_seed is None and self.corrupted_cache_dir is not None:
            raise ValueError(
                "TPOConfig.corrupted_cache_dir needs a seeded noise: set noise_seed to an int, or corrupted_cache_dir "
                "to None (fresh noise cannot be cached)"
            )
        if self.noise_seed is None and self.precompute_reference:
            raise ValueError(
                "TPOConfig.precompute_reference=True needs seeded corruption: set noise_seed to an int (with fresh "
                "noise the cached reference would not have seen the corrupted image trained on)"
            )
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1
        ):
            raise ValueError(
                f"TPOConfig.max_length must be None (no limit) or an int >= 1 (tokens per row), got {self.max_length!r}"
            )
        template = self.prompt_template
        try:
            ok = isinstance(template, str) and "{prompt}" in template and bool(template.format(prompt=""))
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                "TPOConfig.prompt_template must be a format string with '{prompt}' and the image token (other braces "
                f"doubled), like {DEFAULT_PROMPT_TEMPLATE!r}; got {template!r}"
            )
