"""Audit of 2026-12-08: `TPOTrainer` on two processes (gloo, torchrun) beyond tests/test_trainer_dist.py's default TPO.

One torchrun launch of tests/dist/run_dist_audit.py trains several cases under DDP (another two under ZeRO-3); each
case records, per optimizer step, the records every rank's micro-batches held. The oracle replays each step's records
as ONE batch in one process (a manual loop: frozen-copy reference, SGD on every weight, the step options the case
sets), and the two-process run must give its losses, logged metrics, token counts and final weights:

- DPO and POVID objectives, TPO with detached weights and another offset and beta, POVID and detached TPO under
  gradient checkpointing, POVID and DPO training a LoRA adapter against the policy with its adapter off;
- gradient accumulation 2 on two processes (2 x 2 micro-batches of one pair against one batch of 4 pairs), and 3
  with an epoch's last step of 2;
- ranks holding very unequal token counts (one rank's pairs six times as long as the other's), packed padding-free;
- `precompute_reference=True` with the Trainer's shuffled sampler: each rank looks its pairs' scores up in the
  table the ranks scored in shares and gathered (also where a share repeats a record to even the shares out);
- accelerate's `dispatch_batches` (set, or its default for an `IterableDataset`): refused with what to set, and a
  stream of pairs trained with it off;
- the logged `rewards/*`, `logps/*`, `visual_score/*`, `rewards_noisy/*`, `logps/noisy` against the oracle step's
  metrics, and `tokens_per_second` (under a clock that advances 10 s a call) against the global batch's tokens.
"""

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "dist"))

from tiny_setup import load_tiny_data, state_of, tiny_data, tiny_lora_model, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer.collator import TPOCollator  # noqa: E402
from tpo_fast.trainer.model import StepOptions, route_forward, sequence_reference_scores  # noqa: E402

STEPS, LR, CLOCK_STEP = 2, 0.5, 10.0
# metrics that are not batch means over pairs: documented as each micro-batch's share of chosen tokens
NOT_PAIR_MEANS = {"noisy/argmax_match"}
ADAPTER = {"reference": "adapter", "gradient_checkpointing": True}


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, ds):
        self.ds = ds

    def __iter__(self):
        return (self.ds[i] for i in range(len(self.ds)))


def test_dispatched_batches_are_refused_on_several_processes(tmp_path, monkeypatch):
    """The refusal of accelerate's dispatching (checked on two real processes below), in one process with the
    number of processes faked: train, eval (a dataset, a key of a dict of them) and test dataloaders; an
    IterableDataset only where `dispatch_batches` is left None; one process is never refused (nothing is cut)."""
    from accelerate import Accelerator

    from tpo_fast.trainer.config import TPOConfig
    from tpo_fast.trainer.trainer import TPOTrainer

    ds, proc = tiny_data(str(tmp_path / "data"), num_images=4), tiny_processor()
    stream = _Stream(ds)

    def trainer(dispatch, train, evals):
        args = TPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1,
                         report_to="none", use_cpu=True, loss_backend="torch", save_strategy="no",
                         accelerator_config={"dispatch_batches": dispatch})
        return TPOTrainer(tiny_model(proc), args=args, train_dataset=train, eval_dataset=evals, processing_class=proc)

    set_ = trainer(True, ds, {"a": ds})
    default = trainer(None, stream, {"a": stream, "b": ds})
    assert len(set_.get_train_dataloader()) == 2 and default.get_eval_dataloader("b") is not None  # one process
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    for call in (set_.get_train_dataloader, lambda: set_.get_eval_dataloader("a"), lambda: set_.get_eval_dataloader(),
                 lambda: set_.get_test_dataloader(ds)):
        with pytest.raises(ValueError, match=r"dispatch_batches is set: .*'dispatch_batches': False"):
            call()
    for call in (default.get_train_dataloader, lambda: default.get_eval_dataloader("a"),
                 lambda: default.get_test_dataloader(stream)):
        with pytest.raises(ValueError, match="dispatch_batches is left None for an IterableDataset"):
            call()
    default.get_eval_dataloader("b")  # a map-style dataset is not dispatched by default


def test_a_training_vision_tower_has_ddp_look_for_unused_parameters(tmp_path):
    """LLaVA never runs its vision tower's post_layernorm: where the tower trains, DDP must look for parameters
    without a gradient (the base Trainer turns that off under gradient checkpointing, and the second DDP step failed;
    on two processes: `povid-checkpointing` below). A frozen tower, and the caller's own choice, are left alone."""
    from tpo_fast.trainer.config import TPOConfig
    from tpo_fast.trainer.trainer import TPOTrainer

    ds, proc = tiny_data(str(tmp_path / "data"), num_images=2), tiny_processor()

    def chosen(**kw):
        args = TPOConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, loss_backend="torch",
                         gradient_checkpointing=True, **kw)
        TPOTrainer(tiny_model(proc), args=args, train_dataset=ds, processing_class=proc)
        return args.ddp_find_unused_parameters

    assert chosen(freeze_vision_tower=False) is True
    assert chosen() is None  # frozen: the base Trainer decides
    assert chosen(freeze_vision_tower=False, ddp_find_unused_parameters=False) is False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unequal_data(folder: str) -> str:
    """`tiny_data` whose records 0-1, 4-5, 8-9, ... have their chosen and rejected responses six times as long:
    with two pairs per rank in record order, rank 0's micro-batches hold about six times rank 1's response tokens."""
    tiny_data(folder)
    path = os.path.join(folder, "pairs.jsonl")
    with open(path) as f:
        records = [json.loads(line) for line in f]
    for i, r in enumerate(records):
        if (i // 2) % 2 == 0:
            r["chosen"] = " ".join([r["chosen"]] * 6)
            r["rejected"] = " ".join([r["rejected"]] * 6)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return folder


def replay(data: str, batches: list[list[list[int]]], options: StepOptions, lr: float, lora: bool = False):
    """One process, the oracle: each step's records (every rank's micro-batches together) as one batch. With `lora`
    the policy is `tiny_lora_model` against a frozen copy of the model without the adapter, on padded rows (as
    `tiny_setup.baseline_run`): the two-process run takes the policy with its adapter off, packed."""
    ds, proc = load_tiny_data(data), tiny_processor()
    collate = TPOCollator(proc)
    torch.manual_seed(0)
    if lora:
        ref = tiny_model(proc).requires_grad_(False).eval()
        model = tiny_lora_model(proc)
        options = StepOptions(**{**options.__dict__, "shared_prefix": False, "padding_free": False})
    else:
        model = tiny_model(proc)
        ref = copy.deepcopy(model).requires_grad_(False).eval()
    route_forward(model, options)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, metrics, tokens = [], [], []
    for step in batches:
        records = [i for micro in step for i in micro]
        batch = collate([ds[i] for i in records])
        out = model(tpo_batch=batch, tpo_ref_scores=sequence_reference_scores(ref, batch, options))
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"].detach()))
        metrics.append({k: float(v) for k, v in out["metrics"].items()})
        tokens.append(int(batch["attention_mask"].sum()))
    return losses, metrics, tokens, state_of(model)


def _launch(cases: list[dict], tmp_path) -> dict:
    cases_file, out = tmp_path / "cases.json", tmp_path / "out.pt"
    cases_file.write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(HERE, "dist", "run_dist_audit.py"), str(cases_file),
           str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=False)


def _case(name, data, config=None, per_device=2, accumulation=1, sampler="sequential", zero3=False, iterable=False,
          steps=STEPS, lora=False):
    return {"name": name, "data": data, "config": config or {}, "per_device": per_device,
            "accumulation": accumulation, "steps": steps, "lr": LR, "sampler": sampler, "zero3": zero3,
            "iterable": iterable, "lora": lora}


def _options(config: dict) -> StepOptions:
    names = {"objective": "objective", "detach_weights": "detach_weights", "offset": "offset", "beta": "beta",
             "povid_noise_weight": "noise_weight"}
    return StepOptions(reference="model", backend="torch",
                       **{names[k]: v for k, v in config.items() if k in names})


def _check_case(case: dict, result: dict) -> None:
    name = case["name"]
    assert result["world"] == 2
    batches = result["batches"]
    # every micro-batch took per_device pairs, every step the same number of micro-batches on each rank (at most
    # `accumulation`), no record twice in a step
    assert len(batches) == case["steps"]
    for step in batches:
        records = [i for micro in step for i in micro]
        assert {len(micro) for micro in step} == {case["per_device"]}, (name, batches)
        assert len(step) % 2 == 0 and len(step) <= 2 * case["accumulation"], (name, batches)
        assert len(records) == len(set(records)), (name, batches)
    losses, metrics, tokens, state = replay(case["data"], batches, _options(case["config"]), case["lr"], case["lora"])
    assert result["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6), name
    assert losses[1] != pytest.approx(losses[0])  # the step changed the model
    for step, (log, want, count) in enumerate(zip(result["logs"], metrics, tokens, strict=True)):
        for key, value in want.items():
            if key in NOT_PAIR_MEANS or (step == 0 and key.endswith("/accuracies")):
                # the first step's policy is its reference: each reward is 0 up to rounding (a cached reference's
                # scored in other batches), and `chosen > rejected` compares roundings
                continue
            assert key in log, (name, key, sorted(log))
            assert log[key] == pytest.approx(value, rel=1e-4, abs=2e-6), (name, key, log[key], value)
        assert log["tokens_per_second"] * CLOCK_STEP == pytest.approx(count, abs=0.05), (name, log, count)
    assert set(result["state"]) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, key=key: f"{name}: {key}: {m}")


@pytest.mark.slow
def test_ddp_objectives_accumulation_unequal_tokens_and_precomputed_reference_match_one_process(tmp_path):
    plain = str(tmp_path / "plain")
    tiny_data(plain)
    unequal = unequal_data(str(tmp_path / "unequal"))
    odd = str(tmp_path / "odd")
    tiny_data(odd, num_images=15)  # the ranks' scoring shares even out with record 13 scored twice
    cases = [
        _case("dpo", plain, {"objective": "dpo"}),
        _case("povid", plain, {"objective": "povid"}),
        _case("tpo-weights", plain, {"detach_weights": True, "offset": 1.0, "beta": 0.5}),
        _case("accumulation", plain, per_device=1, accumulation=2),
        _case("unequal", unequal),
        # 16 records, 6 pairs a step: the epoch's third step accumulates 2 micro-batches of one pair per rank
        _case("accumulation-remainder", plain, per_device=1, accumulation=3, steps=3),
        # The vision tower trains here, whose post_layernorm LLaVA never runs: DDP must look for unused parameters,
        # which the base Trainer turns off under gradient checkpointing (the second step failed, "Expected to have
        # finished reduction in the prior iteration ..."); the trainer turns it on where the tower trains.
        _case("povid-checkpointing", plain, {"objective": "povid", "gradient_checkpointing": True}),
        _case("detached-checkpointing", plain, {"detach_weights": True, "gradient_checkpointing": True}),
        # a LoRA adapter against the policy with its adapter off (packed, checkpointed), as tests/dist/run_dist.py's
        # `-lora` modes, for the other objectives
        _case("lora-povid", plain, {"objective": "povid", **ADAPTER}, lora=True),
        _case("lora-dpo-accumulation", unequal, {"objective": "dpo", **ADAPTER}, per_device=1, accumulation=2,
              lora=True),
        _case("precomputed", plain, {"precompute_reference": True}, sampler="random"),
        _case("precomputed-odd", odd, {"precompute_reference": True}, sampler="random"),
        _case("precomputed-povid-accumulation", unequal, {"precompute_reference": True, "objective": "povid"},
              per_device=1, accumulation=2, sampler="random"),
        # a stream of pairs, which each process reads and shards by pairs (accelerate's IterableDatasetShard)
        _case("iterable-undispatched", plain, {"accelerator_config": {"dispatch_batches": False}}, iterable=True),
    ]
    refused = [
        _case("dispatched", plain, {"accelerator_config": {"dispatch_batches": True}}),
        _case("iterable-dispatched", plain, iterable=True),  # accelerate's default for a stream: dispatched
    ]
    results = _launch(cases + refused, tmp_path)
    # Dispatched batches were collated on rank 0 and cut into row slices for the ranks (rank 0: the chosen rows of
    # every pair, rank 1: their rejected rows without images); refused before the first step now.
    assert "dispatch_batches is set" in results["dispatched"]["error"]
    assert "dispatch_batches is left None for an IterableDataset" in results["iterable-dispatched"]["error"]
    assert "accelerator_config={'dispatch_batches': False}" in results["dispatched"]["error"]
    assert [len(step) for step in results["accumulation-remainder"]["batches"]] == [6, 6, 4]
    # the shuffled runs did shuffle: not the records in file order
    assert results["precomputed"]["batches"][0] != [[0, 1], [2, 3]]
    for case in cases:
        _check_case(case, results[case["name"]])


@pytest.mark.slow
def test_zero3_povid_accumulation_and_precomputed_dpo_match_one_process(tmp_path):
    """The same under DeepSpeed ZeRO-3 (every parameter partitioned, the lm_head gathered by the fused loss; DeepSpeed
    does not scale the loss for accumulation, the Trainer divides): POVID's metrics through the gathered loss's
    autograd function, and a precomputed DPO reference scored by the ranks' ZeRO-3 reference engine in lockstep."""
    pytest.importorskip("deepspeed")
    plain = str(tmp_path / "plain")
    tiny_data(plain)
    unequal = unequal_data(str(tmp_path / "unequal"))
    cases = [
        _case("zero3-povid-accumulation", unequal, {"objective": "povid"}, per_device=1, accumulation=2, zero3=True),
        _case("zero3-precomputed-dpo", plain, {"objective": "dpo", "precompute_reference": True}, sampler="random",
              zero3=True),
    ]
    results = _launch(cases, tmp_path)
    for case in cases:
        _check_case(case, results[case["name"]])
