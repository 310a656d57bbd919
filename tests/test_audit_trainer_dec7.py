"""Audit of 2026-12-07: TPOTrainer's evaluation, logged metrics, gradient accumulation, reference options, vision
freezing and config checks, each finding against an oracle written independently of the code (the plain padded LLaVA
forward in float64, `tests/test_trainer_metrics.py`'s `_oracle`, or plain arithmetic). This file is also the script
of its two-process cases (run by torchrun)."""

import copy
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from test_trainer import _args  # noqa: E402
from test_trainer_metrics import _close, _models, _oracle, _varied  # noqa: E402
from tiny_setup import lora_config, tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer.data import PreferenceDataset  # noqa: E402
from tpo_fast.trainer.trainer import TPOTrainer  # noqa: E402


def _torchrun(script_args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), os.path.abspath(__file__), *script_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(__file__))


ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
         "bf16": {"enabled": False}, "fp16": {"enabled": False}}


def _two_rank_eval(mode: str, folder: str, out: str) -> None:
    """One rank of `test_two_rank_evaluation_counts_each_pair_once`: evaluate() and predict() on 5 pairs, in eval
    batches of 2 (the last step: rank 0 [4, 0], rank 1 [1, 2]) and of 1 (the last step: rank 0 [4], rank 1 [0]).
    mode "ddp"; or "zero3": DeepSpeed ZeRO-3 with a precomputed reference, trained on other records (`train`)."""
    import torch.distributed as dist

    proc = tiny_processor()
    ds = PreferenceDataset.from_file(os.path.join(folder, "pairs.jsonl"), os.path.join(folder, "images"), noise_seed=0)
    train = ds
    if mode == "zero3":
        train = PreferenceDataset.from_file(os.path.join(folder, "train", "pairs.jsonl"),
                                            os.path.join(folder, "train", "images"), noise_seed=0)
    policy, ref = _models(proc)  # built before a ZeRO-3 config makes constructors partition (tests/dist/run_dist.py)
    oracle_policy, oracle_ref = copy.deepcopy(policy).double().eval(), copy.deepcopy(ref).double().eval()
    extra = dict(deepspeed=ZERO3, precompute_reference=True) if mode == "zero3" else {}
    args = _args(Path(folder) / mode, per_device_eval_batch_size=2, ddp_backend="gloo", **extra)
    trainer = TPOTrainer(policy, ref_model=ref, args=args, train_dataset=train, eval_dataset=ds, processing_class=proc)
    seen, compute = [], trainer.compute_loss

    def spy(model, inputs, *a, **k):
        seen.append(inputs["index"].tolist())
        return compute(model, inputs, *a, **k)

    trainer.compute_loss = spy
    results = {"eval2": trainer.evaluate(), "test2": trainer.predict(ds).metrics}
    trainer.args.per_device_eval_batch_size = 1
    results["eval1"] = trainer.evaluate()
    results["train_metrics_left"] = bool(trainer._stored_metrics.get("train"))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, seen)
    if dist.get_rank() == 0:
        want = _oracle(oracle_policy, oracle_ref, trainer.data_collator([ds[i] for i in range(len(ds))]))
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"results": results, "want": want, "seen": every}, f)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown of the gloo group (see tests/dist/run_dist.py)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero3"])
def test_two_rank_evaluation_counts_each_pair_once(tmp_path, mode):
    """5 eval pairs on 2 processes: accelerate's sampler repeats pairs 0, 1 and 2 so that both ranks get full last
    batches, and the step metrics counted them (eval_rewards/accuracies 0.375 = 3/8, not a share of 5 pairs; oracle
    0.4) and averaged the ranks' means; eval_loss, the base Trainer's, weighed each batch by its 2B rows against
    gather_for_metrics' count of pairs (0.7031 vs the oracle's 0.7070). Each pair now counts once: metrics and loss
    are the float64 oracle's means over the 5 pairs, with batches of 2 (a last batch part repeats) and of 1 (a last
    batch of repeats only).

    zero3: a DeepSpeed engine's eval() leaves its own `training` flag True, so every evaluation batch was taken for
    a training one: no eval_rewards/* at all (they went to the next training log), and with a precomputed reference
    the eval pairs were scored against the train table's rows of the same indices (other records: a wrong
    eval_loss). Evaluation is now the same as on DDP, each dataset against its own table."""
    folder, out = str(tmp_path / "d"), str(tmp_path / "eval.json")
    _varied(folder, 5)
    if mode == "zero3":
        tiny_data(os.path.join(folder, "train"), num_images=6, seed=3)
    run = _torchrun([mode, folder, out])
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out, encoding="utf-8") as f:
        got = json.load(f)
    want = got["want"]
    assert want["rewards/accuracies"] == pytest.approx(0.4)
    for key, prefix in (("eval2", "eval_"), ("test2", "test_"), ("eval1", "eval_")):
        _close(got["results"][key], want, prefix)
    assert not got["results"]["train_metrics_left"]
    # what each rank's step saw: the repeated pairs left out (a batch of repeats still runs: ranks in lockstep)
    assert got["seen"] == [[[0, 1], [4], [0, 1], [4], [0], [2], [4]], [[2, 3], [1, 2], [2, 3], [1, 2], [1], [3], [0]]]


@pytest.mark.parametrize("reference", ["none", "adapter"])
def test_a_ref_model_the_reference_mode_does_not_use_is_refused(tmp_path, reference):
    """TPOTrainer(model, ref_model=ref, args=TPOConfig(reference="none" or "adapter")) dropped the given ref_model
    without a word and trained reference-free, or against the adapter-disabled policy: rewards and loss against
    another reference than the one passed. The contradiction is now an error naming both and what to change."""
    proc = tiny_processor()
    ds = tiny_data(str(tmp_path / "d"), num_images=2)
    extra = {"peft_config": lora_config()} if reference == "adapter" else {}
    what = "the policy with its adapter disabled" if reference == "adapter" else "absent: reference-free"
    message = (f"ref_model was given, but TPOConfig.reference='{reference}' does not use it (the reference would be "
               f"{what}): pass ref_model=None, or set reference='model' (or 'auto') to score against ref_model")
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        TPOTrainer(tiny_model(proc), ref_model=tiny_model(proc, seed=1), args=_args(tmp_path, reference=reference),
                   train_dataset=ds, processing_class=proc, **extra)
    # without the ref_model each mode builds as before
    trainer = TPOTrainer(tiny_model(proc), args=_args(tmp_path, reference=reference), train_dataset=ds,
                         processing_class=proc, **extra)
    assert trainer.reference_mode == reference and trainer.ref_model is None


if __name__ == "__main__":
    _two_rank_eval(sys.argv[1], sys.argv[2], sys.argv[3])
