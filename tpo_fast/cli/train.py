"""`tpo-fast train` (and `tpo-fast povid`, the same with the POVID objective): `TPOTrainer` on a data file."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
from pathlib import Path

from tpo_fast.cli._common import (
    DEMO_HINT,
    OBJECTIVES,
    UsageError,
    add_run_arguments,
    data_error,
    need_at_least,
    need_backend,
    need_checkpoint,
    need_dir,
    need_file,
    need_learning_rate,
    need_model,
    need_output_dir,
    need_seed,
    need_valid,
)

# The learning-rate schedules of transformers' `SchedulerType` that train without `lr_scheduler_kwargs` or an
# evaluation strategy (neither of which `tpo-fast train` sets): tests/test_cli_flags.py keeps this list equal to those
# of the installed transformers, which is not imported to check a command line.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
# Attention implementations of transformers' `from_pretrained` (transformers >= 5.17 has them all; the flash ones
# need their package, and CUDA).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")

EPILOG = """\
example, on CPU, after `tpo-fast demo --output-dir demo`:
  tpo-fast train --model demo/model --data demo/data/pairs.jsonl --image-folder demo/data/images \\
      --output-dir run --max-steps 20 --lr 1e-3
"""


def add_arguments(p: argparse.ArgumentParser, objective: str | None = None) -> None:
    """The `train` flags; with `objective` given there is no --objective flag (`tpo-fast povid`)."""
    add_run_arguments(p, output_help="output folder: checkpoints, logs and the final model and processor",
                      lr=5e-7, batch_size=2, seed=42, batch_help="pairs per device per micro-batch")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="preference records (.json, .jsonl or .parquet; RLHF-V, POVID or chosen/rejected fields)")
    if objective is None:
        p.add_argument("--objective", choices=OBJECTIVES, default="tpo",
                       help="tpo (token-weighted), dpo (plain DPO), or povid (POVID stage 2)")
    else:
        p.set_defaults(objective=objective)
    p.add_argument("--povid-noise-weight", "--noise-weight", dest="povid_noise_weight", type=float, default=0.5,
                   help="POVID: weight w in [0, 1] of DPO(chosen vs noisy argmax); 1 - w goes to DPO(chosen vs "
                        "rejected)")
    p.add_argument("--beta", type=float, default=0.1, help="inverse temperature of the preference loss, finite, > 0")
    p.add_argument("--offset", type=float, default=0.5, help="offset a of TPO's token weight, finite, >= 0")
    p.add_argument("--detach-weights", action="store_true", help="no gradient through the corrupted-image branch")
    p.add_argument("--grad-mode", choices=("auto", "fused", "recompute"), default="auto",
                   help="loss gradient: fused (computed in the forward, no logits recompute), recompute "
                        "(the per-token primitive's backward), or auto: fused, measured the faster on the CPU and "
                        "on an H200 (recompute for fp16 on the triton backend)")
    p.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                   help="turn the shared prefix off: run each pair's image and prompt twice (padded rows) instead "
                        "of once per pair (default: shared_prefix=%(default)s, the shared prefix on)")
    p.add_argument("--train-vision-tower", dest="freeze_vision_tower", action="store_false",
                   help="train the vision tower too (full fine-tune: its weights; LoRA: the targets it names as "
                        "well) instead of leaving it frozen, as the official TPO recipe does (default: "
                        "freeze_vision_tower=%(default)s, the tower frozen)")
    p.add_argument("--padding-free", choices=("auto", "on", "off"), default="auto",
                   help="pack a micro-batch into one row without padding: auto (flex_attention, whose block mask "
                        "skips the other pairs, and SDPA without a sliding window, attended sequence by sequence "
                        "through tpo_fast_sdpa; not eager), on, off")
    p.add_argument("--loss-type", choices=("sigmoid", "hinge", "ipo"), default="sigmoid",
                   help="preference loss on the reward margin")
    p.add_argument("--reference", choices=("auto", "model", "adapter", "none"), default="auto",
                   help="reference scores: auto (a frozen copy, or the base under LoRA), model, adapter (the base "
                        "under LoRA: needs --lora-r), none")
    p.add_argument("--precompute-reference", action="store_true",
                   help="score the data with the reference once and cache it (exact with seeded noise; not with "
                        "--reference none)")
    p.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the data, > 0 (unused with --max-steps, which then decides)")
    p.add_argument("--max-steps", type=int, default=-1,
                   help="stop after this many optimizer steps, >= 1 (-1: --epochs decides)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--warmup-steps", type=int, default=0, help="learning-rate warm-up steps")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="cosine", metavar="NAME",
                   help=f"learning-rate schedule: {', '.join(SCHEDULERS)} (transformers' schedules that need no "
                        "extra arguments)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 with a warning where unsupported)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS, default=None, metavar="NAME",
                   help=f"attention kernel: {', '.join(ATTN_IMPLEMENTATIONS)}; the flash ones where installed, on "
                        "CUDA (none: sdpa for a packed step "
                        "(shared prefix or padding-free), else flash_attention_2 where installed on CUDA)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 trains the full model")
    p.add_argument("--lora-alpha", type=int, default=None,
                   help="LoRA alpha, >= 1: the adapter is scaled by alpha / r (none: 2 x --lora-r)")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated module names for LoRA (not lm_head: the fused losses read its weight)")
    p.add_argument("--noise-step", type=int, default=500, help="diffusion step of the image corruption")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the corruption noise; -1 for fresh noise")
    p.add_argument("--noise-overflow", choices=("wrap", "clamp"), default="wrap",
                   help="corrupted pixels past [0, 255]: wrap (official code) or clamp")
    p.add_argument("--corrupted-cache", default=None, metavar="DIR",
                   help="folder caching corrupted images (created; needs a seeded noise)")
    p.add_argument("--max-length", type=int, default=None, help="longest row in tokens (none: no cut)")
    p.add_argument("--bad-records", choices=("skip", "error"), default="skip",
                   help="unusable records: skip them with a warning naming each, or fail listing every bad one")
    p.add_argument("--logging-steps", type=int, default=10, help="log the metrics every this many steps")
    p.add_argument("--save-steps", type=int, default=500, help="save a checkpoint every this many steps")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT_DIR",
                   help="resume from the last checkpoint in --output-dir, or from the given checkpoint folder")
    p.add_argument("--deepspeed", default=None, metavar="FILE", help="DeepSpeed JSON config")
    p.add_argument("--cpu", action="store_true", help="train on CPU even when CUDA is present")


def lora_targets(a: argparse.Namespace) -> list[str]:
    """The module names of `--lora-targets`, blanks dropped."""
    return [t.strip() for t in a.lora_targets.split(",") if t.strip()]


def check(a: argparse.Namespace) -> None:
    need_model(a.model)
    need_file(a.data, "--data", f"pass a .json, .jsonl or .parquet file of preference records; {DEMO_HINT}")
    need_dir(a.image_folder, "--image-folder", "pass the folder that the records' image paths are relative to")
    need_file(a.deepspeed, "--deepspeed", "pass a DeepSpeed JSON config file")
    check_deepspeed_config(a.deepspeed)
    need_output_dir(a.output_dir)
    need_seed(a.seed)
    checkpoint = need_checkpoint(a.resume, a.output_dir)
    need_at_least(batch_size=(a.batch_size, 1), grad_accum=(a.grad_accum, 1), max_length=(a.max_length, 1),
                  logging_steps=(a.logging_steps, 1), save_steps=(a.save_steps, 1), warmup_steps=(a.warmup_steps, 0),
                  lora_r=(a.lora_r, 0), lora_alpha=(a.lora_alpha, 1), noise_step=(a.noise_step, 0),
                  epochs=(a.epochs, 0))
    if a.noise_step > 999:
        raise UsageError(f"--noise-step {a.noise_step}: the diffusion schedule has steps 0 to 999; pass one of those")
    check_lengths(a)
    check_loss(a)
    check_model_options(a)
    check_resumed_adapter(a, checkpoint)
    if a.noise_seed < -1:  # -1 is the one marker of fresh noise
        raise UsageError(f"--noise-seed {a.noise_seed}: must be >= 0, or -1 for fresh noise at every load; pass a "
                         "seed in range")
    if a.noise_seed < 0:
        cached = (("--precompute-reference", a.precompute_reference), ("--corrupted-cache", a.corrupted_cache))
        for flag, given in cached:
            if given:
                raise UsageError(f"--noise-seed {a.noise_seed} (fresh noise at every load) with {flag}: cached scores "
                                 "or images would not match the images trained on; pass a seed >= 0")


def check_lengths(a: argparse.Namespace) -> None:
    """The run's length and learning rate. The Hugging Face Trainer trains --max-steps steps when it is > 0 (the
    epochs then only number the passes), else --epochs passes: 0 of them would save the untrained model."""
    if a.max_steps == 0 or a.max_steps < -1:
        raise UsageError(f"--max-steps {a.max_steps}: must be >= 1, or -1 to train --epochs passes; pass a value in "
                         "range")
    if a.max_steps == -1 and not 0 < a.epochs < math.inf:
        raise UsageError(f"--epochs {a.epochs}: must be a finite number > 0 when --max-steps is -1 (the epochs decide "
                         "the run's length); pass a number of passes, e.g. 1, or --max-steps N")
    need_learning_rate(a.lr, "5e-7")


def check_loss(a: argparse.Namespace) -> None:
    """The loss options, by the loss layer's own checks (those of `TPOConfig` and the losses)."""
    from tpo_fast.loss import check_loss_options, check_povid_options
    from tpo_fast.loss._checks import check_offset

    if not a.beta > 0:  # this message stays the CLI's (tests/test_cli.py); the loss layer's rule adds: finite
        raise UsageError(f"--beta {a.beta}: must be > 0; pass the preference loss's inverse temperature, e.g. 0.1")
    need_valid(f"--beta {a.beta}", lambda: check_loss_options(a.beta, loss_type=a.loss_type),
               "pass the preference loss's inverse temperature, e.g. 0.1")
    need_valid(f"--offset {a.offset}", lambda: check_offset(a.offset), "pass TPO's token-weight offset a, e.g. 0.5")
    need_valid(f"--povid-noise-weight {a.povid_noise_weight}", lambda: check_povid_options(a.povid_noise_weight),
               "pass POVID's weight w of the noisy-argmax term, in [0, 1]")


def check_model_options(a: argparse.Namespace) -> None:
    """The reference, the adapter and the kernels' backend: what `TPOTrainer` and its first step would refuse."""
    if a.reference == "adapter" and a.lora_r == 0:
        raise UsageError("--reference adapter: the reference is the base model under a LoRA adapter, and there is no "
                         "adapter without --lora-r; pass --lora-r R, or --reference auto or model")
    if a.reference == "none" and a.precompute_reference:
        raise UsageError("--precompute-reference with --reference none: there is no reference to score; drop "
                         "--precompute-reference, or pass --reference auto")
    if a.lora_r == 0 and a.lora_alpha is not None:
        raise UsageError(f"--lora-alpha {a.lora_alpha} without --lora-r: the run would be a full fine-tune and ignore "
                         "it; pass --lora-r R for LoRA, or drop --lora-alpha")
    if a.lora_r > 0:
        targets = lora_targets(a)
        if not targets:
            raise UsageError(f"--lora-targets {a.lora_targets!r}: no module names; pass comma-separated module names, "
                             "e.g. q_proj,v_proj")
        head = [t for t in targets if t.rsplit(".", 1)[-1] == "lm_head"]
        if head:
            raise UsageError(f"--lora-targets {a.lora_targets}: an adapter on {head[0]} would be left out of the loss "
                             "(the fused losses read the lm_head weight itself); leave lm_head out of --lora-targets")
        if importlib.util.find_spec("peft") is None:
            raise UsageError(f"--lora-r {a.lora_r}: LoRA needs the peft package, which is not installed; run: pip "
                             "install peft (or pip install 'tpo-fast[train]'), or drop --lora-r for a full fine-tune")
        check_lora_targets(a, targets)
    need_backend(a.backend, a.cpu)
    check_attention(a)


def check_attention(a: argparse.Namespace) -> None:
    """`--attn-implementation` where the run trains: the flash kernels need CUDA and their package (transformers
    raises its ImportError when the model loads), and flex_attention a backward on the training device (torch has
    none on the CPU: the first step raises NotImplementedError)."""
    name = a.attn_implementation
    if name is None or name in ("sdpa", "eager"):
        return
    import torch

    on_cpu = a.cpu or not torch.cuda.is_available()
    where = "with --cpu" if a.cpu else "on this machine, which has no CUDA"
    if name.startswith("flash_attention"):
        if on_cpu:
            raise UsageError(f"--attn-implementation {name}: the flash kernels run on CUDA only, and the run trains on "
                             f"the CPU ({where}); pass sdpa or eager")
        from transformers.utils import import_utils

        version = name.rsplit("_", 1)[-1]
        available = getattr(import_utils, f"is_flash_attn_{version}_available", None)
        if available is None:  # a transformers without this probe: from_pretrained decides
            return
        try:
            found = available(kernels_fallback_ok=True)  # the `kernels` hub fallback counts too
        except TypeError:  # a transformers whose probe takes no such argument
            found = available()
        if not found:
            package = "flash-attn" if version == "2" else "flash-attn-3"
            raise UsageError(f"--attn-implementation {name}: its package ({package}) is not installed; install it, or "
                             "pass sdpa")
    elif name == "flex_attention" and on_cpu:
        from torch.nn.attention.flex_attention import flex_attention

        q = torch.zeros(1, 1, 2, 8, requires_grad=True)
        try:
            flex_attention(q, q, q).sum().backward()
        except (NotImplementedError, RuntimeError) as e:
            raise UsageError(f"--attn-implementation flex_attention: the run trains on the CPU ({where}), and this "
                             f"torch has no FlexAttention backward there ({str(e).split('. ')[0]}); pass sdpa or "
                             "eager") from None


def check_deepspeed_config(path: str | None) -> None:
    """`--deepspeed FILE` must hold a JSON object (transformers reads it when the model loads, and fails there)."""
    if path is None:
        return
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"--deepspeed {path}: not a JSON file ({e}); pass a DeepSpeed JSON config, e.g. "
                         "examples/deepspeed/zero3.json") from None
    if not isinstance(config, dict):
        raise UsageError(f"--deepspeed {path}: holds a JSON {type(config).__name__}, not an object of DeepSpeed "
                         "settings; pass a DeepSpeed JSON config, e.g. examples/deepspeed/zero3.json")


def weight_names(model_dir: str) -> list[str] | None:
    """The parameter names a saved model's safetensors files hold (read from their headers, no tensor loaded), or None
    where the folder has none that can be read (a .bin checkpoint: then nothing is checked before the load)."""
    folder = Path(model_dir)
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            return list(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        names = []
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size < 1 << 28:
                    return None
                names += [k for k in json.loads(f.read(size)) if k != "__metadata__"]
        return names or None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # from_pretrained reads it and says what is wrong


def check_lora_targets(a: argparse.Namespace, targets: list[str]) -> None:
    """Each `--lora-targets` name must end some module name of the model (by its last part, which checkpoint key
    renaming leaves alone), and outside the vision tower when the tower stays frozen: peft refuses an adapter that
    matches nothing, after the model has loaded."""
    names = weight_names(a.model)
    if names is None:
        return
    modules = [n.rsplit(".", 1)[0].split(".") for n in names]
    for target in targets:
        leaf = target.rsplit(".", 1)[-1]
        found = [m for m in modules if m[-1] == leaf]
        if not found:
            raise UsageError(f"--lora-targets {a.lora_targets}: {target} names no module of the model in {a.model}; "
                             "pass names of its linear layers, e.g. q_proj,k_proj,v_proj,o_proj")
        if a.freeze_vision_tower and all("vision_tower" in m for m in found):
            raise UsageError(f"--lora-targets {a.lora_targets}: {target} names only modules of the vision tower, which "
                             "stays frozen; target the language model's layers, or pass --train-vision-tower")


def check_resumed_adapter(a: argparse.Namespace, checkpoint: Path | None) -> None:
    """A checkpoint goes on with the kind of run that wrote it (the Trainer's own errors come after the model loads,
    as a state dict's missing keys or an optimizer's group sizes): a LoRA adapter (its adapter_config.json) with
    --lora-r of its rank, the full model without --lora-r."""
    if checkpoint is None:
        return
    config = checkpoint / "adapter_config.json"
    if not config.is_file():
        if a.lora_r > 0:
            raise UsageError(f"--lora-r {a.lora_r} with --resume {checkpoint}: the checkpoint holds the full model, "
                             "not a LoRA adapter; drop --lora-r to go on with the full fine-tune that wrote it")
        return
    if a.lora_r == 0:
        raise UsageError(f"--resume {checkpoint}: the checkpoint holds a LoRA adapter (adapter_config.json); pass the "
                         "--lora-r and --lora-targets of the run that wrote it")
    try:
        rank = json.loads(config.read_text(encoding="utf-8")).get("r")
    except (OSError, ValueError, AttributeError):
        return  # the Trainer reads it and says what is wrong
    if isinstance(rank, int) and rank != a.lora_r:
        raise UsageError(f"--lora-r {a.lora_r} with --resume {checkpoint}: the checkpoint's adapter has rank {rank}; "
                         f"pass --lora-r {rank}")


class _HeldLogs(logging.Filter):
    """Holds back the records of a logger while it is attached (to log them later, or drop them)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def load_data(a: argparse.Namespace, dataset_class, noise_seed: int | None):
    """The `--data` records as a dataset, read before the model loads; None after one line on stderr when the file
    has no usable record (a bad command line: exit code 2). The warning naming the skipped records is logged only
    when the run goes on; where nothing is usable, the error line says how to list them."""
    logger = logging.getLogger("tpo_fast")
    held = _HeldLogs()
    logger.addFilter(held)
    try:
        dataset = dataset_class.from_file(
            a.data, a.image_folder, noise_step=a.noise_step, noise_seed=noise_seed, overflow=a.noise_overflow,
            corrupted_cache_dir=a.corrupted_cache, on_bad=a.bad_records,
        )
    except ValueError as e:
        hint = "pass --bad-records error to list why each is bad, or" if a.bad_records == "skip" else "or"
        data_error(getattr(a, "command", "train"), str(e).rstrip("."), f"{hint} pass another --data file")
        return None
    finally:
        logger.removeFilter(held)
    for record in held.records:
        logger.handle(record)
    return dataset


def run(a: argparse.Namespace) -> int:
    import torch
    from transformers import AutoProcessor

    from tpo_fast.trainer.config import TPOConfig
    from tpo_fast.trainer.data import PreferenceDataset
    from tpo_fast.trainer.packing import may_pack
    from tpo_fast.trainer.trainer import TPOTrainer, load_llava, training_weight_dtype

    noise_seed = None if a.noise_seed < 0 else a.noise_seed
    args = TPOConfig(
        output_dir=a.output_dir, objective=a.objective, povid_noise_weight=a.povid_noise_weight, beta=a.beta,
        offset=a.offset, detach_weights=a.detach_weights, loss_backend=a.backend, loss_grad_mode=a.grad_mode,
        shared_prefix=a.shared_prefix, freeze_vision_tower=a.freeze_vision_tower,
        padding_free={"auto": None, "on": True, "off": False}[a.padding_free],
        loss_type=a.loss_type, reference=a.reference, precompute_reference=a.precompute_reference,
        num_train_epochs=a.epochs, max_steps=a.max_steps, per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum, learning_rate=a.lr, warmup_steps=a.warmup_steps,
        lr_scheduler_type=a.scheduler, bf16=a.bf16, gradient_checkpointing=a.gradient_checkpointing,
        noise_step=a.noise_step, noise_seed=noise_seed, noise_overflow=a.noise_overflow,
        corrupted_cache_dir=a.corrupted_cache, max_length=a.max_length, bad_records=a.bad_records,
        logging_steps=a.logging_steps, save_steps=a.save_steps, deepspeed=a.deepspeed, seed=a.seed,
        use_cpu=a.cpu or not torch.cuda.is_available(), report_to="none",
    )
    dataset = load_data(a, PreferenceDataset, noise_seed)  # before the model loads
    if dataset is None:
        return 2
    processor = AutoProcessor.from_pretrained(a.model)
    dtype = training_weight_dtype(a.bf16, lora=a.lora_r > 0, deepspeed=bool(a.deepspeed))
    model = load_llava(a.model, dtype, a.attn_implementation, packed=may_pack(args.shared_prefix, args.padding_free))
    peft_config = None
    if a.lora_r > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=a.lora_r, lora_alpha=2 * a.lora_r if a.lora_alpha is None else a.lora_alpha, lora_dropout=0.0,
            target_modules=lora_targets(a),
        )
    trainer = TPOTrainer(model, args=args, train_dataset=dataset, processing_class=processor, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=a.resume)
    trainer.save_model(a.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(a.output_dir)
    return 0
