"""`TPOTrainer`: token-level preference optimization (TPO, arXiv 2412.14487) of LLaVA models, and DPO / POVID.

Not to be confused with TRL's `trl.experimental.tpo.TPOTrainer`, which is *Triple* Preference
Optimization, a different method.

Design choice: `TPOTrainer` subclasses `transformers.Trainer`, not TRL's `DPOTrainer`. TRL's
preference trainers are customised by overriding private methods (`concatenated_forward`,
`get_batch_loss_metrics`, the collator) whose names and signatures moved twice during TRL 1.x;
subclassing would pin TRL to a narrow range for code we would replace anyway (our step never
builds logits, runs the vision tower once per image and needs the corrupted branch). The public
surface follows `DPOTrainer`: `TPOTrainer(model, ref_model=None, args=TPOConfig(...),
train_dataset=..., processing_class=processor, peft_config=...)`, `.train()`, `.save_model()`,
`resume_from_checkpoint`, and the same metric names (`rewards/chosen`, `rewards/margins`, ...).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import logging
import os
import resource
import time
import uuid
import weakref
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import enable_full_determinism, set_seed

from tpo_fast.trainer.activations import use_lean_norms
from tpo_fast.trainer.adapters import adapters_disabled
from tpo_fast.trainer.collator import TPOCollator
from tpo_fast.trainer.config import TPOConfig
from tpo_fast.trainer.data import PreferenceDataset
from tpo_fast.trainer.model import (
    HOST_KEYS,
    StepOptions,
    route_forward,
    seed_host_batch,
    sequence_reference_scores,
    unwrap_llava,
)
from tpo_fast.trainer.packing import host_to_device, may_pack, packing_mode
from tpo_fast.trainer.reference_cache import (
    ScoreTable,
    config_digest,
    dataset_digest,
    leaf_datasets,
    lookup_scores,
    processor_identity,
    read_reference_cache,
    score_table,
    tokenization_identity,
    weights_digest,
    write_reference_cache,
)
from tpo_fast.trainer.vision import freeze_vision_tower, lora_config_without_vision_tower
from tpo_fast.trainer.zero3 import is_zero3, module_forwards_gathered

logger = logging.getLogger("tpo_fast")


def default_attn_implementation(packed: bool = False) -> str:
    """"flash_attention_2" when flash-attn is installed and CUDA is present, else "sdpa".

    `packed`: the model will train with `shared_prefix` or `padding_free`, which need an attention that
    takes a 4D mask: "sdpa" then (on CUDA it runs PyTorch's own flash-attention kernels, and the packed
    step attends sequence by sequence; a flash_attention_2 model would be switched to it anyway).
    """
    if torch.cuda.is_available() and not packed:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def import_submodel_classes(path: str) -> None:
    """Import the modeling modules of a LLaVA folder's text and vision models before any model is built.

    Under a ZeRO-3 config `from_pretrained` builds the model inside `deepspeed.zero.Init`, which wraps the
    `__init__` of every module class defined while it is active and, on exit, restores the `__init__` the
    class had when it was defined. A text model class first imported there (LLaVA imports its text model
    lazily) loses what a decorator set on it after its definition, such as the `kernels` package's
    per-instance setup (transformers 5.25 with `kernels` installed): the next load of the model (the
    reference's) then fails at its first forward ("no attribute '_kernel_funcs'"). Imported first, the
    classes are defined outside that context."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(path)
    for sub in (getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if sub is not None and type(sub) in MODEL_MAPPING:
            MODEL_MAPPING[type(sub)]  # the lazy mapping imports the class's module


def load_llava(
    path: str, dtype: torch.dtype | str | None = None, attn_implementation: str | None = None, packed: bool = False
):
    """Load a local `LlavaForConditionalGeneration` (no download: HF_HUB_OFFLINE applies).

    `attn_implementation` None: `default_attn_implementation(packed)`, or the next of "sdpa" and "eager" (with a
    warning) for a language model that does not support that default (Gemma2: no SDPA); `packed`: it will train
    packed. A given `attn_implementation` the model does not support raises transformers' error."""
    from transformers import LlavaForConditionalGeneration

    import_submodel_classes(path)
    chosen = attn_implementation or default_attn_implementation(packed)
    tries = [chosen] + ([] if attn_implementation else [i for i in ("sdpa", "eager") if i != chosen])

    def load(implementation: str):
        return LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype or "auto",
                                                             attn_implementation=implementation)

    for n, implementation in enumerate(tries[:-1]):
        try:
            return load(implementation)
        except ValueError as e:
            if "does not support" not in str(e):
                raise
            logger.warning("tpo_fast: %s: %s; trying attn_implementation=%r", path, str(e).split(". ")[0], tries[n + 1])
    return load(tries[-1])


def training_weight_dtype(bf16: bool, lora: bool, deepspeed: bool) -> torch.dtype | None:
    """The dtype to load trainable weights in.

    The HF Trainer's optimizers update each weight in its own dtype (bf16=True only autocasts the
    compute), so a bf16 weight loses every update below about |w| / 256: full fine-tuning without
    DeepSpeed (which keeps fp32 master weights) loads fp32. LoRA (fp32 adapters on a frozen base) and
    DeepSpeed load bf16 when bf16 is on; None keeps the checkpoint's dtype.
    """
    if not lora and not deepspeed:
        return torch.float32
    return torch.bfloat16 if bf16 else None


def copy_of_policy(model):
    """A separate copy of the policy for the reference: a deep copy, or under ZeRO-3 a second load.

    A model loaded while a ZeRO-3 config is active (`from_pretrained` under `deepspeed.zero.Init`)
    holds only this rank's shards; a deep copy of it has empty weights that DeepSpeed cannot gather.
    Such a model is loaded again from its folder, partitioned the same way.
    """
    if not any(is_zero3(p) for p in model.parameters()):
        return copy.deepcopy(model)
    path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not path or not os.path.isdir(path):
        raise ValueError(
            "under DeepSpeed ZeRO-3 the policy's weights are partitioned and cannot be copied for the reference; "
            "pass ref_model=..., the model as a local folder path, or use reference='adapter' (LoRA)"
        )
    logger.info("ZeRO-3: loading the reference model again from %s", path)
    return load_llava(path, model.dtype, getattr(model.config, "_attn_implementation", None))


def first_pairs(batch: dict[str, Any], k: int) -> dict[str, Any]:
    """The first `k` pairs of a collated batch (`TPOCollator`'s layout, what the step reads): their chosen and
    rejected rows (rows i and B + i of `input_ids`, `attention_mask`, `labels`) and their entries of `image_index`
    and `index`; the images (which the pairs index) and everything else as they are."""
    pairs = batch["input_ids"].shape[0] // 2
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        if key in batch:
            value = batch[key]
            out[key] = torch.cat([value[:k], value[pairs : pairs + k]])
    for key in ("image_index", "index"):
        if isinstance(batch.get(key), torch.Tensor):
            out[key] = batch[key][:k]
    return out


def peak_memory_mb() -> float:
    """Peak memory of this process in MiB: CUDA allocator peak on GPU, else the peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class TPOTrainer(Trainer):
    """Trainer for TPO (token-level preference optimization, arXiv 2412.14487), DPO and POVID on LLaVA models.

    Args:
        model: a `LlavaForConditionalGeneration` (or a `PeftModel` around one), or a local path.
        ref_model: the frozen reference; None uses a frozen copy of `model`, or, with a LoRA
            adapter, the policy with its adapter disabled (`args.reference` decides).
        args: a `TPOConfig`.
        data_collator: defaults to `TPOCollator(processing_class, ...)`.
        train_dataset, eval_dataset: `PreferenceDataset`s (or any dataset of the same items).
        processing_class: the `LlavaProcessor`.
        peft_config: a `peft.LoraConfig` to wrap `model` with.

    Each step runs, inside the (DDP / DeepSpeed / FSDP-wrapped) model's forward: one vision call
    for the batch's distinct clean and corrupted images, one trunk forward of chosen+rejected on
    the clean and the corrupted images together (the corrupted one apart and without gradient with
    `detach_weights=True`), and the
    fused TPO loss on the response positions' final hidden states and the lm_head weight. With
    `shared_prefix` and `padding_free` (the defaults) each trunk forward runs a pair's image and
    prompt once and the micro-batch as one row without padding (trainer/packing.py).
    `objective="dpo"` has no corrupted branch; `objective="povid"` runs the corrupted branch over
    the chosen rows only and without gradient (its argmax is POVID's noisy sequence), and its
    reference scores are (3B,) per batch: chosen, rejected and the reference's own noisy argmax.
    """

    def __init__(
        self,
        model,
        ref_model=None,
        args: TPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        args = args if args is not None else TPOConfig(output_dir="tpo-output")
        if not isinstance(args, TPOConfig):
            raise TypeError(f"args must be a TPOConfig, got {type(args).__name__}")
        if args.n_gpu > 1:
            # Single-process multi-GPU would wrap the model in nn.DataParallel, which splits the batch
            # dict by rows and so separates chosen from rejected rows; use one device (as the base
            # Trainer does for model-parallel models) and launch with torchrun for several.
            logger.warning("%d GPUs in one process: training on one; use torchrun for data parallelism", args.n_gpu)
            args._n_gpu = 1
        # Seeded as the base Trainer seeds in its own __init__, but before the adapter is added below, which that
        # seeding comes too late for: a LoRA run's initial A factors follow `args.seed`, not the process's draw.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        if isinstance(model, str):
            dtype = training_weight_dtype(args.bf16, lora=peft_config is not None, deepspeed=bool(args.deepspeed))
            model = load_llava(model, dtype, packed=may_pack(args.shared_prefix, args.padding_free))
        is_peft = peft_config is not None or hasattr(model, "disable_adapter")
        mode = args.reference
        if mode == "auto":
            mode = "adapter" if (is_peft and ref_model is None) else "model"
        if mode == "adapter" and not is_peft:
            raise ValueError("reference='adapter' needs a LoRA adapter: pass peft_config or a PeftModel")
        if ref_model is not None and mode != "model":
            raise ValueError(
                f"ref_model was given, but TPOConfig.reference={mode!r} does not use it (the reference would be "
                + ("the policy with its adapter disabled" if mode == "adapter" else "absent: reference-free")
                + "): pass ref_model=None, or set reference='model' (or 'auto') to score against ref_model"
            )
        if mode == "model" and ref_model is None:
            # Copied before the adapter is added and before any wrapper, so it is the untouched policy.
            ref_model = copy_of_policy(model)
        if mode != "model":
            ref_model = None
        if ref_model is not None:
            ref_model.eval()
            ref_model.requires_grad_(False)
        if args.freeze_vision_tower and peft_config is not None:
            peft_config = lora_config_without_vision_tower(peft_config, model, unwrap_llava(model))
        elif args.freeze_vision_tower and not is_peft:
            logger.info("vision tower frozen (the official TPO recipe): %d parameter tensors out of training",
                        freeze_vision_tower(model, unwrap_llava(model)))
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.reference_mode = mode
        # the label of positions without a target: the collator's (a TPOCollator(ignore_index=-1) labels with -1,
        # and a step masking -100 read those labels as targets); any other collator labels with -100
        collator_ignore = getattr(data_collator, "ignore_index", None)
        ignore_index = collator_ignore if type(collator_ignore) is int else -100
        self.step_options = StepOptions(
            objective=args.objective, beta=args.beta, weighting=args.weighting, offset=args.offset,
            detach_weights=args.detach_weights, noise_weight=args.povid_noise_weight, loss_type=args.loss_type,
            label_smoothing=args.label_smoothing,
            average_log_prob=args.average_log_prob, reference=mode, backend=args.loss_backend,
            grad_mode=args.loss_grad_mode, shared_prefix=args.shared_prefix, padding_free=args.padding_free,
            lean_activations=args.lean_activations, ignore_index=ignore_index,
        )
        route_forward(model, self.step_options)
        if ref_model is not None:
            route_forward(ref_model, self.step_options)
        if args.lean_activations:
            logger.info("RMSNorms keeping their 16-bit input for backward: %d", use_lean_norms(unwrap_llava(model)))
        packing = packing_mode(unwrap_llava(model), args.shared_prefix, args.padding_free)  # logs why not, once
        logger.info("trunk forwards: shared_prefix=%s, padding_free=%s", bool(packing and packing.shared_prefix),
                    bool(packing and packing.padding_free))
        if data_collator is None:
            if processing_class is None:
                raise ValueError("pass processing_class (the LlavaProcessor) or a data_collator")
            data_collator = TPOCollator(
                processing_class, prompt_template=args.prompt_template, max_length=args.max_length
            )
        tower = getattr(getattr(unwrap_llava(model), "model", None), "vision_tower", None)
        if args.ddp_find_unused_parameters is None and tower is not None and any(
            p.requires_grad for p in tower.parameters()
        ):
            # LLaVA never runs the tower's post_layernorm (nor its layers past vision_feature_layer): DDP must look for
            # parameters without a gradient, which the base Trainer turns off under gradient checkpointing (the
            # second step then failed: "Expected to have finished reduction in the prior iteration")
            logger.info("the vision tower trains: ddp_find_unused_parameters=True (LLaVA leaves some of it unused)")
            args.ddp_find_unused_parameters = True
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
            optimizers=optimizers,
        )
        # The routed forward takes **kwargs, which the Trainer reads as "scales the loss for
        # gradient accumulation itself"; it does not: the Trainer must divide.
        self.model_accepts_loss_kwargs = False
        self._warn_low_precision_weights()
        self.ref_model = self._prepare_reference(ref_model) if ref_model is not None else None
        # Step metrics and the token count stay on the device until a log reads them: a read-back per step (float(),
        # int()) would make the host wait for the forward before it could queue the backward.
        self._stored_metrics: dict[str, dict[str, list[torch.Tensor | float]]] = defaultdict(lambda: defaultdict(list))
        # Each stored step's weight in its split's mean, the base Trainer's own for the loss: a training micro-batch
        # counts 1 / (its optimizer step's micro-batches), so the window's mean is the mean of its steps' means
        # (an epoch's last step may accumulate fewer); an evaluation batch counts its rows, so the run's mean is
        # over pairs (a smaller last batch), like eval_loss.
        self._metric_weights: dict[str, list[float]] = defaultdict(list)
        self._tokens_since_log: torch.Tensor | int = 0
        self._time_of_log: float | None = None
        self._ref_table: torch.Tensor | None = None  # the train table's scores of a precomputed reference, by index
        self._ref_tables: dict[str, ScoreTable] = {}
        self._ref_table_names: list[tuple[Any, str]] = []
        self._eval_table: str | None = None  # the table evaluate() / predict() reads now
        self._metric_prefix: str | None = None  # the running evaluate() / predict()'s metric_key_prefix + "_"
        self._warn_dataset_settings()
        if args.precompute_reference:
            self._precompute_reference()

    def _warn_low_precision_weights(self) -> None:
        """Warn when trainable weights are bf16/fp16 and no optimizer keeps fp32 master copies of them.

        The HF Trainer's optimizers update each weight in its own dtype (bf16=True only autocasts the
        compute), so a bf16 weight w drops every update smaller than about |w| / 256: at a learning rate of
        5e-7 nearly all of them. DeepSpeed keeps fp32 master weights; LoRA adapters are fp32 under PEFT.
        """
        if self.is_deepspeed_enabled:
            return
        low = sorted({str(p.dtype).replace("torch.", "") for p in self.model.parameters()
                      if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)})
        if low:
            logger.warning(
                "trainable weights are %s and the optimizer updates them in place without fp32 master weights: "
                "updates below the weights' precision (about |w| / 256 in bf16) are lost. Load the model in float32 "
                "(bf16=True autocasts the compute), train a LoRA adapter, or use DeepSpeed.", "/".join(low),
            )

    # ----- reference ---------------------------------------------------------------------------
    def _prepare_reference(self, ref_model):
        if self.is_deepspeed_enabled:
            return self._prepare_deepspeed_reference(ref_model)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def _prepare_deepspeed_reference(self, ref_model):
        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        stage = config.get("zero_optimization", {}).get("stage", 0)
        if stage != 3:
            config.setdefault("zero_optimization", {})["stage"] = 0  # replicate: a frozen model needs no sharding
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        for key, value in (
            ("train_micro_batch_size_per_gpu", self.args.per_device_train_batch_size),
            ("gradient_accumulation_steps", self.args.gradient_accumulation_steps),
        ):
            if config.get(key) in (None, "auto"):
                config[key] = value
        config.pop("train_batch_size", None)
        engine, *_ = deepspeed.initialize(model=ref_model, config=config)
        engine.eval()
        return engine

    def _reference_scorer(self):
        if self.reference_mode == "model":
            ref = self.ref_model

            def score(batch):
                return ref(tpo_batch=batch, tpo_mode="reference")

            return score
        model = self.model
        llava = unwrap_llava(model)

        def score_adapter(batch):
            with adapters_disabled(model):
                return sequence_reference_scores(llava, batch, self.step_options)

        return score_adapter

    def _reference_datasets(self) -> list[tuple[str, Any]]:
        """(table name, dataset) of every dataset the trainer may score: "train", then "eval" (one eval dataset) or
        "eval/<key>" (a dict of them). A dataset given twice (the same object) is scored once, under its first name."""
        named = [("train", self.train_dataset)]
        if isinstance(self.eval_dataset, dict):
            named += [(f"eval/{key}", ds) for key, ds in self.eval_dataset.items()]
        elif self.eval_dataset is not None:
            named.append(("eval", self.eval_dataset))
        out: list[tuple[str, Any]] = []
        for name, ds in named:
            if ds is not None and not any(ds is seen for _, seen in out):
                out.append((name, ds))
        return out

    def _warn_dataset_settings(self) -> None:
        """Warn when a `PreferenceDataset` given to the trainer was built with other corruption / bad-record
        settings than the config's: the trainer uses the dataset as built; the config's fields only configure the
        dataset that `tpo-fast train` builds."""
        a = self.args
        wanted = (("noise_step", "noise_step", a.noise_step), ("noise_seed", "noise_seed", a.noise_seed),
                  ("overflow", "noise_overflow", a.noise_overflow), ("on_bad", "bad_records", a.bad_records),
                  ("corrupted_cache_dir", "corrupted_cache_dir", a.corrupted_cache_dir))

        def same(attr: str, have: Any, want: Any) -> bool:
            if attr == "corrupted_cache_dir" and have is not None and want is not None:
                return os.path.abspath(os.fspath(have)) == os.path.abspath(os.fspath(want))
            return have == want

        for name, ds in self._reference_datasets():
            for base in leaf_datasets(ds):  # the datasets under Subsets and ConcatDatasets
                if not isinstance(base, PreferenceDataset):
                    continue
                diffs = [f"{field}={want!r} (dataset: {attr}={getattr(base, attr)!r})" for attr, field, want in wanted
                         if not same(attr, getattr(base, attr), want)]
                if diffs:
                    logger.warning(
                        "the %s dataset was built with other settings than TPOConfig's %s; TPOTrainer uses the dataset "
                        "as it was built (these TPOConfig fields only configure the dataset `tpo-fast train` builds): "
                        "build the PreferenceDataset with the config's values, or set the config's to the dataset's",
                        name, ", ".join(diffs),
                    )

    def _cache_settings(self) -> dict[str, Any]:
        """The part of every table's fingerprint that does not depend on the dataset."""
        a = self.args
        return {
            "objective": a.objective, "weighting": a.weighting, "offset": a.offset,
            "average_log_prob": a.average_log_prob, **self._collator_settings(),
            "reference_weights": self._reference_digest(),
            # The weights digest hashes values, which a cast to a wider dtype keeps, and a model's config need not
            # follow a `.to(dtype)`: the same values in bf16 and in fp32 score otherwise.
            "reference_dtypes": self._reference_dtypes(),
            "reference_config": config_digest(getattr(self._reference_module(), "config", None)),
            # How the collator labels responses: as continuations of their prompt (`continuation_ids`). Tables
            # made when responses were tokenized alone lack this key and are scored again.
            "response_tokens": "continuation",
            # The autocast the reference is scored under (`_score_dataset`): the step's, "bf16" / "fp16", or "no".
            # Tables made before it was applied lack this key and are scored again.
            "autocast": self.accelerator.mixed_precision if getattr(self.accelerator, "native_amp", False) else "no",
        }

    def _collator_settings(self) -> dict[str, Any]:
        """How the collator actually used turns records into the rows the reference scores: a `TPOCollator`'s
        `max_length`, `prompt_template`, `response_prefix`, `ignore_index` and processor (the caller's collator has
        its own, not the config's). Any other collator, a subclass of TPOCollator too, may encode in ways its
        attributes do not show: its name (a function's, or an object's class) and a value new on every call, so
        that its tables are never reused."""
        collator = self.data_collator
        named = collator if hasattr(collator, "__qualname__") else type(collator)  # a function, or an object's class
        name = f"{named.__module__}.{named.__qualname__}"
        if type(collator) is TPOCollator:
            return {
                "collator": name, "max_length": collator.max_length, "prompt_template": collator.prompt_template,
                "response_prefix": collator.response_prefix, "ignore_index": collator.ignore_index,
                "processor": processor_identity(collator.processor),
                # the same vocabulary may encode otherwise: another eos token ends every response, a post-processor
                # adds a bos token
                "tokenization": tokenization_identity(collator.tokenizer),
            }
        return {
            "collator": name, "unfingerprinted_collator": uuid.uuid4().hex,
            "processor": processor_identity(self.processing_class or getattr(collator, "processor", None)),
        }

    @staticmethod
    def _dataset_fingerprint(ds: Any) -> dict[str, Any]:
        """The part of a table's fingerprint that identifies its dataset: corruption, size and content. The corruption
        settings are those of the dataset under Subsets and ConcatDatasets, or, with several datasets under a
        ConcatDataset, the list of each one's."""
        leaves = leaf_datasets(ds)
        noise = {key: [getattr(leaf, key, None) for leaf in leaves] for key in ("noise_step", "noise_seed", "overflow")}
        return {
            **{key: values[0] if len(values) == 1 else values for key, values in noise.items()},
            "size": len(ds), "records": dataset_digest(ds),
        }

    def _reference_module(self) -> torch.nn.Module:
        """The model that scores the reference: the separate reference model (inside a DeepSpeed engine's `.module`),
        or the policy, whose adapter is disabled for it."""
        if self.reference_mode == "model":
            return getattr(self.ref_model, "module", self.ref_model)
        return self.model

    def _reference_parameters(self):
        """(name, parameter) of the reference's weights: the separate reference model's, or the policy's base weights
        when the reference is the policy with its LoRA adapter disabled."""
        if self.reference_mode == "model":
            return self._reference_module().named_parameters()
        return ((n, p) for n, p in self.model.named_parameters() if "lora_" not in n)

    def _reference_digest(self) -> str:
        """A digest of the reference's weights: the separate reference model, or the policy's base weights when the
        reference is the policy with its LoRA adapter disabled. With the digest of the reference's config
        (`_cache_settings`' "reference_config") it keeps a cache scored by another model from being reused."""
        return weights_digest(self._reference_parameters())

    def _reference_dtypes(self) -> str:
        """sha256 of the reference's "name:dtype" lines: the dtypes its weights compute in."""
        lines = "\n".join(f"{n}:{p.dtype}" for n, p in self._reference_parameters())
        return hashlib.sha256(lines.encode()).hexdigest()

    @property
    def _reference_cache_path(self) -> str:
        return self.args.reference_cache or os.path.join(self.args.output_dir, "reference_scores.pt")

    def _precompute_reference(self):
        """Score every dataset the trainer was given (train and eval) with the reference, each into its own table of
        the cache file (reused per table when its fingerprint matches), then free the reference model."""
        if self.train_dataset is None:
            raise ValueError("precompute_reference=True needs a train_dataset")
        datasets = self._reference_datasets()
        for name, ds in datasets:
            if len(ds) == 0:
                raise ValueError(f"precompute_reference=True: the {name} dataset has no records to score")
            if any(getattr(leaf, "noise_seed", 0) is None for leaf in leaf_datasets(ds)):
                raise ValueError(
                    f"precompute_reference=True needs seeded corruption (the {name} dataset's noise_seed must not be "
                    "None): with fresh noise every load the cached reference would not match the corrupted image "
                    "trained on"
                )
        path = self._reference_cache_path
        settings = self._cache_settings()
        if "unfingerprinted_collator" in settings:
            logger.warning(
                "reference cache %s: the data_collator (%s) is not a TPOCollator, whose settings the cache's "
                "fingerprint cannot see: every table is scored again and never reused", path, settings["collator"])
        stored = read_reference_cache(path)
        tables, changed = {}, False
        for name, ds in datasets:
            fingerprint = {**settings, **self._dataset_fingerprint(ds)}
            entry = stored.get(name)
            if entry is not None and entry.get("fingerprint") == fingerprint:
                logger.info("reference scores of the %s dataset loaded from %s", name, path)
            else:
                if entry is not None:
                    logger.warning("reference cache %s: the %s table was made with other settings or data; "
                                   "recomputing it", path, name)
                entry = {"fingerprint": fingerprint, **self._score_dataset(ds)}
                changed = True
            tables[name] = entry
        if changed:
            if self.accelerator.is_main_process:
                write_reference_cache(path, tables)
                logger.info("reference scores of %s cached to %s",
                            ", ".join(f"{len(t['index'])} {n} records" for n, t in tables.items()), path)
            self.accelerator.wait_for_everyone()
        # One row per record: (chosen, rejected) scores, or (chosen, rejected, noisy) for POVID.
        self._ref_tables = {name: score_table(entry) for name, entry in tables.items()}
        self._ref_table_names = [(ds, name) for name, ds in datasets]
        self._ref_table = self._ref_tables["train"].scores
        # The reference model is no longer needed: free it (accelerate keeps every prepared model in a list).
        ref, self.ref_model = self.ref_model, None
        if ref is not None and hasattr(self.accelerator, "_models"):
            self.accelerator._models = [m for m in self.accelerator._models if m is not ref]
        del ref
        gc.collect()
        self.reference_mode = "precomputed"
        self.step_options = StepOptions(**{**self.step_options.__dict__, "reference": "precomputed"})
        route_forward(self.model, self.step_options)

    @torch.no_grad()
    def _score_dataset(self, ds) -> dict[str, torch.Tensor]:
        """(R, K) reference scores of every record, K = 2 (chosen, rejected) or 3 with POVID's noisy sequence.

        Ranks split the work in equal shares. Scored under the accelerator's mixed-precision autocast
        (`accelerator.autocast()`, a no-op without one or under DeepSpeed), the region a training step's forward runs
        in once `train()` has prepared the model: the reference must be scored with the numerics a live reference
        would have, or the cache is off by the difference. At init the policy is not prepared yet, so the adapter
        reference (`sequence_reference_scores` called directly) would otherwise run outside autocast: on CUDA bf16
        autocast runs layer_norm in fp32, so a bf16 LLaVA's CLIP keeps an fp32 residual stream in the step and a bf16
        one here; an fp32 model runs its matmuls in fp32 here and bf16 in the step.
        """
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        # a rank past the last record (fewer records than ranks) scores the last one again: equal counts on every
        # rank, as ZeRO-3's gathers run in lockstep (a record scored twice is stored once)
        positions = list(range(rank, len(ds), world)) or [len(ds) - 1]
        share = -(-len(ds) // world)
        positions += positions[-1:] * (share - len(positions))
        bs = self.args.per_device_eval_batch_size
        score = self._reference_scorer()
        self.model.eval()
        indices, values = [], []
        # At init no DeepSpeed engine wraps the policy yet: an adapter reference on a policy that ZeRO-3 partitioned
        # as it loaded (`deepspeed.zero.Init`) gathers each module's parameters around its own forward, as the
        # engine will
        adapter = self.reference_mode == "adapter"
        with module_forwards_gathered(self.model) if adapter else contextlib.nullcontext(False) as gathering:
            if gathering:
                logger.info("reference scored on the ZeRO-3 partitioned policy, before DeepSpeed wraps it: each "
                            "module's parameters are gathered around its own forward")
            for start in range(0, len(positions), bs):
                batch = self.data_collator([ds[i] for i in positions[start : start + bs]])
                batch = self._prepare_inputs(batch)
                index = self._index_on_host(batch)  # before the scoring: a batch without indices fails at once
                with self.accelerator.autocast():
                    s = score(batch).float().cpu()
                n = index.shape[0]
                indices.append(index)
                values.append(s.view(-1, n).t())  # (2B,) or (3B,) -> (B, 2) or (B, 3)
        self.model.train()
        index, scores = torch.cat(indices), torch.cat(values)
        if world > 1:
            index = self.accelerator.gather(index.to(self.args.device)).cpu()
            scores = self.accelerator.gather(scores.to(self.args.device)).cpu()
        return {"index": index, "scores": scores}

    def _table_name_of(self, dataset: Any) -> str:
        """The reference table scored from `dataset` (the very object given to the trainer), or a clear error."""
        for ds, name in self._ref_table_names:
            if ds is dataset:
                return name
        raise ValueError(
            "precompute_reference=True: this dataset was not scored by the reference, which was freed after scoring "
            "the datasets given to TPOTrainer; pass it to TPOTrainer as eval_dataset=... (a dict of datasets for "
            "several) so that its records get their own reference scores, then evaluate(eval_dataset=<its key>)"
        )

    @contextlib.contextmanager
    def _reference_table_for(self, dataset: Any):
        """Evaluate against the reference table of `dataset` (a dataset, or a key of the eval_dataset dict)."""
        if isinstance(dataset, str) and isinstance(self.eval_dataset, dict):
            dataset = self.eval_dataset.get(dataset)
        if self.reference_mode != "precomputed" or dataset is None or isinstance(dataset, str):
            yield  # reference scores computed per batch, or no such dataset: the base Trainer says what is missing
            return
        previous, self._eval_table = self._eval_table, self._table_name_of(dataset)
        try:
            yield
        finally:
            self._eval_table = previous

    @contextlib.contextmanager
    def _evaluation(self, metric_key_prefix: str):
        """An evaluate() / predict() run: its step metrics are collected apart from any other run's (and from the
        training window's), and reported under `metric_key_prefix`."""
        previous = self._metric_prefix, self._stored_metrics.pop("eval", None), self._metric_weights.pop("eval", None)
        self._metric_prefix = metric_key_prefix + "_"
        started = time.perf_counter()
        try:
            yield
        finally:
            if self._time_of_log is not None:  # an evaluation inside a training logging window is no training time
                self._time_of_log += time.perf_counter() - started
            self._stored_metrics.pop("eval", None)
            self._metric_weights.pop("eval", None)
            self._metric_prefix = previous[0]
            if previous[1] is not None:
                self._stored_metrics["eval"] = previous[1]
            if previous[2] is not None:
                self._metric_weights["eval"] = previous[2]

    def train(self, *args, **kwargs):
        """`Trainer.train`, its first logging window starting empty: the step metrics, token count and clock that an
        earlier train() left after its last log (its steps past the last multiple of logging_steps) are dropped."""
        self._stored_metrics.pop("train", None)
        self._metric_weights.pop("train", None)
        self._tokens_since_log, self._time_of_log = 0, None
        return super().train(*args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate`, with the step metrics (rewards, log-probs, visual scores) averaged over the run's pairs
        and logged under `metric_key_prefix`, and the loss the mean over its pairs too: each pair counted once, also
        where several processes repeat pairs to fill their last batches (`prediction_step`); with a precomputed
        reference each eval dataset is scored against its own table."""
        target = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(target, dict):  # the base Trainer calls back once per dataset, "<prefix>_<name>"
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        with self._reference_table_for(target), self._evaluation(metric_key_prefix):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """`Trainer.predict`, its metrics including the step metrics under `metric_key_prefix`; with a precomputed
        reference `test_dataset` must be one the trainer was given."""
        with self._reference_table_for(test_dataset), self._evaluation(metric_key_prefix):
            output = super().predict(test_dataset, ignore_keys, metric_key_prefix)
            output.metrics.update(self._pop_metric_means("eval", self._metric_prefix))
        return output

    def _reference_scores(self, inputs: dict[str, torch.Tensor], training: bool = True) -> torch.Tensor | None:
        if self.reference_mode == "model":
            with torch.no_grad():
                return self.ref_model(tpo_batch=inputs, tpo_mode="reference")
        if self.reference_mode == "precomputed":
            name = "train" if training else self._eval_table
            if name is None:
                raise ValueError(
                    "precompute_reference=True: no reference table for this evaluation; evaluate through "
                    "trainer.evaluate() / trainer.predict() on a dataset given to TPOTrainer (train or eval_dataset)"
                )
            rows = lookup_scores(self._ref_tables[name], self._index_on_host(inputs), name, self._reference_cache_path)
            # (B, K) -> (K B,): chosen scores, then rejected (then POVID's noisy), the loss's layout; to the device
            # without waiting for it
            return host_to_device([rows.t().reshape(-1).to(torch.float32)], inputs["input_ids"].device)[0]
        return None  # "adapter": computed inside the policy's forward; "none": reference-free

    # ----- checkpoints -----------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load a full-model checkpoint through `from_pretrained`, which applies the key conversion.

        transformers 5 saves LLaVA under its legacy key names (`language_model.model.*`) and the base
        Trainer loads the file's state dict as is, so on resume every weight would be reported missing
        and silently left at its initial value. DeepSpeed, FSDP and PEFT checkpoints keep their own
        loading path.
        """
        model = model if model is not None else self.model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        llava = unwrap_llava(model)
        # Loaded in the dtype of the model's weights, or, where they have several (a frozen bf16 vision tower beside
        # a trained fp32 language model), in float32, which holds each exactly: one dtype of the narrower kind would
        # round the wider weights on resume.
        dtypes = {p.dtype for p in llava.parameters() if p.is_floating_point()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        loaded = type(llava).from_pretrained(resume_from_checkpoint, dtype=dtype)
        llava.load_state_dict(loaded.state_dict(), strict=True)
        del loaded

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The base Trainer's, with what to do when the checkpoint's optimizer trained other parameters than this
        run (torch says only that a parameter group's size does not match)."""
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as e:
            if "optimizer's group" not in str(e):
                raise
            raise ValueError(
                f"{checkpoint}: its optimizer state is for other trainable parameters than this run's ({e}); resume "
                "with the settings of the run that wrote it: freeze_vision_tower (False: `tpo-fast train "
                "--train-vision-tower`, which full fine-tunes from before 2026-12-07 trained too) and the LoRA "
                "adapter (rank, targets)") from e

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: the best checkpoint through `_load_from_checkpoint` (the base Trainer would load
        the legacy-keyed state dict as is and silently keep the last weights); DeepSpeed, FSDP and PEFT keep theirs."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(self.model, "peft_config"):
            return super()._load_best_model()
        logger.info("loading the best model from %s (score %s)", self.state.best_model_checkpoint,
                    self.state.best_metric)
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # ----- data ------------------------------------------------------------------------------
    def _check_not_dispatched(self, dataset: Any) -> None:
        """Refuse accelerate's batch dispatching on several processes: the main process would collate each global
        batch and slice every tensor of it by rows for the ranks, cutting `TPOCollator`'s layout (the B chosen rows,
        then the B rejected rows, `image_index` (B,)) apart: one rank got chosen rows only, another rejected rows
        without their images. Dispatching is on where `accelerator_config` sets `dispatch_batches=True`, or leaves it
        None (the default) for an `IterableDataset`, as accelerate decides."""
        if self.accelerator.num_processes <= 1 or dataset is None:
            return
        dispatch = self.accelerator.dispatch_batches
        if dispatch or (dispatch is None and isinstance(dataset, torch.utils.data.IterableDataset)):
            why = "is set" if dispatch else f"is left None for an IterableDataset ({type(dataset).__name__})"
            raise ValueError(
                f"accelerate's dispatch_batches {why}: with several processes the main process would cut each "
                "collated batch into row slices, separating the pairs' chosen rows from their rejected rows and "
                "images; pass TPOConfig(accelerator_config={'dispatch_batches': False}) so that every process "
                "collates its own pairs (an IterableDataset is then read by every process and sharded by pairs)"
            )

    def get_train_dataloader(self):
        self._check_not_dispatched(self.train_dataset)
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None):
        target = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(target, str) and isinstance(self.eval_dataset, dict):
            target = self.eval_dataset.get(target)
        self._check_not_dispatched(target)
        return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        self._check_not_dispatched(test_dataset)
        return super().get_test_dataloader(test_dataset)

    # ----- step ------------------------------------------------------------------------------
    def _prepare_inputs(self, inputs):
        """The base class's move to the device, keeping the host copy the step plans from (`seed_host_batch`): the
        collator's CPU tensors, before they move, so that planning the step reads nothing back from the device."""
        cpu = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
        prepared = super()._prepare_inputs(inputs)
        options = getattr(self, "step_options", None)
        if options is not None and all(k in cpu for k in HOST_KEYS):
            seed_host_batch(prepared, cpu, options.ignore_index)
        if "index" in cpu and isinstance(prepared.get("index"), torch.Tensor):
            self._host_index = (weakref.ref(prepared["index"]), cpu["index"].clone())
        return prepared

    def _index_on_host(self, inputs) -> torch.Tensor:
        """The batch's example indices on the host: the copy `_prepare_inputs` kept, else read back."""
        if not isinstance(inputs.get("index"), torch.Tensor):
            raise ValueError(
                "precompute_reference=True looks each pair's reference scores up by its record's index, but this "
                f"batch has no 'index' tensor (keys: {sorted(inputs)}); make the data collator return 'index' (B,), "
                "each pair's record index, as TPOCollator does, or use a live reference (precompute_reference=False)"
            )
        kept = getattr(self, "_host_index", None)
        if kept is not None and kept[0]() is inputs["index"]:
            return kept[1]
        return inputs["index"].cpu()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # A DeepSpeed engine's eval() and train() switch its module, never the engine's own flag (True): an evaluation
        # batch read as a training one would be scored against the train table of a precomputed reference and its
        # metrics logged with the next training window's
        inner = getattr(model, "module", None)
        training = (inner if isinstance(inner, torch.nn.Module) else model).training
        if self._time_of_log is None and training:  # tokens/s counts training time only
            self._time_of_log = time.perf_counter()
        out = model(tpo_batch=inputs, tpo_ref_scores=self._reference_scores(inputs, training=training))
        split = "train" if training else "eval"
        for key, value in out["metrics"].items():
            self._stored_metrics[split][key].append(value.detach() if isinstance(value, torch.Tensor) else float(value))
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        self._metric_weights[split].append(1.0 / steps if training else inputs["input_ids"].shape[0] / 2)
        if training:
            self._tokens_since_log = self._tokens_since_log + inputs["attention_mask"].sum()
        else:  # eval_loss: the mean over the run's pairs, each counted once (see prediction_step)
            self._stored_metrics[split]["loss"].append(out["loss"].detach().float())
        return (out["loss"], out) if return_outputs else out["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The step's loss and metrics of an evaluation batch, each pair counted once: on several processes the last
        batch's pairs that the sampler repeated to even out the ranks (`_pairs_to_count`) are left out of the step
        (a batch of repeats only runs, for ranks in lockstep, and counts 0)."""
        pairs = inputs["input_ids"].shape[0] // 2
        keep = self._pairs_to_count(pairs)
        inputs = self._prepare_inputs(first_pairs(inputs, keep) if 0 < keep < pairs else inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        if keep == 0:
            self._metric_weights["eval"][-1] = 0.0
        return loss.detach(), None, None

    def _pairs_to_count(self, pairs: int) -> int:
        """How many of this rank's `pairs` (its first ones) are new to the evaluation run.

        With several processes accelerate's sampler fills the last step's batches with pairs from the start of the
        dataset, so that every rank gets a full batch; the `remainder` (dataset length modulo the global batch) real
        pairs come first in rank order, which is what `gather_for_metrics` keeps of the gathered last step and so the
        base Trainer's own evaluation."""
        state = self.accelerator.gradient_state
        world = self.accelerator.num_processes
        if world == 1 or not state.end_of_dataloader or state.remainder <= 0 or not self.accelerator.even_batches:
            return pairs
        return min(max(state.remainder - self.accelerator.process_index * pairs, 0), pairs)

    def _pop_metric_means(self, split: str, prefix: str) -> dict[str, float]:
        """The stored step metrics of `split` ("train" or "eval"), averaged (over ranks too) and prefixed; removed."""
        stored = self._stored_metrics.pop(split, {})
        weights = self._metric_weights.pop(split, [])
        if not stored:
            return {}
        keys = sorted(stored)
        dev = self.args.device

        def total(values):  # the stored device tensors (and numbers) of one metric: one read-back per log, not per step
            values = torch.stack([torch.as_tensor(x, dtype=torch.float32).to(dev) for x in values])
            w = torch.ones_like(values)
            if len(weights) == len(values):  # else stored other than by compute_loss: an unweighted mean
                w = torch.tensor(weights, dtype=torch.float32).to(dev)
            return torch.stack([(values * w).sum(), w.sum()])

        totals = torch.stack([total(stored[k]) for k in keys])
        means = totals[:, 0] / totals[:, 1]
        if self.accelerator.num_processes > 1 and split == "train":  # every rank's window weighs the same
            means = self.accelerator.reduce(means, reduction="mean")
        elif self.accelerator.num_processes > 1:  # an evaluation may count fewer pairs on one rank than on another
            totals = self.accelerator.reduce(totals, reduction="sum")
            means = totals[:, 0] / totals[:, 1]
        return {prefix + k: round(v, 6) for k, v in zip(keys, means.tolist(), strict=True)}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The base log, plus the step metrics averaged over the logging window (training: under no prefix, with
        tokens/s and peak memory) or over the evaluate() run (under its metric_key_prefix)."""
        split = "train" if "loss" in logs else "eval"
        if split == "train":
            logs.update(self._pop_metric_means("train", ""))
        elif self._metric_prefix is not None and f"{self._metric_prefix}loss" in logs:  # the evaluate() run's log
            logs.update(self._pop_metric_means("eval", self._metric_prefix))
        if split == "train" and self._time_of_log is not None:
            now = time.perf_counter()
            tokens = torch.as_tensor(self._tokens_since_log, dtype=torch.float32).to(self.args.device)
            if self.accelerator.num_processes > 1:
                tokens = self.accelerator.reduce(tokens, reduction="sum")
            logs["tokens_per_second"] = round(float(tokens) / max(now - self._time_of_log, 1e-9), 2)
            logs["peak_memory_mb"] = round(peak_memory_mb(), 1)
            self._tokens_since_log, self._time_of_log = 0, now
        super().log(logs, start_time)
