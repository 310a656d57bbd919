"""Run by `torchrun --nproc_per_node 2` from tests/test_trainer_dist.py: TPO training on gloo.

Usage: run_dist.py MODE DATA_DIR OUT_FILE STEPS LR, MODE one of ddp | zero2 | zero3 (through TPOTrainer)
or fsdp2 (`fully_shard` directly, a manual loop: the HF Trainer falls back to DDP on CPU), each optionally with
a `-lora` suffix. Global batch 4 (2 per rank), sequential order, SGD. Without the suffix: the full model trains
against a frozen-copy reference. With it: a LoRA adapter trains (`tiny_setup.tiny_lora_model`), the reference is
the policy with its adapter switched off (reference="adapter") and gradient checkpointing is on. Rank 0 saves
{"losses": [...], "state": {name: tensor}} to OUT_FILE.
"""

from __future__ import annotations

import copy
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tiny_setup import load_tiny_data, state_of, tiny_lora_model, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer.collator import TPOCollator  # noqa: E402

PER_RANK = 2


def run_trainer(mode, data_dir, out_file, steps, lr, lora=False):
    from torch.utils.data import SequentialSampler

    from tpo_fast.trainer.config import TPOConfig
    from tpo_fast.trainer.trainer import TPOTrainer

    class SequentialTPOTrainer(TPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    ds, proc = load_tiny_data(data_dir), tiny_processor()
    # Built before the config: a ZeRO-3 TrainingArguments makes later model constructors partition
    # (zero.Init), which the tiny model's weight initialisation does not survive; DeepSpeed partitions
    # this model when the engine is created instead.
    torch.manual_seed(0)
    model = tiny_lora_model(proc) if lora else tiny_model(proc)
    # the whole model trains, as in the one-process baseline (tiny_setup.baseline_run), the vision tower too
    extra = {"reference": "adapter", "gradient_checkpointing": True} if lora else {"reference": "model",
                                                                                  "freeze_vision_tower": False}
    if mode in ("zero2", "zero3"):
        zero = {"stage": 2}
        if mode == "zero3":
            # Threshold 0: every parameter is partitioned, the tiny lm_head too (the path a real one takes).
            zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
        extra["deepspeed"] = {
            "zero_optimization": zero,
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": False}, "fp16": {"enabled": False},
        }
    args = TPOConfig(
        output_dir=os.path.join(os.path.dirname(out_file), f"run-{mode}"), per_device_train_batch_size=PER_RANK,
        learning_rate=lr, max_steps=steps, logging_steps=1, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, optim="sgd", save_strategy="no", report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True, loss_backend="torch", ddp_backend="gloo", **extra,
    )
    trainer = SequentialTPOTrainer(model, args=args, train_dataset=ds, processing_class=proc)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model = trainer.model_wrapped
    if mode == "zero3":
        import deepspeed

        # The lm_head weight is a 0-element shard outside the forward: the fused loss gathered it.
        head = model.module.get_output_embeddings()
        assert head.weight.numel() == 0 and head.weight.ds_numel > 0
        params = list(model.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = state_of(model.module)
    else:
        if mode == "zero2":
            # ZeRO-2 partitions gradients and optimizer state, not parameters: every rank holds them whole,
            # and the separate reference is its own stage-0 (replicated) inference engine.
            assert model.zero_optimization_stage() == 2 and trainer.model.lm_head.weight.numel() > 0
            assert type(trainer.ref_model).__name__ == "DeepSpeedEngine"
        state = state_of(trainer.model)
    if lora:  # what the mode claims to exercise did run
        from tpo_fast.trainer.model import unwrap_llava

        assert trainer.ref_model is None and trainer.reference_mode == "adapter"
        assert_packed_and_checkpointed(unwrap_llava(trainer.model))
    return losses, state


def assert_packed_and_checkpointed(llava):
    """The LoRA modes' step: the packed shared-prefix rows' attention, under gradient checkpointing."""
    from tpo_fast.trainer.row_attention import SEGMENT_ATTENTION

    assert llava.model.language_model.gradient_checkpointing
    assert llava.config.text_config._attn_implementation == SEGMENT_ATTENTION


def run_fsdp2(data_dir, out_file, steps, lr, lora=False):
    from torch.distributed.fsdp import fully_shard

    from tpo_fast.trainer.model import StepOptions, route_forward, sequence_reference_scores, unwrap_llava

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds, proc = load_tiny_data(data_dir), tiny_processor()
    collate = TPOCollator(proc)
    torch.manual_seed(0)
    if lora:
        model, ref = tiny_lora_model(proc), None
        unwrap_llava(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opts = StepOptions(reference="adapter", backend="torch")
    else:
        model = tiny_model(proc)
        ref = copy.deepcopy(model).requires_grad_(False).eval()
        opts = StepOptions(reference="model", backend="torch")
    llava = unwrap_llava(model)
    vision = llava.model.vision_tower
    vision_layers = vision.vision_model.encoder.layers if hasattr(vision, "vision_model") else vision.encoder.layers
    for layer in list(llava.model.language_model.layers) + list(vision_layers):
        fully_shard(layer)
    fully_shard(model)  # the root group holds embeddings, projector, norm and lm_head
    route_forward(model, opts)
    assert type(llava.lm_head.weight).__name__ == "DTensor"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        start = step * PER_RANK * world + rank * PER_RANK
        batch = collate([ds[i] for i in range(start, start + PER_RANK)])
        ref_scores = None if ref is None else sequence_reference_scores(ref, batch, opts)
        out = model(tpo_batch=batch, tpo_ref_scores=ref_scores)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        loss = out["loss"].detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / world)
    if lora:
        assert_packed_and_checkpointed(llava)
    return losses, state_of(model)


def main():
    mode, data_dir, out_file, steps, lr = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    base, lora = mode.removesuffix("-lora"), mode.endswith("-lora")
    if base == "fsdp2":
        losses, state = run_fsdp2(data_dir, out_file, steps, lr, lora)
    elif base in ("ddp", "zero2", "zero3"):
        losses, state = run_trainer(base, data_dir, out_file, steps, lr, lora)
    else:
        raise SystemExit(f"mode must be ddp, zero2, zero3 or fsdp2, optionally with -lora, got {mode!r}")
    finish({"losses": losses, "state": state, "world": int(os.environ["WORLD_SIZE"])}, out_file)


def finish(result, out_file: str) -> None:
    """Rank 0 saves `result`; every rank leaves the process group and exits."""
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, out_file)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: a gloo process group still referenced by the DDP / FSDP objects is
    # destroyed there, in whatever order, and a worker thread still joinable then aborts the rank ("terminate called
    # without an active exception", exit -6) after a run that succeeded (seen twice in CI, ddp and fsdp2).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
