"""Audit of the step workload (2026-12-08): bench/_contenders/step.py, bench/_measure_step.py, bench/_workloads/step.py.

Findings, each with its test:
- the official structure's LoRA adapter was not the one TRL's and tpo_fast's trainers start from (peft draws the A
  matrices from the global RNG, which the trainers seed with `args.seed` = 42 and the official structure did not seed),
  and `--seed` never reached the trainers' adapters: on a LoRA case the TPO cross-check compared two models (the run's
  seed now seeds every contender's adapter, and one NumPy cannot take is refused when the step's data is made);
- the first-drop cross-check cannot see a gradient's size (AdamW's first update is the sign of each gradient element):
  a step with the right loss and half its gradient passed it (0.0008% from the official drop); the first step's
  per-tensor gradient norms are now compared with the oracle's too;
- the total peak memory (and the largest micro-batch under the budget, which it decides) held the import of the
  libraries each contender loads lazily after the memory base: 265 to 310 MiB of step-tiny's 308 to 351 MiB totals,
  43 MiB more for TRL's row than for the official structure's.

Oracles: the TPO loss written out here in float64 (docs/math.md), gradient norms by plain autograd, numbers worked out
by hand, and the set of modules a fresh process imports.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _bench import BENCH, bench_modules

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

BETA, OFFSET = 0.1, 0.5  # DPO's beta and TPO's offset (docs/math.md)


@pytest.fixture(scope="module")
def mods():
    contenders, measure, workload = bench_modules("_contenders.step", "_measure_step", "_workloads.step")
    return contenders, measure, workload


def _case(workload, lora: bool):
    case = dataclasses.replace(workload.STEP_CASES["step-tiny"], search_s=0)
    return dataclasses.replace(case, lora=True, lora_rank=4) if lora else case


def _text_name(name: str) -> str:
    """A parameter's name from the text model on, whichever wrappers hold it."""
    return name[name.index("language_model."):]


def _adapter_a(c) -> dict[str, torch.Tensor]:
    model = getattr(c, "policy", None) or c.trainer.model
    return {_text_name(n): p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def test_every_contender_starts_from_the_same_lora_adapter_of_the_run_seed(mods):
    """With LoRA every contender must train the same model: the same frozen weights and the same initial adapter (its
    B is zero, its A random). The official structure's A came from an unseeded global RNG, TRL's and ours from
    `set_seed(42)` whatever the run's seed; now all from the run's seed."""
    step, _, workload = mods
    case = _case(workload, lora=True)
    names = ["official-tpo", "ours-tpo"] + (["trl-dpo"] if _has("trl") else [])
    adapters = {}
    for seed in (0, 5):
        data = workload.StepData(case, seed=seed)
        for name in names if seed == 5 else names[:2]:
            c = step.step_contenders()[name]
            c.build(case, data, "cpu")
            adapters[(seed, name)] = _adapter_a(c)
    for seed in (0, 5):
        first = adapters[(seed, "official-tpo")]
        assert len(first) == 2 * 7  # 2 layers x 7 linear layers
        for (s, name), a in adapters.items():
            if s == seed:
                assert a.keys() == first.keys()
                assert all(torch.equal(a[k], first[k]) for k in first), (seed, name)
    assert not any(torch.equal(adapters[(0, "ours-tpo")][k], adapters[(5, "ours-tpo")][k])
                   for k in adapters[(0, "ours-tpo")])  # --seed reaches the adapter


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _oracle_grad_norms(policy: torch.nn.Module, batch: dict) -> dict[str, float]:
    """Per trained tensor, the L2 norm of the TPO loss's gradient at the first step, in float64: eight forwards of a
    float64 copy of the untouched policy, the official formulas (docs/math.md) written out here."""
    model = copy.deepcopy(policy).double().train()

    def scores(side: str, chosen: bool) -> torch.Tensor:
        rows = batch[side]

        def logits(pixels):
            return model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                         pixel_values=pixels.double(), use_cache=False).logits[:, :-1]

        z, z_corrupted = logits(batch["pixel_values"]), logits(batch["corrupted_pixel_values"])
        y = rows["labels"][:, 1:]
        scored = (y != -100).double()
        index = y.clamp(min=0)[..., None]
        logp = torch.log_softmax(z, -1).gather(-1, index)[..., 0]
        s = z.gather(-1, index)[..., 0] - z_corrupted.gather(-1, index)[..., 0]
        weight = OFFSET + torch.sigmoid(s if chosen else -s)
        return ((logp + torch.log(weight)) * scored).sum(-1)

    chosen, rejected = scores("chosen", True), scores("rejected", False)
    with torch.no_grad():  # the reference: the policy itself at the first step (with LoRA: B = 0, the same)
        ref_chosen, ref_rejected = chosen.detach(), rejected.detach()
    loss = -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    loss.backward()
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            key = n[n.index("lm_head"):] if "lm_head" in n else n[n.index(next(
                part for part in ("language_model.", "vision_tower.", "multi_modal_projector.") if part in n)):]
            out[key] = 0.0 if p.grad is None else float(p.grad.norm())
    return out


def _half_gradient(step):
    class HalfGradient(step.OfficialTPOStep):
        """The official structure's step with every trained tensor's gradient halved (a hook on each): the same AdamW
        first step (the sign of each element), so the same first loss drop."""

        def train_step(self, batch):
            if not getattr(self, "_halved", False):
                for p in self.policy.parameters():
                    if p.requires_grad:
                        p.register_hook(lambda g: 0.5 * g)
                self._halved = True
            return super().train_step(batch)

    c = HalfGradient()
    c.name = "half-gradient"
    c.oracle = False
    return c


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_cross_check_compares_first_step_gradients_with_the_official_structure(mods, lora):
    """Each row records its first step's per-tensor gradient norms; the official structure's are the float64 oracle's
    (fp32 rounding apart), our TPO step's are the official's, and a step with the official loss and half its gradient,
    whose loss drop is the official's, fails the cross-check by 50%."""
    step, measure, workload = mods
    case = _case(workload, lora)
    data = workload.StepData(case)
    cfg = {"device": "cpu", "seed": 0, "warmup": 1, "repeats": 1, "phase": "time"}
    rows = []
    for c in (step.step_contenders()["official-tpo"], step.step_contenders()["ours-tpo"], _half_gradient(step)):
        if c.name == "official-tpo":
            c.build(case, data, "cpu")
            oracle = _oracle_grad_norms(c.policy, c.batch(case.pairs))
            c.build = lambda *args: None  # built: its untouched weights are the oracle's
        row = measure.measure_step(c, case, cfg)
        row.update(contender=c.name, label=c.name, workload="step", dtype="fp32", oracle=c.oracle)
        rows.append(row)
    official, ours, half = rows
    assert official["first_grad_norms"].keys() == oracle.keys()
    # gradients: LoRA's 14 B matrices (A's is B^T ... = 0 at B = 0); the full model's 48 tensors but the vision
    # tower's one layer (16) and post-layernorm (2), whose output LLaVA does not read (vision_feature_layer=-2), and
    # the class embedding, whose token it drops
    assert sum(v > 0 for v in oracle.values()) == (14 if lora else 48 - 16 - 2 - 1)
    for k, want in oracle.items():
        assert official["first_grad_norms"][k] == pytest.approx(want, rel=1e-5, abs=1e-9), k
    assert half["losses"][1] == pytest.approx(official["losses"][1], rel=1e-6)  # the drop cannot tell them apart
    measure.cross_check_steps(rows)
    assert ours["status"] == "ok" and ours["check"]["errors"]["first_grads_vs_oracle"]["err"] < 1e-5
    assert half["status"] == "failed check" and not half["check"]["ok"]
    assert half["check"]["errors"]["first_grads_vs_oracle"]["err"] == pytest.approx(0.5, rel=1e-6)
    assert half["check"]["errors"]["first_drop_vs_oracle"]["err"] < 1e-4
    assert "first step's gradients are not official-tpo's" in half["reason"] and "50.0% apart" in half["reason"]


def _row(name, norms=None, oracle=False, dtype="fp32", **extra):
    return {"workload": "step", "status": "ok", "contender": name, "label": name.upper(), "objective": "tpo",
            "oracle": oracle, "losses": [0.7, 0.6], "dtype": dtype,
            **({"first_grad_norms": norms} if norms is not None else {}), **extra}


def test_cross_check_judges_each_tensors_gradient_norm_against_the_gradients_scale(mods):
    """Per tensor |got - want| / max(want, 1e-3 x the largest oracle norm), the largest over tensors, against 2%
    (fp32) or 15% (16-bit); other tensors: inf; rows without norms: not judged; a failed drop keeps its reason."""
    _, measure, _ = mods
    want = {"a": 2.0, "b": 1.0, "c": 0.0}
    rows = [
        _row("official", want, oracle=True),
        _row("close", {"a": 2.0, "b": 1.01, "c": 0.0}),  # 1% on b
        _row("halved", {"a": 1.0, "b": 0.5, "c": 0.0}),  # 50% on a and b
        _row("nonzero", {"a": 2.0, "b": 1.0, "c": 0.001}),  # 0.001 where 0: against 1e-3 x 2.0, 50%
        _row("renamed", {"a": 2.0, "b": 1.0, "d": 0.0}),
        _row("bf16", {"a": 2.2, "b": 1.0, "c": 0.0}, dtype="bf16"),  # 10%: within bf16's 15%
        _row("unrecorded"),
        {**_row("bad-drop", {"a": 1.0, "b": 0.5, "c": 0.0}), "losses": [0.7, 0.65]},
    ]
    measure.cross_check_steps(rows)
    by = {r["contender"]: r for r in rows}

    def grads(name):
        return by[name]["check"]["errors"].get("first_grads_vs_oracle")

    assert by["close"]["status"] == "ok" and grads("close")["err"] == pytest.approx(0.01)
    assert grads("close")["tol"] == 0.02 and grads("close")["worst"] == "b" and grads("close")["oracle"] == "official"
    assert by["halved"]["status"] == "failed check" and grads("halved")["err"] == pytest.approx(0.5)
    assert by["halved"]["reason"] == ("its first step's gradients are not OFFICIAL's (tensor a: gradient norm 1, "
                                      "OFFICIAL's 2, 50.0% apart, tolerance 2%): it does not train the same TPO "
                                      "objective")
    assert by["nonzero"]["status"] == "failed check" and grads("nonzero")["err"] == pytest.approx(0.5)
    assert by["renamed"]["status"] == "failed check" and grads("renamed")["err"] == math.inf
    assert "other tensors (c, d)" in by["renamed"]["reason"]
    assert by["bf16"]["status"] == "ok" and grads("bf16") == {"err": pytest.approx(0.1), "tol": 0.15,
                                                               "oracle": "official", "worst": "a"}
    assert by["unrecorded"]["status"] == "ok" and grads("unrecorded") is None
    assert by["bad-drop"]["status"] == "failed check" and "lowers the loss by" in by["bad-drop"]["reason"]
    assert grads("bad-drop")["err"] == pytest.approx(0.5)
    assert by["official"]["status"] == "ok" and "check" not in by["official"]


# (TRL's Liger trial still loads the modules of the models Liger patches: a few MiB, a trial's, left out here)
_HEAVY = ("deepspeed", "trl", "datasets", "peft", "accelerate", "pyarrow", "pandas")
_HEAVY_MODULES = ("transformers.models.llava.modeling_llava", "transformers.models.llama.modeling_llama",
                  "transformers.models.clip.modeling_clip", "transformers.trainer", "tpo_fast.trainer.trainer")

_CHILD = """
import dataclasses, json, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {bench!r})
import _measure_step

def measure(c, case, job):  # where measure_step takes its memory base: what loads after it?
    before = set(sys.modules)
    from _workloads.step import StepData
    case = dataclasses.replace(case, search_s=0)
    data = StepData(case)
    c.build(case, data, "cpu")
    c.train_step(c.batch(case.pairs))
    print("NEW " + json.dumps(sorted(set(sys.modules) - before)))
    return {{"status": "ok"}}

_measure_step.measure_step = measure
_measure_step.run_step_contender({{"case": {{"name": "step-tiny"}}, "contender": {name!r}, "threads": 1}})
"""


@pytest.mark.parametrize("name", ["official-tpo", "ours-tpo", "trl-dpo"])
def test_the_memory_base_is_taken_after_the_libraries_a_contender_loads(name):
    """`run_step_contender` imports what any contender loads before `measure_step` takes the memory base, so that a
    contender's total peak is its model, reference, optimizer state and step: in a fresh child process, building
    the contender and taking a step imports no module of those libraries after that point."""
    if name == "trl-dpo" and not _has("trl"):
        pytest.skip("trl is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(bench=str(BENCH), name=name)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("NEW "))[4:])
    late = [m for m in new if m.split(".")[0] in _HEAVY or m.startswith(_HEAVY_MODULES)]
    assert late == [], late[:20]


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_a_step_seed_numpy_cannot_take_is_refused_when_the_data_is_made(mods, seed):
    """The run's seed now also seeds the adapters through transformers' `set_seed` (NumPy's range: [0, 2**32 - 1]):
    a seed outside it is refused where the step's data is made, naming --seed, not by NumPy inside a trainer."""
    _, _, workload = mods
    with pytest.raises(ValueError, match=r"^the step workload's seed \(--seed\) must be an int in \[0, 2\*\*32 - 1\]"):
        workload.StepData(workload.STEP_CASES["step-tiny"], seed=seed)
