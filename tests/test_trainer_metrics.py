"""The metrics TPOTrainer logs (rewards/*, logps/*, visual_score/*, loss), each against an independent float64 oracle
from the plain padded LLaVA forward on the very micro-batches the trainer saw: gradient accumulation with unequal
token counts and an epoch's shorter last step, logging windows of several steps, evaluation with a smaller last
batch, the reference modes, a second train() on the same trainer, and two processes (this file is their script)."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from test_trainer import _args  # noqa: E402
from tiny_setup import tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer.data import PreferenceDataset  # noqa: E402
from tpo_fast.trainer.synthetic import make_shapes_dataset  # noqa: E402
from tpo_fast.trainer.trainer import TPOTrainer  # noqa: E402

BETA, OFFSET = 0.1, 0.5


def _varied(folder: str, n: int) -> PreferenceDataset:
    """n shapes records whose responses have 1 to 13 words (chosen) and 1 to 11 (rejected): micro-batches of
    unequal numbers of response tokens, one-word responses among them."""
    path = make_shapes_dataset(folder, num_images=n, image_size=28, seed=0)
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    for i, r in enumerate(records):
        r["chosen"] = " ".join((r["chosen"].split() * 2)[: 1 + (i * 5) % 13])
        r["rejected"] = " ".join((r["rejected"].split() * 2)[: 1 + (i * 3) % 11])
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return PreferenceDataset.from_file(path, os.path.join(folder, "images"), noise_seed=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    return _varied(str(root / "d11"), 11), _varied(str(root / "d5"), 5), tiny_processor()


def _models(proc):
    policy = tiny_model(proc)
    with torch.no_grad():  # the policy away from the reference: rewards of both signs
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    return policy, tiny_model(proc, seed=1)


def _row_stats(model, batch):
    """Per row (2B,): sum m logp, sum m log c, the official visual score sum m s / (sum m + 1e-8), and the token
    count, from the model's ordinary forward (full logits, float64) on the clean and the corrupted images."""
    rows = batch["image_index"].repeat(2)
    targets = batch["labels"][:, 1:]
    mask = (targets != -100).double()
    t = targets.clamp_min(0)[..., None]

    def logits(pixels):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=pixels[rows].double())
        return out.logits[:, :-1].double()

    with torch.no_grad():
        z_all = logits(batch["pixel_values"])
        logp = torch.log_softmax(z_all, -1).gather(-1, t)[..., 0]
        s = z_all.gather(-1, t)[..., 0] - logits(batch["corrupted_pixel_values"]).gather(-1, t)[..., 0]
    half = s.shape[0] // 2
    c = torch.cat([OFFSET + torch.sigmoid(s[:half]), OFFSET + 1 - torch.sigmoid(s[half:])])
    n = mask.sum(-1)
    return (logp * mask).sum(-1), (c.log() * mask).sum(-1), (s * mask).sum(-1) / (n + 1e-8), n


def _oracle(policy, ref, batch, objective="tpo", average=False):
    """The documented metrics of one batch (TRL DPOTrainer's conventions): rewards beta (S_pi - S_ref) with the
    log c terms for TPO, their batch means, margins, strict accuracies; logps/* the policy's sum m logp (per token
    with average_log_prob); visual_score/* (TPO) the policy's; loss the batch mean of -log sigmoid."""
    lp, lc, vis, n = _row_stats(policy, batch)
    score = lp + lc if objective == "tpo" else lp
    s_pi = score / n.clamp_min(1) if average else score
    if ref is None:
        s_ref = torch.zeros_like(s_pi)
    else:
        r_lp, r_lc, _, r_n = _row_stats(ref, batch)
        r_score = r_lp + r_lc if objective == "tpo" else r_lp
        s_ref = r_score / r_n.clamp_min(1) if average else r_score
    b = s_pi.shape[0] // 2
    rewards = BETA * (s_pi - s_ref)
    chosen, rejected = rewards[:b], rewards[b:]
    logps = lp / n.clamp_min(1) if average else lp
    out = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
           "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).double().mean(),
           "logps/chosen": logps[:b].mean(), "logps/rejected": logps[b:].mean(),
           "loss": -F.logsigmoid(chosen - rejected).mean()}
    if objective == "tpo":
        out["visual_score/chosen"], out["visual_score/rejected"] = vis[:b].mean(), vis[b:].mean()
    return {k: float(v) for k, v in out.items()}


def _recording(trainer):
    """The micro-batches compute_loss sees, in order (host copies)."""
    seen, compute = [], trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        seen.append({k: v.detach().cpu().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return compute(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    return seen


def _close(got: dict, want: dict, prefix: str = ""):
    for key, value in want.items():
        assert got[prefix + key] == pytest.approx(value, rel=2e-6, abs=2e-6), (prefix + key, got[prefix + key], value)


def _train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


def test_window_metrics_are_the_mean_of_the_steps_means_like_the_loss(setup, tmp_path):
    """11 pairs in micro-batches of 2 and gradient_accumulation_steps=4: the epoch's 6 micro-batches make a step of
    4 and a last one of 2, both in one logging window (logging_steps=2). The Trainer logs the loss as the mean of the
    steps' micro-batch means; the step metrics were the plain mean of the 6 micro-batches (the last step's weighing
    double), disagreeing with the loss they are logged with."""
    train, _, proc = setup
    policy, ref = _models(proc)
    oracle_policy, oracle_ref = copy.deepcopy(policy).double().eval(), copy.deepcopy(ref).double().eval()
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4, logging_steps=2, max_steps=2,
                 learning_rate=0.0, optim="sgd")
    trainer = TPOTrainer(policy, ref_model=ref, args=args, train_dataset=train, processing_class=proc)
    seen = _recording(trainer)
    trainer.train()
    (log,) = _train_logs(trainer)
    per = [_oracle(oracle_policy, oracle_ref, b) for b in seen]
    assert [b["input_ids"].shape[0] // 2 for b in seen] == [2, 2, 2, 2, 2, 1]
    steps = [per[:4], per[4:]]
    want = {k: sum(sum(m[k] for m in step) / len(step) for step in steps) / 2 for k in per[0]}
    _close(log, want)


@pytest.mark.parametrize("accum,logging", [(3, 1), (2, 3)], ids=["accum3", "accum2-log3"])
def test_logged_metrics_match_the_padded_oracle_under_accumulation(setup, tmp_path, accum, logging):
    """Cross-check: with micro-batches of unequal token counts (one-word responses among them), each log of the
    packed shared-prefix step is the mean over its window's micro-batches of the padded float64 oracle's metrics."""
    train, _, proc = setup
    policy, ref = _models(proc)
    oracle_policy, oracle_ref = copy.deepcopy(policy).double().eval(), copy.deepcopy(ref).double().eval()
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=accum, logging_steps=logging,
                 max_steps=logging, learning_rate=0.0, optim="sgd")
    trainer = TPOTrainer(policy, ref_model=ref, args=args, train_dataset=train, processing_class=proc)
    seen = _recording(trainer)
    trainer.train()
    (log,) = _train_logs(trainer)
    tokens = [int(n) for b in seen for n in (b["labels"][:, 1:] != -100).sum(-1)]
    assert len(seen) == accum * logging and min(tokens) == 2 and len(set(tokens)) > 4, tokens  # 2: a word, eos
    per = [_oracle(oracle_policy, oracle_ref, b) for b in seen]
    _close(log, {k: sum(m[k] for m in per) / len(per) for k in per[0]})


@pytest.mark.parametrize("mode", ["precomputed", "none", "dpo-average"])
def test_reference_modes_and_objectives_log_the_oracles_metrics(setup, tmp_path, mode):
    """Cross-check: a precomputed reference cache, reference-free TPO, and DPO with average_log_prob each log the
    oracle's metrics of the batch (rewards against the cached / zero reference, per-token log-probs)."""
    train, _, proc = setup
    policy, ref = _models(proc)
    oracle_policy, oracle_ref = copy.deepcopy(policy).double().eval(), copy.deepcopy(ref).double().eval()
    extra = {"precomputed": dict(precompute_reference=True), "none": dict(reference="none"),
             "dpo-average": dict(objective="dpo", average_log_prob=True)}[mode]
    args = _args(tmp_path, per_device_train_batch_size=4, max_steps=1, learning_rate=0.0, optim="sgd", **extra)
    trainer = TPOTrainer(policy, ref_model=None if mode == "none" else ref, args=args, train_dataset=train,
                         processing_class=proc)
    seen = _recording(trainer)
    trainer.train()
    (log,) = _train_logs(trainer)
    (batch,) = seen
    objective = "dpo" if mode == "dpo-average" else "tpo"
    want = _oracle(oracle_policy, None if mode == "none" else oracle_ref, batch, objective, mode == "dpo-average")
    _close(log, want)
    assert ("visual_score/chosen" in log) == (objective == "tpo")


def test_eval_metrics_are_means_over_pairs_like_eval_loss(setup, tmp_path):
    """5 eval pairs in batches of 2, 2 and 1: eval_loss is the mean over the 5 pairs, but the step metrics were the
    mean of the 3 batch means (eval_rewards/accuracies 1/6, not a share of 5 pairs). They are now means over pairs."""
    train, eval5, proc = setup
    policy, ref = _models(proc)
    oracle_policy, oracle_ref = copy.deepcopy(policy).double().eval(), copy.deepcopy(ref).double().eval()
    args = _args(tmp_path, per_device_eval_batch_size=2)
    trainer = TPOTrainer(policy, ref_model=ref, args=args, train_dataset=train, eval_dataset=eval5,
                         processing_class=proc)
    want = _oracle(oracle_policy, oracle_ref, trainer.data_collator([eval5[i] for i in range(5)]))
    metrics = trainer.evaluate()
    _close(metrics, want, "eval_")
    assert metrics["eval_rewards/accuracies"] * 5 == pytest.approx(round(metrics["eval_rewards/accuracies"] * 5))
    _close(trainer.predict(eval5).metrics, want, "test_")
    logged = [h for h in trainer.state.log_history if "eval_loss" in h][-1]
    _close(logged, want, "eval_")


def test_a_second_train_starts_an_empty_logging_window(setup, tmp_path):
    """max_steps=3, logging_steps=2 leaves step 3's metrics stored after the last log; a second train() on the same
    trainer averaged them into its first log (and counted the time between the runs in tokens_per_second). At
    learning rate 0 and the same seed, the second run's first log is now the first run's."""
    train, _, proc = setup
    policy, ref = _models(proc)
    args = _args(tmp_path, per_device_train_batch_size=2, logging_steps=2, max_steps=3, learning_rate=0.0,
                 optim="sgd")
    trainer = TPOTrainer(policy, ref_model=ref, args=args, train_dataset=train, processing_class=proc)
    trainer.train()
    first = _train_logs(trainer)[0]
    trainer.train()
    again = _train_logs(trainer)[0]
    keys = [k for k in first if k.startswith(("rewards/", "logps/", "visual_score/"))] + ["loss"]
    assert len(keys) == 9
    assert {k: again[k] for k in keys} == {k: first[k] for k in keys}


def _two_ranks(folder: str, out: str) -> None:
    """One rank of `test_two_ranks_log_the_mean_over_both_ranks_micro_batches` (run by torchrun on this file)."""
    import torch.distributed as dist
    from torch.utils.data import SequentialSampler

    class Sequential(TPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    proc = tiny_processor()
    train = PreferenceDataset.from_file(os.path.join(folder, "pairs.jsonl"), os.path.join(folder, "images"),
                                        noise_seed=0)
    policy, ref = _models(proc)
    oracle_policy, oracle_ref = copy.deepcopy(policy).double().eval(), copy.deepcopy(ref).double().eval()
    args = _args(Path(folder), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                 learning_rate=0.0, optim="sgd", ddp_backend="gloo")
    trainer = Sequential(policy, ref_model=ref, args=args, train_dataset=train, processing_class=proc)
    seen = _recording(trainer)
    trainer.train()
    per = [_oracle(oracle_policy, oracle_ref, b) for b in seen]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, per)
    if dist.get_rank() == 0:
        (log,) = _train_logs(trainer)
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"log": log, "per": [m for rank in every for m in rank]}, f)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown of the gloo group (see tests/dist/run_dist.py)


@pytest.mark.slow
def test_two_ranks_log_the_mean_over_both_ranks_micro_batches(tmp_path):
    """Cross-check: torchrun, 2 ranks on gloo, 2 micro-batches each: each logged metric (and the loss) is the mean
    of the oracle's over all 4 micro-batches of both ranks, not rank 0's own."""
    folder, out = str(tmp_path / "d"), str(tmp_path / "metrics.json")
    _varied(folder, 8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, folder, out]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(__file__))
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out, encoding="utf-8") as f:
        got = json.load(f)
    assert len(got["per"]) == 4
    _close(got["log"], {k: sum(m[k] for m in got["per"]) / 4 for k in got["per"][0]})


if __name__ == "__main__":
    _two_ranks(sys.argv[1], sys.argv[2])
