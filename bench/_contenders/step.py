"""The `step` workload's contenders: one whole training step each, on the same model and pairs.

- `official-tpo`: the official TPO code's step structure (docs/math.md "What one training step
  needs"), written here independently of tpo_fast: eight forwards through the Hugging Face LLaVA
  forward (policy and reference x chosen and rejected x clean and corrupted image), chosen and
  rejected each padded to their own longest row, fp32 `B x T x V` logits over every position,
  log_softmax + gather, the TPO weights from the raw target logits, four forwards with gradient
  kept alive until one backward.
- `trl-dpo`: TRL's `DPOTrainer` in its fastest configuration that runs here; the options tried and
  why each was or was not used go into the row's note.
- `ours-{dpo,tpo}[-shared]`: tpo_fast's `TPOTrainer` (objective "dpo" / "tpo"), without and with
  `TPOConfig(shared_prefix=True)`.
- `ours-tpo-shared-refcache`: the shared-prefix TPO step with `precompute_reference=True`: the frozen
  reference scores the pairs once before the timed steps (that time goes into the row's note, and
  `reference_cache_s_per_pair` into the row), so a step runs only the policy's two forwards.
- `ours-tpo-shared-sdpa` (CUDA only): the shared-prefix TPO step with `TPO_FAST_VARLEN=0`, its packed row attended
  with two SDPA calls per sequence instead of one flash-attention varlen call per layer (the A/B of that call).

Each runs `train_step(batch)`: forward, backward, optimizer step, zero_grad, with the Hugging Face
Trainer's default optimizer (fused AdamW) for all; no gradient clipping for any. Batches are
prepared (collated, tokenized, moved to the device) outside the timed step.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import re
import tempfile
import time

import torch
import torch.nn.functional as F
from _workloads import BETA, OFFSET
from _workloads.step import StepCase, StepData, build_model, dtype_of, lora_config

from .base import Contender, missing

# The cross-check (`_measure_step.cross_check_steps`) compares the loss drop of each contender's first optimizer
# step: at 1e-5 a bf16 LoRA step drops the loss by about 1e-3, within bf16's rounding noise (on cpu-step-lora two
# of our DPO rows, equal in fp32, dropped it by 0.0019 and 0.0027, TRL by 0.0012); at 1e-4 the drop is about
# 0.067 and TRL's and ours agree within 1.1%. The step time does not depend on it.
LEARNING_RATE = 1e-4
OPTIONAL_TRL = ("use_liger_kernel", "padding_free", "precompute_ref_log_probs")
# tpo_fast.trainer.row_attention's switch (named here too: older tpo_fast versions lack it)
VARLEN_ENV = "TPO_FAST_VARLEN"


def _optimizer(params, device: str):
    """The Hugging Face Trainer's default optimizer and settings (fused AdamW), at LEARNING_RATE."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="tpo-bench-opt-"), learning_rate=LEARNING_RATE,
                             use_cpu=device == "cpu", report_to="none")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    # The Trainer sets the weight decay in its parameter groups (TrainingArguments' default: 0), not in `kwargs`;
    # without it AdamW's own default (0.01) applied to this step only.
    return cls([{"params": [p for p in params if p.requires_grad], "weight_decay": args.weight_decay}], **kwargs)


def _to(batch: dict, device: str) -> dict:
    """The batch's tensors on `device`, nested dicts (the official step's per-side rows) included."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else _to(v, device) if isinstance(v, dict) else v
            for k, v in batch.items()}


def _prepare_like_train(trainer) -> None:
    """What a Hugging Face Trainer's `train()` does to the model and optimizer before its first step, on one
    device: `accelerator.prepare`, which (with bf16=True) wraps the model's forward in the mixed-precision
    autocast. The bench calls `training_step` itself; without this, peft's fp32 LoRA adapters on a bf16
    model run their matmuls in fp32, a step that `train()` never takes (the official structure runs under
    `torch.autocast`, as its code does)."""
    trainer.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


class StepContender(Contender):
    """A contender of the `step` workload: `build` once, then `batch(pairs)` and `train_step(batch)`.

    The default `train_step` is a Hugging Face Trainer's (`self.trainer`): its `training_step` (forward and
    backward, as `train()` runs them, on the model and optimizer prepared as `train()` prepares them:
    `_prepare_like_train`), then the optimizer step, without the rest of the train loop."""

    family = "step"
    # The loss it trains ("tpo" or "dpo"), and whether it is an implementation independent of tpo_fast whose
    # first optimizer step the others of its objective are checked against (`cross_check_steps`).
    objective = ""
    oracle = False

    def __init__(self, name: str, kind: str, label: str, note: str):
        super().__init__(name, kind, label, {"step": note})
        self.notes: list[str] = []  # what the build found (options used, options that failed)

    def availability(self, device, workload=None):
        return None

    def case_availability(self, case: StepCase, device: str) -> str | None:
        if case.needs_cuda and device != "cuda":
            return f"needs CUDA ({case.model} shapes in {case.dtype})"
        return None

    def build(self, case: StepCase, data: StepData, device: str) -> None:
        raise NotImplementedError

    def batch(self, pairs: int) -> dict:
        raise NotImplementedError

    def train_step(self, batch: dict) -> float:
        trainer = self.trainer
        loss = trainer.training_step(trainer.model_wrapped, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def note(self) -> str:
        return "; ".join([self.workloads["step"], *self.notes])

    def _stepped(self) -> list[torch.nn.Parameter] | None:
        """The parameters its optimizer steps (`self.optimizer`, else its trainer's; None without either)."""
        opt = getattr(self, "optimizer", None) or getattr(getattr(self, "trainer", None), "optimizer", None)
        return None if opt is None else [p for group in opt.param_groups for p in group["params"]]

    def trained_params(self) -> int | None:
        """How many numbers its optimizer steps (None without one): every contender of a case must train the same
        parameters (`cross_check_steps`), which the loss drop alone cannot tell apart from, say, a vision tower left
        frozen."""
        stepped = self._stepped()
        return None if stepped is None else sum(p.numel() for p in stepped)

    def named_trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]] | None:
        """What its optimizer steps, each named by its place in the LLaVA model (`llava_name`: the same name in every
        contender's model, peft's and tpo_fast's wrappers left out); None without an optimizer or a model. The
        measuring child records their gradients' norms at the first step, which `cross_check_steps` compares."""
        stepped = self._stepped()
        model = getattr(self, "policy", None) or getattr(getattr(self, "trainer", None), "model", None)
        if stepped is None or model is None:
            return None
        names = {id(p): llava_name(n) for n, p in model.named_parameters()}
        return [(names.get(id(p), f"unnamed.{i}"), p) for i, p in enumerate(stepped)]


def llava_name(name: str) -> str:
    """A parameter's name from its LLaVA part on (`language_model.`, `vision_tower.`, `multi_modal_projector.`,
    `lm_head.`), without the prefixes of the modules around it (peft's `base_model.model.`, LLaVA's `model.`)."""
    found = re.search(r"(?:^|\.)((?:language_model|vision_tower|multi_modal_projector|lm_head)\..*)$", name)
    return found.group(1) if found else name


# The official step structure ----------------------------------------------------------------------
def _official_scores(logits: torch.Tensor, corrupted_logits: torch.Tensor, labels: torch.Tensor, chosen: bool):
    """(R,) TPO sequence scores `sum_t m_t (logp_t + log c_t)` from full (R, T, V) fp32 logits, the official way."""
    logits, corrupted_logits = logits[:, :-1], corrupted_logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    safe = targets.clamp(min=0).unsqueeze(-1)
    logp = torch.log_softmax(logits, -1).gather(-1, safe).squeeze(-1)
    visual = logits.gather(-1, safe).squeeze(-1) - corrupted_logits.gather(-1, safe).squeeze(-1)
    sig = torch.sigmoid(visual)
    c = OFFSET + sig if chosen else OFFSET + 1.0 - sig
    return ((logp + torch.log(c)) * mask).sum(-1)


class OfficialTPOStep(StepContender):
    objective, oracle = "tpo", True

    def __init__(self):
        super().__init__(
            "official-tpo", "baseline", "official TPO step (8 forwards, fp32 logits)",
            "the official TPO code's step structure, written in bench/: 8 LLaVA forwards (policy, reference x "
            "chosen, rejected x clean, corrupted image), each encoding its images, fp32 B x T x V logits over "
            "every position, log_softmax + gather, 4 forwards with gradient alive until one backward; chosen and "
            "rejected each padded to their own longest row. Not copied: the unused HF cross-entropy, the host copy "
            "of the logits for a metric, the extra CLIP encodes (docs/math.md)",
        )

    def build(self, case, data, device):
        self.device, self.data = device, data
        policy = build_model(case, data.image_token_id, device, seed=data.seed)
        if case.lora:
            from peft import get_peft_model
            from transformers import set_seed

            # peft draws the adapter's A matrices from the global RNG: seeded as TRL's and tpo_fast's trainers seed it
            # (set_seed(args.seed), args.seed = the run's seed) right before they call get_peft_model, so that every
            # contender starts from the same adapter (unseeded, this one's differed from theirs, and its first TPO
            # gradients from our TPO step's by up to 175% per tensor on step-tiny with LoRA)
            set_seed(data.seed)
            self.policy, self.reference = get_peft_model(policy, lora_config(case)), None
            self.notes.append("LoRA; reference = the policy with its adapter disabled")
        else:
            self.policy = policy
            self.reference = copy.deepcopy(policy).requires_grad_(False).eval()
        self.optimizer = _optimizer(self.policy.parameters(), device)
        self.autocast = case.dtype == "bf16"

    def batch(self, pairs):
        b = self.data.padded_batch(pairs)
        rows = b["image_index"]
        out = {}
        half = b["input_ids"].shape[0] // 2
        for side, sl in (("chosen", slice(0, half)), ("rejected", slice(half, None))):
            mask = b["attention_mask"][sl]
            length = int(mask.sum(1).max())
            out[side] = {"input_ids": b["input_ids"][sl, :length], "attention_mask": mask[:, :length],
                         "labels": b["labels"][sl, :length]}
        out["pixel_values"] = b["pixel_values"][rows]
        out["corrupted_pixel_values"] = b["corrupted_pixel_values"][rows]
        return _to(out, self.device)

    def _logits(self, model, rows, pixel_values):
        out = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], pixel_values=pixel_values,
                    use_cache=False)
        return out.logits.to(torch.float32)

    def _scores(self, model, batch):
        """(chosen, rejected) sequence scores of one model: four forwards (two images x two sides)."""
        scores = []
        for side in ("chosen", "rejected"):
            rows = batch[side]
            clean = self._logits(model, rows, batch["pixel_values"])
            corrupted = self._logits(model, rows, batch["corrupted_pixel_values"])
            scores.append(_official_scores(clean, corrupted, rows["labels"], side == "chosen"))
        return scores

    def train_step(self, batch):
        self.policy.train()
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            chosen, rejected = self._scores(self.policy, batch)
            with torch.no_grad():
                if self.reference is None:
                    with self.policy.disable_adapter():
                        ref_chosen, ref_rejected = self._scores(self.policy, batch)
                else:
                    ref_chosen, ref_rejected = self._scores(self.reference, batch)
        loss = -F.logsigmoid(BETA * ((chosen - rejected) - (ref_chosen - ref_rejected))).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


# TRL's DPOTrainer ----------------------------------------------------------------------------------
def _trl_rows(data: StepData) -> list[dict]:
    return [{
        "images": [r["image"]],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]}]}],
    } for r in data.records]


def _module_state() -> dict:
    """The globals of every loaded transformers model module: Liger patches some of them (the rotary
    embedding function, the norm and MLP classes) for the whole process, not just for one model."""
    import importlib
    import sys

    for name in ("llava", "llama", "clip"):  # loaded before the snapshot, not by the trial's model
        importlib.import_module(f"transformers.models.{name}.modeling_{name}")

    return {name: dict(vars(mod)) for name, mod in list(sys.modules.items())
            if name.startswith("transformers.models.") and mod is not None}


def _restore(saved: dict) -> None:
    import sys

    for name, state in saved.items():
        vars(sys.modules[name]).update(state)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text if len(text) <= 220 else text[:220] + ' [cut]'}"


class TRLDPOStep(StepContender):
    """TRL's DPOTrainer; each of OPTIONAL_TRL is tried on top of the base configuration and kept when it
    builds, is not silently dropped by TRL, and trains one step."""

    objective, oracle = "dpo", True

    def __init__(self):
        super().__init__(
            "trl-dpo", "peer", "TRL DPOTrainer",
            "TRL DPOTrainer on the same pairs (conversational rows with the image; its vision collator), its "
            "chunked log-prob head (`add_fused_lm_head`), a frozen copy of the policy as reference (with LoRA: "
            "the adapter disabled), gradient_checkpointing=False (TRL's default is True, slower)",
        )

    def availability(self, device, workload=None):
        return missing("trl", "trl")

    def _trainer(self, case, data, device, options):
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        model = build_model(case, data.image_token_id, device, seed=data.seed)
        ref = None if case.lora else copy.deepcopy(model).requires_grad_(False).eval()
        # Checkpointing off under the name this transformers reads (5.2x renamed it and warns on the old one).
        checkpointing = ("activation_checkpointing" if "activation_checkpointing" in DPOConfig.__dataclass_fields__
                         else "gradient_checkpointing")
        args = DPOConfig(
            output_dir=tempfile.mkdtemp(prefix="tpo-bench-trl-"), per_device_train_batch_size=case.pairs,
            learning_rate=LEARNING_RATE, report_to="none", use_cpu=device == "cpu", save_strategy="no",
            disable_tqdm=True, beta=BETA, max_length=None, seed=data.seed, **{checkpointing: False},
            bf16=case.dtype == "bf16", **options,
        )
        trainer = DPOTrainer(model, ref_model=ref, args=args, train_dataset=Dataset.from_list(_trl_rows(data)),
                             processing_class=data.processor, peft_config=lora_config(case) if case.lora else None)
        if options.get("use_liger_kernel"):
            # The Trainer applies Liger's kernels when `train()` starts; the bench calls `training_step` itself.
            from transformers.integrations.liger import apply_liger_kernel

            apply_liger_kernel(trainer.model, trainer.args.liger_kernel_config)
        trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        trainer.current_gradient_accumulation_steps = 1  # set by the train loop, which the bench bypasses
        _prepare_like_train(trainer)
        return trainer

    def _dropped(self, trainer, option) -> str | None:
        """Why TRL accepted `option` but does not use it, or None."""
        if option == "padding_free" and not getattr(trainer, "padding_free", True):
            return ("TRL 1.16 accepts it but warns it is 'temporarily unavailable' since its DPO refactor and pads "
                    "(it also needs FlashAttention 2/3)")
        return None

    def build(self, case, data, device):
        import trl

        self.device, self.data, self.case = device, data, case
        self.notes.append(f"trl {trl.__version__}")
        used, failed = {}, []
        trainer = None
        for option in OPTIONAL_TRL:
            trial = {**used, option: True}
            saved = _module_state() if option == "use_liger_kernel" else None
            try:
                trainer = self._trainer(case, data, device, trial)
                why = self._dropped(trainer, option)
                if why is None:
                    self.trainer = trainer
                    self.train_step(self.batch(1))  # an option can build and still fail in the step
            except Exception as e:  # noqa: BLE001 - the reason is the result
                why = _first_line(e)
            trainer = self.trainer = None
            _free(device)
            if why is None:
                used[option] = True
            else:
                failed.append(f"{option}: {why}")
                if saved is not None:
                    _restore(saved)
        self.trainer = self._trainer(case, data, device, used)
        self.options = sorted(used)
        self.notes.append("options used: " + (", ".join(f"{k}=True" for k in self.options) or "none of "
                                              + ", ".join(OPTIONAL_TRL)))
        self.notes += [f"not used: {f}" for f in failed]

    def batch(self, pairs):
        ds = self.trainer.train_dataset
        batch = self.trainer.data_collator([ds[i] for i in self.data.indices(pairs)])
        return self.trainer._prepare_inputs(batch)



# tpo_fast's TPOTrainer -----------------------------------------------------------------------------
def config_fields() -> set[str]:
    from tpo_fast.trainer.config import TPOConfig

    return {f.name for f in dataclasses.fields(TPOConfig)}


def varlen_module():
    """The tpo_fast module that holds the varlen attention call (`varlen_api`, `varlen_usable`):
    `tpo_fast.trainer.row_attention`, or `tpo_fast.trainer.packing` in a tpo_fast from before that module; None in
    one from before the call (the bench also times older tpo_fast versions through PYTHONPATH)."""
    try:
        from tpo_fast.trainer import row_attention

        return row_attention
    except ImportError:
        try:
            from tpo_fast.trainer import packing
        except ImportError:  # a tpo_fast from before packing
            return None
        return packing if hasattr(packing, "varlen_api") else None


def trunk_rows(trainer) -> str:
    """How this tpo_fast lays out the trunk's rows on its model (the packing `padding_free=None` resolves to)."""
    try:
        from tpo_fast.trainer.model import unwrap_llava
        from tpo_fast.trainer.packing import packing_mode
    except ImportError:  # a tpo_fast from before packing
        return "trunk rows: padded"
    opts = trainer.step_options
    mode = packing_mode(unwrap_llava(trainer.model), opts.shared_prefix, opts.padding_free)
    if mode is None:
        return "trunk rows: padded"
    if mode.padding_free:
        how = f"attention {mode.implementation}"
        try:
            from tpo_fast.trainer.packing import SEGMENT_ATTENTION, varlen_wanted
        except ImportError:  # a tpo_fast from before the varlen call
            varlen_wanted = None
        device = next(trainer.model.parameters()).device
        if varlen_wanted is not None and mode.implementation == SEGMENT_ATTENTION and varlen_wanted(device):
            how += " (one flash-attention varlen call per layer in 16-bit, TPO_FAST_VARLEN=0 turns it off)"
        return f"trunk rows: one padding-free row per micro-batch, {how}"
    return f"trunk rows: one per {'pair' if mode.shared_prefix else 'row'}, padded, dense mask ({mode.implementation})"


class OursStep(StepContender):
    def __init__(self, objective: str, shared: bool, precomputed: bool = False, sdpa: bool = False):
        name = (f"ours-{objective}" + ("-shared" if shared else "") + ("-refcache" if precomputed else "")
                + ("-sdpa" if sdpa else ""))
        label = (f"tpo_fast {objective.upper()} step" + (", shared prefix" if shared else "")
                 + (", cached reference" if precomputed else "") + (", SDPA per sequence" if sdpa else ""))
        ref = {"dpo": "one reference forward", "tpo": "the reference's without"}[objective]
        if precomputed:
            ref = "no reference forward (scores cached once per data set, before the timed steps)"
        what = {"dpo": "one trunk forward of chosen+rejected with gradient, ",
                "tpo": "one trunk forward of clean and corrupted images with gradient, "}[objective] + ref
        note = (f"tpo_fast TPOTrainer(objective={objective!r}): {what}; images encoded once per image; the fused "
                "loss on the response positions' hidden states (no logits); a frozen copy as reference (with "
                "LoRA: the adapter disabled)")
        if shared:
            note += "; TPOConfig(shared_prefix=True): image and prompt computed once per pair"
        if precomputed:
            note += ("; TPOConfig(precompute_reference=True): the frozen reference scores every pair once "
                     "(its time is in the note, amortized per epoch) and the step reads the cache")
        if sdpa:
            note += (f"; {VARLEN_ENV}=0: a packed row attended with two SDPA calls per sequence on CUDA too, not one "
                     "flash-attention varlen call per layer (the A/B of that call)")
        super().__init__(name, "ours", label, note)
        self.objective, self.shared, self.precomputed, self.sdpa = objective, shared, precomputed, sdpa
        # The row it is compared with: the shared prefix against the unshared step, the cache against no cache.
        self.unshared = f"ours-{objective}" if shared and not precomputed else None

    def availability(self, device, workload=None):
        if self.shared and "shared_prefix" not in config_fields():
            return "this tpo_fast's TPOConfig has no shared_prefix option yet (issue 15 item 1)"
        if self.sdpa:
            module = varlen_module()
            if module is None:
                return "this tpo_fast has no varlen attention to compare with"
            if device != "cuda":
                return f"the same step as {self.name[:-5]} off CUDA (the varlen call runs on CUDA only)"
            if module.varlen_api() is None:
                return "this torch has no torch.nn.attention.varlen"
        return None

    def build(self, case, data, device):
        from tpo_fast.trainer.config import TPOConfig
        from tpo_fast.trainer.trainer import TPOTrainer

        self.device, self.data = device, data
        if self.sdpa:
            os.environ[VARLEN_ENV] = "0"  # this contender's own process (bench/run.py runs each in a fresh one)
        fields = config_fields()
        extra = {"shared_prefix": self.shared} if "shared_prefix" in fields else {}
        if "freeze_vision_tower" in fields:
            # Every contender trains the same parameters: a full case the whole model (the official structure and
            # TRL train the vision tower too), a LoRA case the adapter on the text model (lora_config). The
            # trainer's default, the official recipe, would leave the vision tower out of a full case.
            extra["freeze_vision_tower"] = False
        dataset = data.dataset
        if self.precomputed:
            # Only the pairs a step of this run can draw: the timed micro-batch and the micro-batch search's.
            drawn = max(case.pairs, case.max_pairs if case.search_s > 0 else 0)
            dataset = torch.utils.data.Subset(data.dataset, range(min(len(data.dataset), drawn)))
            extra["precompute_reference"] = True
        args = TPOConfig(
            output_dir=tempfile.mkdtemp(prefix="tpo-bench-ours-"), objective=self.objective,
            per_device_train_batch_size=case.pairs, per_device_eval_batch_size=case.pairs,
            learning_rate=LEARNING_RATE, report_to="none", use_cpu=device == "cpu", save_strategy="no",
            disable_tqdm=True, bf16=case.dtype == "bf16", seed=data.seed, **extra,
        )
        model = build_model(case, data.image_token_id, device, seed=data.seed)
        scoring: list[float] = []

        class Trainer(TPOTrainer):
            def _precompute_reference(self):
                # the cache's own time: its scoring pass, not the trainer's construction around it (peft, the
                # optimizer's groups), which every contender pays untimed
                t0 = time.perf_counter()
                try:
                    return super()._precompute_reference()
                finally:
                    scoring.append(time.perf_counter() - t0)

        self.trainer = Trainer(model, args=args, train_dataset=dataset, processing_class=data.processor,
                               peft_config=lora_config(case) if case.lora else None)
        if self.precomputed:
            took = sum(scoring)
            self.reference_cache_s_per_pair = took / len(dataset)
            self.notes.append(f"reference cache: {took:.1f} s for {len(dataset)} pairs (the scoring pass, its first "
                              f"kernel compiles included), {self.reference_cache_s_per_pair:.2f} s per pair, paid "
                              "once per data set")
        self.trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        self.trainer.current_gradient_accumulation_steps = 1
        _prepare_like_train(self.trainer)
        used = [f"{k}={getattr(args, k)}" for k in ("shared_prefix", "padding_free", "precompute_reference")
                if k in fields]
        used.append(f"loss_backend={args.loss_backend}, grad_mode={args.loss_grad_mode}")
        self.notes.append("TPOConfig: " + ", ".join(used) + "; " + trunk_rows(self.trainer))

    def batch(self, pairs):
        ds = self.data.dataset
        return self.trainer._prepare_inputs(self.trainer.data_collator([ds[i] for i in self.data.indices(pairs)]))


def step_contenders() -> dict[str, StepContender]:
    out: dict[str, StepContender] = {"official-tpo": OfficialTPOStep(), "trl-dpo": TRLDPOStep()}
    for objective in ("dpo", "tpo"):
        for shared in (False, True):
            c = OursStep(objective, shared)
            out[c.name] = c
    for c in (OursStep("tpo", shared=True, precomputed=True), OursStep("tpo", shared=True, sdpa=True)):
        out[c.name] = c
    return out


def expected_first_loss() -> float:
    """Every contender's loss at the first step: the policy is its reference, so the margin is 0 and the loss ln 2."""
    return math.log(2.0)


__all__ = ["OfficialTPOStep", "OursStep", "StepContender", "TRLDPOStep", "dtype_of", "step_contenders"]
