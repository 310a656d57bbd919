"""Run by `torchrun --nproc_per_node 2` from tests/test_audit_dist_dec8.py: several TPOTrainer runs in one launch.

Usage: run_dist_audit.py CASES_JSON OUT_FILE. CASES_JSON holds a list of cases, each a dict with
"name", "data" (a folder of `tiny_setup.tiny_data`), "per_device", "accumulation", "steps", "lr", "sampler"
("sequential", or "random": the Trainer's own shuffled sampler), "zero3" (bool), "iterable" (bool: the records
in file order as a `torch.utils.data.IterableDataset`), "lora" (bool: `tiny_setup.tiny_lora_model` instead; its
config sets the reference) and "config" (more TPOConfig fields: objective,
detach_weights, precompute_reference, accelerator_config, ...). A case whose training raises a ValueError records
its message as {"error": ...} instead. Each case trains `tiny_setup.tiny_model` (seed 0,
every weight, the vision tower too) with SGD and no clipping, as `tiny_setup.baseline_run` does, and rank 0 saves
{name: {"losses", "logs" (every training log), "state", "batches" (per optimizer step, the record indices of its
micro-batches on every rank, in rank order), "world"}} to OUT_FILE: the test replays each step's records in one
process as its oracle. The trainer's clock (`tpo_fast.trainer.trainer.time.perf_counter`) is replaced by one
that advances 10 s a call, so that `tokens_per_second` * 10 is the window's token count (one window per step).
"""

from __future__ import annotations

import json
import os
import sys
import types

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from run_dist import finish  # noqa: E402
from tiny_setup import load_tiny_data, state_of, tiny_lora_model, tiny_model, tiny_processor  # noqa: E402

import tpo_fast.trainer.trainer as trainer_module  # noqa: E402

CLOCK_STEP = 10.0


class _Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += CLOCK_STEP
        return self.now


class IterableRecords(torch.utils.data.IterableDataset):
    """A map-style dataset's items in order, as a stream."""

    def __init__(self, ds):
        self.ds = ds

    def __iter__(self):
        return (self.ds[i] for i in range(len(self.ds)))


def run_case(case: dict, out_dir: str) -> dict:
    from torch.utils.data import SequentialSampler

    from tpo_fast.trainer.config import TPOConfig
    from tpo_fast.trainer.trainer import TPOTrainer

    seen: list[list[int]] = []

    class RecordingTrainer(TPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            if case["sampler"] == "sequential":
                return SequentialSampler(self.train_dataset)
            return super()._get_train_sampler(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inner = getattr(model, "module", model)
            if inner.training:
                seen.append(inputs["index"].cpu().tolist())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer_module.time = types.SimpleNamespace(perf_counter=_Clock().perf_counter)
    ds, proc = load_tiny_data(case["data"]), tiny_processor()
    # Built before the config, and with no earlier case's ZeRO-3 config active: it would make the model's
    # constructors partition (zero.Init), as tests/dist/run_dist.py says; DeepSpeed partitions it in the engine.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    torch.manual_seed(0)
    model = tiny_lora_model(proc) if case.get("lora") else tiny_model(proc)
    extra = {"reference": "model", "freeze_vision_tower": False, **case["config"]}
    if case["zero3"]:
        extra["deepspeed"] = {
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": False}, "fp16": {"enabled": False},
        }
    args = TPOConfig(
        output_dir=os.path.join(out_dir, f"run-{case['name']}"), per_device_train_batch_size=case["per_device"],
        gradient_accumulation_steps=case["accumulation"], learning_rate=case["lr"], max_steps=case["steps"],
        logging_steps=1, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        optim="sgd", save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        loss_backend="torch", ddp_backend="gloo", **extra,
    )
    if case.get("iterable"):
        ds = IterableRecords(ds)
    trainer = RecordingTrainer(model, args=args, train_dataset=ds, processing_class=proc)
    try:
        trainer.train()
    except ValueError as e:
        return {"error": str(e)}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    if case["zero3"]:
        import deepspeed

        params = list(trainer.model_wrapped.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = state_of(trainer.model_wrapped.module)
    else:
        state = state_of(trainer.model)
    world = dist.get_world_size()
    everyone: list[list[list[int]]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(everyone, seen)
    steps = case["steps"]
    batches = []
    for step in range(steps):
        micro = slice(step * case["accumulation"], (step + 1) * case["accumulation"])
        batches.append([rows for rank_seen in everyone for rows in rank_seen[micro]])
    return {"losses": [h["loss"] for h in logs], "logs": logs, "state": state, "batches": batches, "world": world}


def main():
    cases_file, out_file = sys.argv[1], sys.argv[2]
    with open(cases_file) as f:
        cases = json.load(f)
    results = {case["name"]: run_case(case, os.path.dirname(out_file)) for case in cases}
    finish(results, out_file)


if __name__ == "__main__":
    main()
