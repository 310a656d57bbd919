"""The `tpo-fast` command line: `tpo-fast train ...`, `tpo-fast demo`, and `csr`, `povid`, `fisao`.

Subcommands register themselves in `SUBCOMMANDS` (name -> (add_arguments, run)); adding one is
adding a pair of functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

OBJECTIVES = ("tpo", "dpo", "povid")


def _add_train_arguments(p: argparse.ArgumentParser, objective: str | None = None) -> None:
    """The `train` arguments; with `objective` given there is no --objective flag (`tpo-fast povid`).

    `--output-dir`, `--image-folder`, `--backend` and `--noise-weight` are accepted as the other
    subcommands' spellings of `--output`, `--images`, `--loss-backend` and `--povid-noise-weight`.
    """
    p.add_argument("--model", required=True, help="local LLaVA model folder (from_pretrained; nothing is downloaded)")
    p.add_argument("--data", required=True, help="preference records: .json, .jsonl or .parquet")
    p.add_argument("--images", "--image-folder", dest="images", default=None,
                   help="folder that the records' image paths are relative to")
    p.add_argument("--output", "--output-dir", dest="output", required=True,
                   help="output folder (checkpoints, logs, final model)")
    if objective is None:
        p.add_argument("--objective", choices=OBJECTIVES, default="tpo")
    else:
        p.set_defaults(objective=objective)
    p.add_argument("--povid-noise-weight", "--noise-weight", dest="povid_noise_weight", type=float, default=0.5,
                   help="POVID: weight w of DPO(chosen vs noisy argmax); 1 - w goes to DPO(chosen vs rejected)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--offset", type=float, default=0.5, help="offset a of TPO's token weight")
    p.add_argument("--detach-weights", action="store_true", help="no gradient through the corrupted-image branch")
    p.add_argument("--loss-type", choices=("sigmoid", "hinge", "ipo"), default="sigmoid")
    p.add_argument("--reference", choices=("auto", "model", "adapter", "none"), default="auto")
    p.add_argument("--precompute-reference", action="store_true",
                   help="score the data with the reference once and cache it (exact with seeded noise)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=2, help="pairs per device per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=5e-7)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--scheduler", default="cosine")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--attn-implementation", default=None, help="sdpa (default) or flash_attention_2 when installed")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 trains the full model")
    p.add_argument("--lora-alpha", type=int, default=None)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated module names for LoRA")
    p.add_argument("--noise-step", type=int, default=500)
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the corruption noise; -1 for fresh noise")
    p.add_argument("--noise-overflow", choices=("wrap", "clamp"), default="wrap")
    p.add_argument("--corrupted-cache", default=None, help="folder caching corrupted images")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--bad-records", choices=("skip", "error"), default="skip")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from the last checkpoint in --output, or from the given checkpoint folder")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cpu", action="store_true", help="train on CPU even when CUDA is present")
    p.add_argument("--loss-backend", "--backend", dest="loss_backend", default="auto",
                   choices=("auto", "triton", "torch", "reference"), help="fused loss backend")


def _run_train(a: argparse.Namespace) -> int:
    import torch
    from transformers import AutoProcessor

    from tpo_fast.trainer.config import TPOConfig
    from tpo_fast.trainer.data import PreferenceDataset
    from tpo_fast.trainer.trainer import TPOTrainer, load_llava, training_weight_dtype

    noise_seed = None if a.noise_seed < 0 else a.noise_seed
    args = TPOConfig(
        output_dir=a.output, objective=a.objective, povid_noise_weight=a.povid_noise_weight, beta=a.beta,
        offset=a.offset, detach_weights=a.detach_weights, loss_backend=a.loss_backend,
        loss_type=a.loss_type, reference=a.reference, precompute_reference=a.precompute_reference,
        num_train_epochs=a.epochs, max_steps=a.max_steps, per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum, learning_rate=a.lr, warmup_steps=a.warmup_steps,
        lr_scheduler_type=a.scheduler, bf16=a.bf16, gradient_checkpointing=a.gradient_checkpointing,
        noise_step=a.noise_step, noise_seed=noise_seed, noise_overflow=a.noise_overflow,
        corrupted_cache_dir=a.corrupted_cache, max_length=a.max_length, bad_records=a.bad_records,
        logging_steps=a.logging_steps, save_steps=a.save_steps, deepspeed=a.deepspeed, seed=a.seed,
        use_cpu=a.cpu or not torch.cuda.is_available(), report_to="none",
    )
    dataset = PreferenceDataset.from_file(
        a.data, a.images, noise_step=a.noise_step, noise_seed=noise_seed, overflow=a.noise_overflow,
        corrupted_cache_dir=a.corrupted_cache, on_bad=a.bad_records,
    )
    processor = AutoProcessor.from_pretrained(a.model)
    dtype = training_weight_dtype(a.bf16, lora=a.lora_r > 0, deepspeed=bool(a.deepspeed))
    model = load_llava(a.model, dtype, a.attn_implementation)
    peft_config = None
    if a.lora_r > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=a.lora_r, lora_alpha=a.lora_alpha or 2 * a.lora_r, lora_dropout=0.0,
            target_modules=[t.strip() for t in a.lora_targets.split(",") if t.strip()],
        )
    trainer = TPOTrainer(model, args=args, train_dataset=dataset, processing_class=processor, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=a.resume)
    trainer.save_model(a.output)
    if trainer.is_world_process_zero():
        processor.save_pretrained(a.output)
    return 0


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=200, help="training steps of 8 pairs (well under a second each on CPU)")
    p.add_argument("--objective", choices=OBJECTIVES, default="tpo")
    p.add_argument("--output", default=None, help="keep the generated data and run here (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0)


def _run_demo(a: argparse.Namespace) -> int:
    from tpo_fast.trainer.demo import run_demo

    r = run_demo(a.output, max_steps=a.steps, objective=a.objective, seed=a.seed)
    print(f"\n{'step':>6} {'loss':>8} {'reward acc':>11} {'margin':>8}")
    for h in r.history:
        print(f"{h['step']:>6} {h['loss']:>8.4f} {h['rewards/accuracies']:>11.3f} {h['rewards/margins']:>8.3f}")
    print(f"\nloss {r.first_loss:.4f} -> {r.last_loss:.4f}, "
          f"reward accuracy {r.first_accuracy:.3f} -> {r.last_accuracy:.3f}")
    return 0


SUBCOMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "train": ("TPO/DPO/POVID-train a LLaVA model on preference records", _add_train_arguments, _run_train),
    "demo": ("train a tiny random LLaVA on synthetic shapes, on CPU (no download)", _add_demo_arguments, _run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpo-fast", description="Token-level preference optimization (TPO, arXiv 2412.14487)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    from tpo_fast.methods.cli import register  # csr, povid, fisao

    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command in SUBCOMMANDS:
        return SUBCOMMANDS[args.command][2](args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
