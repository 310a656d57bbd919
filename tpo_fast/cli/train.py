"""`tpo-fast train` (and `tpo-fast povid`, the same with the POVID objective): `TPOTrainer` on a data file."""

from __future__ import annotations

import argparse

from tpo_fast.cli._common import (
    DEMO_HINT,
    OBJECTIVES,
    UsageError,
    add_run_arguments,
    need_at_least,
    need_checkpoint,
    need_dir,
    need_file,
    need_model,
)

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
                   help="POVID: weight w of DPO(chosen vs noisy argmax); 1 - w goes to DPO(chosen vs rejected)")
    p.add_argument("--beta", type=float, default=0.1, help="inverse temperature of the preference loss")
    p.add_argument("--offset", type=float, default=0.5, help="offset a of TPO's token weight")
    p.add_argument("--detach-weights", action="store_true", help="no gradient through the corrupted-image branch")
    p.add_argument("--grad-mode", choices=("auto", "fused", "recompute"), default="auto",
                   help="loss gradient: fused (computed in the forward, no logits recompute), recompute "
                        "(the per-token primitive's backward), or auto: fused, measured the faster on the CPU and "
                        "on an H200 (recompute for fp16 on the triton backend)")
    p.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                   help="turn the shared prefix off: run each pair's image and prompt twice (padded rows) instead "
                        "of once per pair (default: shared_prefix=%(default)s, the shared prefix on)")
    p.add_argument("--padding-free", choices=("auto", "on", "off"), default="auto",
                   help="pack a micro-batch into one row without padding: auto (flex_attention, whose block mask "
                        "skips the other pairs, and SDPA without a sliding window, attended sequence by sequence "
                        "through tpo_fast_sdpa; not eager), on, off")
    p.add_argument("--loss-type", choices=("sigmoid", "hinge", "ipo"), default="sigmoid",
                   help="preference loss on the reward margin")
    p.add_argument("--reference", choices=("auto", "model", "adapter", "none"), default="auto",
                   help="reference scores: auto (a frozen copy, or the base under LoRA), model, adapter, none")
    p.add_argument("--precompute-reference", action="store_true",
                   help="score the data with the reference once and cache it (exact with seeded noise)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: --epochs)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--warmup-steps", type=int, default=0, help="learning-rate warm-up steps")
    p.add_argument("--scheduler", default="cosine", help="learning-rate schedule (a transformers scheduler name)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 with a warning where unsupported)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--attn-implementation", default=None,
                   help="attention kernel: sdpa, or flash_attention_2 when installed (none: sdpa for a packed step "
                        "(shared prefix or padding-free), else flash_attention_2 where installed on CUDA)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 trains the full model")
    p.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (none: 2 x --lora-r)")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated module names for LoRA")
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


def check(a: argparse.Namespace) -> None:
    need_model(a.model)
    need_file(a.data, "--data", f"pass a .json, .jsonl or .parquet file of preference records; {DEMO_HINT}")
    need_dir(a.image_folder, "--image-folder", "pass the folder that the records' image paths are relative to")
    need_file(a.deepspeed, "--deepspeed", "pass a DeepSpeed JSON config file")
    need_checkpoint(a.resume, a.output_dir)
    need_at_least(batch_size=(a.batch_size, 1), grad_accum=(a.grad_accum, 1), max_length=(a.max_length, 1),
                  logging_steps=(a.logging_steps, 1), save_steps=(a.save_steps, 1), warmup_steps=(a.warmup_steps, 0),
                  lora_r=(a.lora_r, 0), noise_step=(a.noise_step, 0), epochs=(a.epochs, 0))
    if a.noise_step > 999:
        raise UsageError(f"--noise-step {a.noise_step}: the diffusion schedule has steps 0 to 999; pass one of those")
    if not a.beta > 0:
        raise UsageError(f"--beta {a.beta}: must be > 0; pass the preference loss's inverse temperature, e.g. 0.1")
    if a.noise_seed < 0:
        cached = (("--precompute-reference", a.precompute_reference), ("--corrupted-cache", a.corrupted_cache))
        for flag, given in cached:
            if given:
                raise UsageError(f"--noise-seed {a.noise_seed} (fresh noise at every load) with {flag}: cached scores "
                                 "or images would not match the images trained on; pass a seed >= 0")


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
        shared_prefix=a.shared_prefix, padding_free={"auto": None, "on": True, "off": False}[a.padding_free],
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
        a.data, a.image_folder, noise_step=a.noise_step, noise_seed=noise_seed, overflow=a.noise_overflow,
        corrupted_cache_dir=a.corrupted_cache, on_bad=a.bad_records,
    )
    processor = AutoProcessor.from_pretrained(a.model)
    dtype = training_weight_dtype(a.bf16, lora=a.lora_r > 0, deepspeed=bool(a.deepspeed))
    model = load_llava(a.model, dtype, a.attn_implementation, packed=may_pack(args.shared_prefix, args.padding_free))
    peft_config = None
    if a.lora_r > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=a.lora_r, lora_alpha=a.lora_alpha or 2 * a.lora_r, lora_dropout=0.0,
            target_modules=[t.strip() for t in a.lora_targets.split(",") if t.strip()],
        )
    trainer = TPOTrainer(model, args=args, train_dataset=dataset, processing_class=processor, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=a.resume)
    trainer.save_model(a.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(a.output_dir)
    return 0
