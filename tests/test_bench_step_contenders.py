"""The step workload's contenders (bench/_contenders/step.py): the official TPO step structure against the TPO loss
worked out by hand from the model's own logits, TRL's rows against our collator's, TRL's option trials, and how
tpo_fast's trainer rows are named, set up and described; then the workload's cases, model and data
(bench/_workloads/step.py). The step check (tests/test_bench_smoke.py) and the measuring
child (tests/test_bench_measure_step.py) take these contenders as given; a step row is only as honest as they are."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings

import pytest
import torch
from _bench import bench_modules

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def mods():
    contenders, workload, workloads = bench_modules("_contenders.step", "_workloads.step", "_workloads")
    return contenders, workload, workloads


@pytest.fixture
def tiny(mods):
    """step-tiny (2 pairs of unequal lengths, fp32) without the micro-batch search, and its data. Built for each
    test (not once per module): mutmut runs a mutant against the tests that called it, and a module fixture's
    calls count for the first test only."""
    _, workload, _ = mods
    case = dataclasses.replace(workload.STEP_CASES["step-tiny"], search_s=0)
    return case, workload.StepData(case)


def _hand_scores(logits: torch.Tensor, corrupted: torch.Tensor, labels: torch.Tensor, chosen: bool,
                 offset: float) -> list[float]:
    """TPO's sequence scores, one position at a time in float64: position t predicts labels[t + 1];
    S = sum over target-carrying positions of log softmax(z_t)[y] + log(offset + sigmoid(+-(z_t[y] - z~_t[y])))."""
    out = []
    for r in range(logits.shape[0]):
        total = 0.0
        for t in range(logits.shape[1] - 1):
            y = int(labels[r, t + 1])
            if y == -100:
                continue
            row = logits[r, t].double()
            s = float(row[y] - corrupted[r, t, y].double())
            sig = 1.0 / (1.0 + math.exp(-s))
            total += float(row[y] - torch.logsumexp(row, 0)) + math.log(offset + (sig if chosen else 1.0 - sig))
        out.append(total)
    return out


def test_official_scores_are_tpo_weighted_sums_over_the_shifted_targets(mods):
    """`_official_scores` (the official structure's scoring, and the oracle of the TPO cross-check): the logits at
    position t score labels[t + 1], the first label is never scored, ignored labels (-100, at the start, inside
    and at the end of a row) add nothing, target id 0 is scored, and the chosen and the rejected weight differ."""
    step, _, workloads = mods
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 7, 11, generator=g)
    corrupted = logits + torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(1, 11, (3, 7), generator=g)
    labels[:, 1:3] = -100  # prompt positions; labels[:, 0] is a real id that no position predicts
    labels[1, 4] = -100
    labels[2, 5:] = -100  # padding
    labels[0, 5] = 0
    for chosen in (True, False):
        got = step._official_scores(logits, corrupted, labels, chosen)
        want = _hand_scores(logits, corrupted, labels, chosen, workloads.OFFSET)
        assert got.dtype == torch.float32 and got.shape == (3,)
        assert got.tolist() == pytest.approx(want, rel=1e-6, abs=1e-5)
    assert workloads.OFFSET == 0.5 and workloads.BETA == 0.1  # TPO's and DPO's defaults (docs/math.md)


def _texts(records: list[dict]) -> list[dict]:
    """The records without their images (PIL images compare by identity)."""
    return [{k: v for k, v in r.items() if k != "image"} for r in records]


def _perturb(params, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def _assert_trainer_default_adamw(optimizer, lr: float) -> None:
    """What a Hugging Face Trainer trains with by default (TrainingArguments' defaults): fused AdamW, betas (0.9,
    0.999), eps 1e-8, weight decay 0 in every parameter group, at the bench's learning rate."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    assert type(inner) is torch.optim.AdamW and inner.defaults["fused"] is True
    assert inner.param_groups and all(
        (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (lr, (0.9, 0.999), 1e-8, 0.0) for g in inner.param_groups)


def _config_note(step, trainer) -> str:
    """The note a tpo_fast row writes about the TPOConfig it trains with and its trunk's rows."""
    a = trainer.args
    return (f"TPOConfig: shared_prefix={a.shared_prefix}, padding_free={a.padding_free}, precompute_reference="
            f"{a.precompute_reference}, loss_backend={a.loss_backend}, grad_mode={a.loss_grad_mode}; "
            + step.trunk_rows(trainer))


def _hand_loss(policy, reference, padded: dict, beta: float, offset: float) -> float:
    """The TPO loss of a batch from each model's full padded rows (not the contender's per-side cropped ones):
    -log sigmoid(beta * ((S_c - S_r) - (S_c^ref - S_r^ref))), averaged over the pairs."""
    b = padded["input_ids"].shape[0] // 2
    pixels = padded["pixel_values"][padded["image_index"]]
    corrupted_pixels = padded["corrupted_pixel_values"][padded["image_index"]]

    def scores(model):
        def logits(pv):
            with torch.no_grad():
                return model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                             pixel_values=torch.cat([pv, pv]), use_cache=False).logits.float()

        clean, noisy = logits(pixels), logits(corrupted_pixels)
        return (_hand_scores(clean[:b], noisy[:b], padded["labels"][:b], True, offset),
                _hand_scores(clean[b:], noisy[b:], padded["labels"][b:], False, offset))

    (pc, pr), (rc, rr) = scores(policy), scores(reference)
    losses = [-math.log(1.0 / (1.0 + math.exp(-beta * ((pc[i] - pr[i]) - (rc[i] - rr[i]))))) for i in range(b)]
    return sum(losses) / b


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_official_step_trains_on_the_tpo_loss_of_eight_forwards(mods, tiny, lora):
    """The official structure's step, with a policy moved away from its reference: the loss it returns is the TPO
    loss worked out from full padded rows (its own rows are each side cropped to that side's longest row, which
    must not change a score); the reference is the frozen copy (with LoRA: the base model with the adapter off,
    here a fresh build of the same seed), untouched by the step; the policy's trained weights move; no gradient is
    left behind."""
    step, workload, workloads = mods
    case, _ = tiny
    case = dataclasses.replace(case, lora=lora, lora_rank=4)
    data = workload.StepData(case)
    c = step.step_contenders()["official-tpo"]
    c.build(case, data, "cpu")
    trained = [p for p in c.policy.parameters() if p.requires_grad]
    _perturb(trained, seed=1, scale=0.05)
    assert c.notes == (["LoRA; reference = the policy with its adapter disabled"] if lora else [])
    assert c.note() == "; ".join([c.workloads["step"], *c.notes])
    if lora:
        assert c.reference is None and all("lora" in n for n, p in c.policy.named_parameters() if p.requires_grad)
        reference = workload.build_model(case, data.image_token_id, "cpu")
    else:
        reference = c.reference
        assert not any(p.requires_grad for p in reference.parameters())
    untrained = [p for p in c.policy.parameters() if not p.requires_grad] if lora else list(reference.parameters())
    frozen = [p.detach().clone() for p in untrained]
    before = {n: p.detach().clone() for n, p in c.policy.named_parameters() if p.requires_grad}

    padded = data.padded_batch(case.pairs)
    batch = c.batch(case.pairs)
    b = case.pairs
    lengths = []
    for side, rows in (("chosen", slice(0, b)), ("rejected", slice(b, None))):
        lengths.append(int(padded["attention_mask"][rows].sum(1).max()))
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(batch[side][key], padded[key][rows, :lengths[-1]]), (side, key)
    assert min(lengths) < padded["input_ids"].shape[1]  # one side is cropped
    assert torch.equal(batch["pixel_values"], padded["pixel_values"][padded["image_index"]])
    assert torch.equal(batch["corrupted_pixel_values"], padded["corrupted_pixel_values"][padded["image_index"]])

    assert step.LEARNING_RATE == 1e-4
    _assert_trainer_default_adamw(c.optimizer, step.LEARNING_RATE)
    assert {id(p) for g in c.optimizer.param_groups for p in g["params"]} == {id(p) for p in trained}
    want = _hand_loss(c.policy, reference, padded, workloads.BETA, workloads.OFFSET)
    assert abs(want - math.log(2.0)) > 1e-3  # the policy is not its reference: the margin is not 0
    loss = c.train_step(batch)
    assert loss == pytest.approx(want, rel=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(untrained, frozen, strict=True))
    moved = {n for n, p in c.policy.named_parameters() if n in before and not torch.equal(p, before[n])}
    trunk = {n for n in before if "language_model" in n}  # every text layer gets a gradient (the vision
    # tower's last layer gets none: LLaVA reads the features of the one before)
    assert trunk and trunk <= moved and (lora or "lm_head.weight" in moved)
    assert all(p.grad is None for p in c.policy.parameters())


def test_trl_rows_are_our_collators_rows(mods, tiny):
    """TRL's contender trains on the tokens every other contender trains on and is credited with: per row, the
    attended tokens of TRL's collated batch are those of tpo_fast's collator (prompt with LLaVA-1.5's
    "USER: <image>\\n... ASSISTANT:", then the response and its EOS), and TRL's completion mask is our labels'
    response positions. The bench's chat template once rendered an assistant turn without "ASSISTANT:", and TRL,
    which splits prompt and completion at their common prefix, trained every row without those two tokens."""
    pytest.importorskip("trl")
    step, _, _ = mods
    case, data = tiny
    c = step.step_contenders()["trl-dpo"]
    c.device, c.data, c.case = "cpu", data, case
    c.trainer = c._trainer(case, data, "cpu", {})
    theirs, ours = c.batch(case.pairs), data.padded_batch(case.pairs)
    assert theirs["input_ids"].shape[0] == ours["input_ids"].shape[0] == 2 * case.pairs
    for i in range(2 * case.pairs):
        t, o = theirs["attention_mask"][i].bool(), ours["attention_mask"][i].bool()
        assert theirs["input_ids"][i][t].tolist() == ours["input_ids"][i][o].tolist(), i
        assert theirs["completion_mask"][i][t].tolist() == (ours["labels"][i][o] != -100).long().tolist(), i


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trl_trains_with_the_benchs_settings_and_a_frozen_reference(mods, tiny, lora):
    """TRL's trainer: the bench's beta, learning rate and micro-batch, no gradient checkpointing (TRL's default is
    on), no truncation, bf16 only for a bf16 case, the Trainer's default optimizer; its reference a frozen copy
    that shares no tensor with the policy (with LoRA: none, TRL disables the adapter), its policy trainable."""
    pytest.importorskip("trl")
    step, _, workloads = mods
    case, data = tiny
    case = dataclasses.replace(case, lora=lora, lora_rank=4)
    c = step.step_contenders()["trl-dpo"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = c._trainer(case, data, "cpu", {})
    # checkpointing set under the name this transformers reads: no deprecation of the old one
    assert [str(w.message) for w in caught if str(w.message).startswith("`gradient_checkpointing`")] == []
    a = t.args
    assert (a.beta, a.learning_rate, a.per_device_train_batch_size) == (workloads.BETA, step.LEARNING_RATE, case.pairs)
    assert (a.gradient_checkpointing, a.max_length, a.bf16, a.use_liger_kernel) == (False, None, False, False)
    assert getattr(a, "activation_checkpointing", False) is False
    assert not a.precompute_ref_log_probs and t.current_gradient_accumulation_steps == 1
    _assert_trainer_default_adamw(t.optimizer, step.LEARNING_RATE)
    trained = [p for p in t.model.parameters() if p.requires_grad]
    assert trained and (not lora or all(p.numel() < 10_000 for p in trained))  # LoRA: only the adapters train
    if lora:
        assert t.ref_model is None and type(t.model).__name__.startswith("Peft")
    else:
        ref = list(t.ref_model.parameters())
        assert ref and not any(p.requires_grad for p in ref)
        assert not {p.data_ptr() for p in ref} & {p.data_ptr() for p in t.model.parameters()}
        assert all(torch.equal(p, q) for p, q in zip(ref, t.model.parameters(), strict=True))
    assert t.model_wrapped is not None and t.optimizer is not None
    bf16 = c._trainer(dataclasses.replace(case, dtype="bf16"), data, "cpu", {})
    assert bf16.args.bf16 is True


def test_trl_with_liger_applies_its_kernels_to_the_model(mods, tiny, monkeypatch):
    """The Trainer applies Liger's kernels when `train()` starts, which the bench never calls: with
    `use_liger_kernel` the contender applies them itself, to the trainer's model with TRL's Liger settings (TRL
    turns Liger's fused linear cross-entropy off: it replaces the forward TRL needs)."""
    pytest.importorskip("trl")
    pytest.importorskip("liger_kernel")
    import transformers.integrations.liger as liger

    step, _, _ = mods
    case, data = tiny
    applied = []
    monkeypatch.setattr(liger, "apply_liger_kernel", lambda model, config: applied.append((model, config)))
    t = step.step_contenders()["trl-dpo"]._trainer(case, data, "cpu", {"use_liger_kernel": True})
    assert len(applied) == 1 and applied[0][0] is t.model and applied[0][1] is t.args.liger_kernel_config
    assert t.args.liger_kernel_config.get("fused_linear_cross_entropy") is False
    applied.clear()
    step.step_contenders()["trl-dpo"]._trainer(case, data, "cpu", {"padding_free": True})
    assert applied == []


class _FakeTrainer:
    padding_free = False  # TRL 1.16: False unless asked for, and still False when asked for (it pads)


def test_trl_keeps_each_option_that_builds_is_used_and_steps(mods, tiny, monkeypatch):
    """TRL's options are tried one at a time on top of those kept: an option whose step raises is reported with its
    error's first line and Liger's process-wide patches are undone; an option TRL accepts but drops is reported
    with why; the kept ones build the final trainer, and the row's note says which were used and which not."""
    pytest.importorskip("trl")
    step, _, _ = mods
    case, data = tiny
    built, stepped, restored = [], [], []

    def trainer(self, case_, data_, device, options):
        assert (case_, data_, device) == (case, data, "cpu")
        t = make()
        t.options = dict(options)
        built.append(t)
        return t

    make = _FakeTrainer

    def train_step(self, batch):
        stepped.append((dict(self.trainer.options), batch))
        if self.trainer.options.get("use_liger_kernel"):
            raise RuntimeError("liger broke\nsecond line")
        return 0.5

    monkeypatch.setattr(step.TRLDPOStep, "_trainer", trainer)
    monkeypatch.setattr(step.TRLDPOStep, "train_step", train_step)
    monkeypatch.setattr(step.TRLDPOStep, "batch", lambda self, pairs: f"batch of {pairs}")
    monkeypatch.setattr(step, "_module_state", lambda: "snapshot")
    monkeypatch.setattr(step, "_restore", restored.append)
    c = step.step_contenders()["trl-dpo"]
    c.build(case, data, "cpu")
    assert [t.options for t in built] == [{"use_liger_kernel": True}, {"padding_free": True},
                                         {"precompute_ref_log_probs": True}, {"precompute_ref_log_probs": True}]
    assert stepped == [({"use_liger_kernel": True}, "batch of 1"), ({"precompute_ref_log_probs": True}, "batch of 1")]
    assert restored == ["snapshot"]
    assert c.trainer is built[-1] and c.options == ["precompute_ref_log_probs"]
    import trl

    assert c.notes == [
        f"trl {trl.__version__}",
        "options used: precompute_ref_log_probs=True",
        "not used: use_liger_kernel: RuntimeError: liger broke",
        "not used: padding_free: TRL 1.16 accepts it but warns it is 'temporarily unavailable' since its DPO "
        "refactor and pads (it also needs FlashAttention 2/3)",
    ]
    # Every option failing: the note names them all as not used.
    built.clear()
    monkeypatch.setattr(step.TRLDPOStep, "train_step", lambda self, batch: 1 / 0)
    c = step.step_contenders()["trl-dpo"]
    c.build(case, data, "cpu")
    assert c.options == [] and built[-1].options == {}
    assert c.notes[1] == "options used: none of use_liger_kernel, padding_free, precompute_ref_log_probs"
    assert c.notes[2:] == ["not used: use_liger_kernel: ZeroDivisionError: division by zero",
                           "not used: padding_free: TRL 1.16 accepts it but warns it is 'temporarily unavailable' "
                           "since its DPO refactor and pads (it also needs FlashAttention 2/3)",
                           "not used: precompute_ref_log_probs: ZeroDivisionError: division by zero"]
    # A TRL that takes every option (and has no padding_free attribute to say otherwise): all three kept, in order.
    built.clear()
    make = type("OtherTRL", (), {})  # noqa: F841 - the class `trainer` above builds from now on
    monkeypatch.setattr(step.TRLDPOStep, "train_step", lambda self, batch: 0.5)
    c = step.step_contenders()["trl-dpo"]
    c.build(case, data, "cpu")
    assert built[-1].options == dict.fromkeys(step.OPTIONAL_TRL, True)
    assert c.notes[1:] == ["options used: padding_free=True, precompute_ref_log_probs=True, use_liger_kernel=True"]


def test_a_failed_liger_trial_leaves_transformers_as_it_was(mods):
    """Liger patches transformers' model modules for the whole process: `_restore(_module_state())` puts back every
    global of every loaded model module (llava, llama and clip are loaded before the snapshot)."""
    step, _, _ = mods
    import transformers.models.llama.modeling_llama as llama

    saved = step._module_state()
    assert {"transformers.models.llava.modeling_llava", "transformers.models.llama.modeling_llama",
            "transformers.models.clip.modeling_clip"} <= set(saved)
    norm, rotary = llama.LlamaRMSNorm, llama.apply_rotary_pos_emb
    try:
        llama.LlamaRMSNorm, llama.apply_rotary_pos_emb = object, len
        step._restore(saved)
        assert llama.LlamaRMSNorm is norm and llama.apply_rotary_pos_emb is rotary
    finally:
        llama.LlamaRMSNorm, llama.apply_rotary_pos_emb = norm, rotary


def test_an_error_is_reported_by_its_type_and_first_line(mods):
    step, _, _ = mods
    assert step._first_line(ValueError("first\nsecond")) == "ValueError: first"
    assert step._first_line(ValueError("  padded  \n")) == "ValueError: padded"
    assert step._first_line(KeyError()) == "KeyError: "
    assert step._first_line(RuntimeError("x" * 300)) == "RuntimeError: " + "x" * 220 + " [cut]"
    assert step._first_line(RuntimeError("x" * 220)) == "RuntimeError: " + "x" * 220  # whole: not marked


def test_the_step_contenders_names_objectives_and_twins(mods):
    """The `--contenders` keys are the rows' names; each tpo_fast row trains the objective its name says, with the
    options its name says, and is compared with the right twin (shared prefix against the unshared step; the
    cached reference and the SDPA A/B against theirs); the two oracles of the cross-check are the independent
    implementations."""
    step, _, _ = mods
    cs = step.step_contenders()
    assert list(cs) == ["official-tpo", "trl-dpo", "ours-dpo", "ours-dpo-shared", "ours-tpo", "ours-tpo-shared",
                        "ours-tpo-shared-refcache", "ours-tpo-shared-sdpa"]
    assert all(c.name == k and c.family == "step" for k, c in cs.items())
    assert {k: (c.kind, c.objective, c.oracle) for k, c in cs.items()} == {
        "official-tpo": ("baseline", "tpo", True), "trl-dpo": ("peer", "dpo", True),
        "ours-dpo": ("ours", "dpo", False), "ours-dpo-shared": ("ours", "dpo", False),
        "ours-tpo": ("ours", "tpo", False), "ours-tpo-shared": ("ours", "tpo", False),
        "ours-tpo-shared-refcache": ("ours", "tpo", False), "ours-tpo-shared-sdpa": ("ours", "tpo", False)}
    ours = {k: c for k, c in cs.items() if k.startswith("ours")}
    assert {k: (c.shared, c.precomputed, c.sdpa, c.unshared) for k, c in ours.items()} == {
        "ours-dpo": (False, False, False, None), "ours-dpo-shared": (True, False, False, "ours-dpo"),
        "ours-tpo": (False, False, False, None), "ours-tpo-shared": (True, False, False, "ours-tpo"),
        "ours-tpo-shared-refcache": (True, True, False, None), "ours-tpo-shared-sdpa": (True, False, True, "ours-tpo")}
    assert {k: c.label for k, c in ours.items()} == {
        "ours-dpo": "tpo_fast DPO step", "ours-dpo-shared": "tpo_fast DPO step, shared prefix",
        "ours-tpo": "tpo_fast TPO step", "ours-tpo-shared": "tpo_fast TPO step, shared prefix",
        "ours-tpo-shared-refcache": "tpo_fast TPO step, shared prefix, cached reference",
        "ours-tpo-shared-sdpa": "tpo_fast TPO step, shared prefix, SDPA per sequence"}
    assert "shared_prefix=True" in cs["ours-tpo-shared"].note() and "shared_prefix" not in cs["ours-tpo"].note()
    assert "precompute_reference=True" in cs["ours-tpo-shared-refcache"].note()
    assert "TPO_FAST_VARLEN=0" in cs["ours-tpo-shared-sdpa"].note()
    assert step.expected_first_loss() == math.log(2.0)


def test_a_step_contender_says_why_it_cannot_run(mods, monkeypatch):
    """A CUDA-only case off CUDA; a shared-prefix row on a tpo_fast whose TPOConfig has no such option; the SDPA A/B
    on a tpo_fast without the varlen call, off CUDA, or on a torch without torch.nn.attention.varlen."""
    step, workload, _ = mods
    cs = step.step_contenders()
    case7b = workload.STEP_CASES["llava7b-step"]
    assert cs["ours-tpo"].case_availability(case7b, "cpu") == "needs CUDA (llava-1.5-7b shapes in bf16)"
    assert cs["ours-tpo"].case_availability(case7b, "cuda") is None
    assert cs["official-tpo"].case_availability(workload.STEP_CASES["step-tiny"], "cpu") is None
    others = [c for k, c in cs.items() if k not in ("trl-dpo", "ours-tpo-shared-sdpa")]
    assert all(c.availability("cpu", "step") is None for c in others)
    (base,) = bench_modules("_contenders.base")
    monkeypatch.setattr(base.importlib.util, "find_spec", lambda name, *a: None)
    assert cs["trl-dpo"].availability("cpu", "step") == "not installed: pip install trl"
    monkeypatch.undo()
    monkeypatch.setattr(step, "config_fields", lambda: {"objective", "padding_free"})
    assert cs["ours-tpo-shared"].availability("cuda", "step") == (
        "this tpo_fast's TPOConfig has no shared_prefix option yet (issue 15 item 1)")
    assert cs["ours-tpo"].availability("cuda", "step") is None
    monkeypatch.undo()
    sdpa = cs["ours-tpo-shared-sdpa"]
    monkeypatch.setattr(step, "varlen_module", lambda: None)
    assert sdpa.availability("cuda", "step") == "this tpo_fast has no varlen attention to compare with"

    class Module:
        api = None

        def varlen_api(self):
            return self.api

    module = Module()
    monkeypatch.setattr(step, "varlen_module", lambda: module)
    assert sdpa.availability("cpu", "step") == (
        "the same step as ours-tpo-shared off CUDA (the varlen call runs on CUDA only)")
    assert sdpa.availability("cuda", "step") == "this torch has no torch.nn.attention.varlen"
    module.api = object()
    assert sdpa.availability("cuda", "step") is None


def test_varlen_module_is_row_attention_in_this_tpo_fast_and_packing_in_older_ones(mods, monkeypatch):
    """The bench also times older tpo_fast versions (through PYTHONPATH): the varlen call lives in
    `row_attention`, before that in `packing` (when it has `varlen_api`), before that nowhere."""
    import sys

    step, _, _ = mods
    from tpo_fast.trainer import packing, row_attention

    assert step.varlen_module() is row_attention
    monkeypatch.setitem(sys.modules, "tpo_fast.trainer.row_attention", None)  # an import of it raises ImportError
    monkeypatch.delattr("tpo_fast.trainer.row_attention")
    monkeypatch.setattr(packing, "varlen_api", lambda: None, raising=False)
    assert step.varlen_module() is packing
    monkeypatch.delattr(packing, "varlen_api")
    assert step.varlen_module() is None
    monkeypatch.setitem(sys.modules, "tpo_fast.trainer.packing", None)
    monkeypatch.delattr("tpo_fast.trainer.packing")
    assert step.varlen_module() is None
    assert step.config_fields() >= {"shared_prefix", "padding_free", "precompute_reference", "objective"}


def test_ours_with_a_cached_reference_scores_only_the_pairs_a_step_can_draw(mods, tiny, monkeypatch):
    """`ours-tpo-shared-refcache` builds its trainer over the pairs the timed micro-batch and the micro-batch search
    can draw (not the whole data set), and reports the cache's time per pair; its note names the TPOConfig it
    trains with and how the trunk lays out its rows."""
    import transformers

    from tpo_fast.trainer.trainer import TPOTrainer

    step, workload, _ = mods
    case, data = tiny
    c = step.step_contenders()["ours-tpo-shared-refcache"]
    # The cache's time is its scoring pass alone: a slow step inside it counts, one in the trainer's construction
    # around it does not
    score, prepare = TPOTrainer._score_dataset, transformers.Trainer.create_accelerator_and_postprocess
    monkeypatch.setattr(TPOTrainer, "_score_dataset", lambda *a: time.sleep(0.3) or score(*a))
    monkeypatch.setattr(transformers.Trainer, "create_accelerator_and_postprocess",
                        lambda *a: time.sleep(5.0) or prepare(*a))
    c.build(case, data, "cpu")  # search_s = 0: only the timed micro-batch's 2 pairs
    monkeypatch.undo()
    assert len(c.trainer.train_dataset) == case.pairs == 2 < len(data.dataset)
    per_pair = c.reference_cache_s_per_pair
    assert 0.3 <= 2 * per_pair < 5.0
    assert c.notes[0] == (f"reference cache: {2 * per_pair:.1f} s for 2 pairs (the scoring pass, its first kernel "
                          f"compiles included), {per_pair:.2f} s per pair, paid once per data set")
    args = c.trainer.args
    assert (args.objective, args.shared_prefix, args.precompute_reference) == ("tpo", True, True)
    _assert_trainer_default_adamw(c.trainer.optimizer, step.LEARNING_RATE)
    assert c.notes[1] == _config_note(step, c.trainer)
    searched = dataclasses.replace(case, search_s=0.5, max_pairs=3)
    c = step.step_contenders()["ours-tpo-shared-refcache"]
    c.build(searched, data, "cpu")
    assert len(c.trainer.train_dataset) == 3
    many = dataclasses.replace(case, search_s=5.0, max_pairs=100)
    c = step.step_contenders()["ours-tpo-shared-refcache"]
    c.build(many, data, "cpu")
    assert len(c.trainer.train_dataset) == len(data.dataset)


@pytest.mark.parametrize("name", ["ours-dpo", "ours-tpo-shared"])
def test_ours_trains_with_the_benchs_settings(mods, tiny, name):
    """A tpo_fast row's TPOTrainer: the objective and the shared prefix its name says, no reference cache, the
    bench's learning rate and micro-batch, the Trainer's default optimizer, one micro-batch per optimizer step; a
    step returns the loss, moves the weights and leaves no gradient behind."""
    step, _, _ = mods
    case, data = tiny
    c = step.step_contenders()[name]
    c.build(case, data, "cpu")
    a = c.trainer.args
    assert (a.objective, a.shared_prefix, a.precompute_reference) == (c.objective, c.shared, False)
    assert (a.learning_rate, a.per_device_train_batch_size, a.bf16) == (step.LEARNING_RATE, case.pairs, False)
    assert c.trainer.train_dataset is data.dataset and c.trainer.current_gradient_accumulation_steps == 1
    assert all(p.requires_grad for p in c.trainer.model.parameters())  # no LoRA in a full case
    _assert_trainer_default_adamw(c.trainer.optimizer, step.LEARNING_RATE)
    assert c.notes == [_config_note(step, c.trainer)]
    before = {n: p.detach().clone() for n, p in c.trainer.model.named_parameters() if p.requires_grad}
    loss = c.train_step(c.batch(case.pairs))
    assert loss == pytest.approx(math.log(2.0), abs=1e-5)  # the policy is its reference at the first step
    assert any(not torch.equal(p, before[n]) for n, p in c.trainer.model.named_parameters() if n in before)
    assert all(p.grad is None for p in c.trainer.model.parameters())


def test_trunk_rows_describes_the_packing_the_trainer_resolves_to(mods, monkeypatch):
    """The row's note says how the trunk lays out its rows: what `packing_mode` gives for the unwrapped LLaVA and the
    trainer's shared_prefix / padding_free, with the varlen call named where it runs."""
    from types import SimpleNamespace

    import tpo_fast.trainer.model as model_module
    import tpo_fast.trainer.packing as packing

    step, _, _ = mods
    seen, modes, wanted = [], [], []
    monkeypatch.setattr(model_module, "unwrap_llava", lambda m: ("unwrapped", m))
    monkeypatch.setattr(packing, "packing_mode", lambda llava, shared, free: (seen.append((llava, shared, free)),
                                                                             modes[-1])[1])
    monkeypatch.setattr(packing, "varlen_wanted", lambda device: (wanted.append(device), True)[1])
    model = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(model=model, step_options=SimpleNamespace(shared_prefix="S", padding_free="F"))

    def rows(**mode):
        modes.append(SimpleNamespace(**mode) if mode else None)
        return step.trunk_rows(trainer)

    assert rows() == "trunk rows: padded"
    assert seen == [(("unwrapped", model), "S", "F")]
    assert rows(padding_free=True, shared_prefix=True, implementation="flex_attention") == (
        "trunk rows: one padding-free row per micro-batch, attention flex_attention")
    assert wanted == []
    assert rows(padding_free=True, shared_prefix=False, implementation=packing.SEGMENT_ATTENTION) == (
        f"trunk rows: one padding-free row per micro-batch, attention {packing.SEGMENT_ATTENTION} (one "
        "flash-attention varlen call per layer in 16-bit, TPO_FAST_VARLEN=0 turns it off)")
    assert wanted == [torch.device("cpu")]
    monkeypatch.setattr(packing, "varlen_wanted", lambda device: False)
    assert rows(padding_free=True, shared_prefix=False, implementation=packing.SEGMENT_ATTENTION) == (
        f"trunk rows: one padding-free row per micro-batch, attention {packing.SEGMENT_ATTENTION}")
    assert rows(padding_free=False, shared_prefix=True, implementation="sdpa") == (
        "trunk rows: one per pair, padded, dense mask (sdpa)")
    assert rows(padding_free=False, shared_prefix=False, implementation="eager") == (
        "trunk rows: one per row, padded, dense mask (eager)")


def test_the_official_structure_scores_fp32_logits_under_bf16_autocast(mods, tiny):
    """The official code casts the model's logits to fp32 before its log_softmax; under the bf16 autocast of a bf16
    case the LLaVA forward returns bf16 logits, so the cast is what keeps the scores fp32."""
    step, workload, _ = mods
    case, _ = tiny
    case = dataclasses.replace(case, dtype="bf16", lora=True, lora_rank=4)
    data = workload.StepData(case)
    c = step.step_contenders()["official-tpo"]
    c.build(case, data, "cpu")
    batch = c.batch(case.pairs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = c._logits(c.policy, batch["chosen"], batch["pixel_values"])
    assert logits.dtype == torch.float32 and logits.shape[:2] == batch["chosen"]["input_ids"].shape


# The step workload's cases, model and data (bench/_workloads/step.py) ----------------------------------------------
def test_the_step_cases_have_the_shapes_issue_15_asks_for(mods):
    """The CPU case: text hidden at least 512, at least 4 layers, vocabulary 32000, at least 144 image tokens, prompts
    of about 64 tokens, responses of 64-256, several pairs; the GPU case: LLaVA-1.5-7B's text shapes (Vicuna-7B) and
    vision shapes (CLIP ViT-L/14 at 336 px: 576 image tokens), bf16, LoRA r=128, an 80 GB budget; the presets."""
    _, workload, _ = mods
    cpu = workload.STEP_CASES["cpu-step"]
    assert cpu.text_hidden >= 512 and cpu.layers >= 4 and cpu.vocab == 32000 and cpu.image_tokens == 144
    assert (cpu.response_min, cpu.response_max, cpu.pairs) == (64, 256, 4) and 56 <= cpu.prompt_words <= 64
    assert not cpu.needs_cuda and cpu.dtype == "fp32" and not cpu.lora
    gpu = workload.STEP_CASES["llava7b-step"]
    assert (gpu.text_hidden, gpu.layers, gpu.heads, gpu.kv_heads, gpu.intermediate, gpu.vocab) == (
        4096, 32, 32, 32, 11008, 32000)
    assert (gpu.vision_hidden, gpu.vision_layers, gpu.vision_heads, gpu.vision_intermediate, gpu.image_size,
            gpu.patch_size, gpu.image_tokens) == (1024, 24, 16, 4096, 336, 14, 576)
    assert (gpu.dtype, gpu.lora, gpu.lora_rank, gpu.needs_cuda, gpu.memory_budget_mib) == (
        "bf16", True, 128, True, 80 * 1024)
    assert workload.STEP_CASES["cpu-step-576"].image_tokens == 576
    lora = workload.STEP_CASES["cpu-step-lora"]
    assert (lora.dtype, lora.lora, lora.image_tokens, lora.text_hidden // lora.heads) == ("bf16", True, 576, 128)
    assert workload.STEP_PRESETS == {"cpu-step": ["cpu-step"], "gpu-step": ["llava7b-step"]}
    assert all(name == case.name for name, case in workload.STEP_CASES.items())


def test_a_step_case_row_carries_its_shapes(mods):
    _, workload, _ = mods
    case = workload.STEP_CASES["cpu-step-lora"]
    row = case.as_dict()
    assert (row["d"], row["v"], row["n"], row["n_seq"], row["image_tokens"]) == (512, 32000, 4, 8, 576)
    assert row["name"] == "cpu-step-lora" and row["lora"] is True and "extra" not in row and "seq_len" not in row
    assert case.job() == {"name": "cpu-step-lora", "step": True}
    assert [workload.dtype_of(dataclasses.replace(case, dtype=d)) for d in ("fp32", "bf16", "fp16")] == [
        torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_build_model_is_a_llava_of_the_case_shapes_the_same_for_every_contender(mods, dtype):
    """Every contender builds the same random model: LLaVA with the case's CLIP and Llama shapes, the data's image
    token, SDPA attention, untied embeddings, in the case's dtype (fp16 initialised in fp32, then cast), in eval
    mode; the same weights for the same seed, other weights for another."""
    _, workload, _ = mods
    case = dataclasses.replace(workload.STEP_CASES["step-tiny"], dtype=dtype, text_hidden=48, kv_heads=1)
    model = workload.build_model(case, image_token_id=9, device="cpu")
    cfg, text, vision = model.config, model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.vocab_size) == (48, 128, 2, 4, 1, 512)
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads,
            vision.image_size, vision.patch_size) == (32, 64, 1, 2, 28, 7)
    assert (cfg.image_token_id, cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (9, -2, "default")
    assert not cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert cfg._attn_implementation == "sdpa" and not model.training
    assert text.max_position_embeddings == 4096  # LLaVA-1.5's (Vicuna-1.5's) context
    assert text.pad_token_id == workload.build_processor(case).tokenizer.pad_token_id == 0
    assert {p.dtype for p in model.parameters()} == {workload.dtype_of(case)}
    assert torch.get_default_dtype() == torch.float32  # restored
    if dtype == "fp16":  # initialised in fp32 (fp16's range), then cast
        fp32 = workload.build_model(dataclasses.replace(case, dtype="fp32"), image_token_id=9, device="cpu")
        assert all(torch.equal(p, q.half()) for p, q in zip(model.parameters(), fp32.parameters(), strict=True))
    again = workload.build_model(case, image_token_id=9, device="cpu")
    other = workload.build_model(case, image_token_id=9, device="cpu", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True))
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


def test_lora_targets_every_linear_layer_of_the_text_model_only(mods):
    """LLaVA-1.5's LoRA recipe: rank r, alpha 2r, no dropout, the seven linear layers of every text layer, none of
    the vision tower's or the projector's."""
    from peft import get_peft_model

    _, workload, _ = mods
    case = dataclasses.replace(workload.STEP_CASES["step-tiny"], lora=True, lora_rank=16)  # peft's default alpha: 8
    cfg = workload.lora_config(case)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.0)
    model = get_peft_model(workload.build_model(case, 9, "cpu"), cfg)
    adapted = sorted({n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n})
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(adapted) == 7 * case.layers and all("language_model" in n for n in adapted)
    assert {n.rsplit(".", 1)[1] for n in adapted} == set(names)


def test_step_records_are_the_same_for_a_seed_and_differ_between_seeds(mods):
    """`make_records`: `records` pairs, each an image of the case's size, a prompt of `prompt_words` words starting
    with the question, chosen and rejected of unequal word counts in [response_min, response_max]; the same for
    every contender (seed 0), other pairs for another seed."""
    _, workload, _ = mods
    case = workload.STEP_CASES["step-tiny"]
    records = workload.make_records(case)
    assert len(records) == case.records and len({r["name"] for r in records}) == case.records
    for r in records:
        assert r["image"].size == (case.image_size, case.image_size)
        assert r["prompt"].split()[:4] == ["describe", "the", "image", "."]
        assert len(r["prompt"].split()) == case.prompt_words
        n_c, n_r = len(r["chosen"].split()), len(r["rejected"].split())
        assert n_c != n_r and min(n_c, n_r) >= case.response_min and max(n_c, n_r) <= case.response_max
    again, other = workload.make_records(case), workload.make_records(case, seed=1)
    assert _texts(records) == _texts(again)
    assert _texts(records) != _texts(other)
    equal = dataclasses.replace(case, response_min=6, response_max=6, records=3)
    assert all(len(r["chosen"].split()) == len(r["rejected"].split()) == 6 for r in workload.make_records(equal))
    # Prompts longer than the question go on with sentences of the shapes world; each image is its scene's drawing.
    from tpo_fast.trainer.synthetic import draw_shape, shapes_scenes

    long = dataclasses.replace(case, prompt_words=30, records=3, image_size=56)
    records = workload.make_records(long)
    assert all(len(r["prompt"].split()) == 30 and " there is a " in r["prompt"] for r in records)
    for r, scene in zip(records, shapes_scenes(3, 1, 0), strict=True):
        assert r["name"] == scene.name
        for side in ("chosen", "rejected"):  # the scene's sentence first (cut where the response is shorter)
            words, sentence = r[side].split(), scene.pairs[0][side].split()
            assert words[:len(sentence)] == sentence[:len(words)], side
        assert r["image"].tobytes() == draw_shape(scene.shape, scene.colour, scene.position, 56).tobytes()


def test_every_contender_gets_the_same_pairs_and_the_case_image_size(mods):
    """Each contender builds its own StepData in its own process: the same records, files and collated batch every
    time; the processor takes images of the case's size, (size / patch)^2 image tokens each (the real cases' patch is
    14, the tiny processor's default 7)."""
    _, workload, _ = mods
    case = dataclasses.replace(workload.STEP_CASES["step-tiny"], image_size=56, patch_size=14, records=3, pairs=2)
    one, two = workload.StepData(case), workload.StepData(case)
    assert _texts(one.records) == _texts(two.records)
    a, b = one.padded_batch(2), two.padded_batch(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["pixel_values"].shape[-2:] == (56, 56)
    assert int((a["input_ids"][0] == one.image_token_id).sum()) == (56 // 14) ** 2  # LLaVA-1.5's patch, not 7


def test_a_micro_batch_cycles_through_the_records(tiny):
    _, data = tiny
    n = len(data.records)
    assert data.indices(3) == [0, 1, 2] and data.indices(n + 2) == [*range(n), 0, 1]
    batch = data.padded_batch(n + 1)
    assert batch["input_ids"].shape[0] == 2 * (n + 1)
    assert torch.equal(batch["input_ids"][n], batch["input_ids"][0])  # the (n+1)-th pair is the first again


@pytest.mark.parametrize("name", ["official-tpo", "ours-tpo"])
def test_step_contenders_build_the_model_of_the_run_seed(mods, name):
    """`--seed` reaches the step model's weights, not only the pairs: a contender built on `StepData(case, seed)`
    starts from `build_model(..., seed=seed)` (every contender alike), which another seed changes."""
    contenders, workload, _ = mods
    case = dataclasses.replace(workload.STEP_CASES["step-tiny"], search_s=0)
    c = contenders.step_contenders()[name]
    c.build(case, workload.StepData(case, 3), "cpu")
    model = c.policy if name == "official-tpo" else c.trainer.model
    image_token = model.config.image_token_id
    assert torch.equal(model.lm_head.weight, workload.build_model(case, image_token, "cpu", seed=3).lm_head.weight)
    assert not torch.equal(model.lm_head.weight, workload.build_model(case, image_token, "cpu").lm_head.weight)
