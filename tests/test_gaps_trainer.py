"""TPOTrainer behaviours that mutation testing found unguarded (issue 17), each against an oracle written
here: a frozen reference, DPO with averaged log-probs, gradient accumulation, the reference-cache key.

Oracles shift labels themselves (`labels[:, 1:]` against `logits[:, :-1]`), never through the library's
`shift_labels`, so a bug there cannot hide in the expected value.
"""

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from test_trainer import _args as trainer_args  # noqa: E402
from tiny_setup import state_of, tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer.trainer import TPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return tiny_data(str(folder), num_images=8), tiny_processor()


def _args(tmp_path, **kw):
    return trainer_args(tmp_path, **{"max_steps": 1, "learning_rate": 1e-3, **kw})


def _sequence_logps(model, batch, average):
    """(2B,) response log-probs from the ordinary LLaVA forward's full logits, shifted here."""
    rows = batch["image_index"].repeat(2)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"][rows]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    total = (logp * mask).sum(-1)
    return total / mask.sum(-1) if average else total


@pytest.mark.parametrize("given", [False, True], ids=["copied-reference", "given-reference"])
def test_reference_model_is_frozen(setup, tmp_path, given):
    """The reference (a copy of the policy, or a trainable model passed in) takes no gradient and runs in eval mode."""
    ds, proc = setup
    policy = tiny_model(proc)
    ref = tiny_model(proc, seed=1).train() if given else None
    trainer = TPOTrainer(policy, ref_model=ref, args=_args(tmp_path, reference="model"), train_dataset=ds,
                         processing_class=proc)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    frozen = [trainer.ref_model] + ([ref] if given else [])
    for m in frozen:
        trainable = [n for n, p in m.named_parameters() if p.requires_grad]
        assert trainable == [], trainable[:5]
        assert not m.training
    # The policy itself stays trainable, but for its vision tower (the official recipe, freeze_vision_tower=True).
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in trainer.model.named_parameters() if n.startswith("model.vision_tower.")} != set()


def _pair_loss(margin, beta, loss_type, label_smoothing):
    """Per-pair DPO losses of the margin `(pi_w - pi_l) - (ref_w - ref_l)`, written out."""
    if loss_type == "hinge":
        return torch.relu(1 - beta * margin)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing


DPO_CASES = {
    "sigmoid-average": dict(average_log_prob=True),
    "sigmoid-label-smoothing": dict(label_smoothing=0.2),
    "hinge": dict(loss_type="hinge"),
    "ipo-average": dict(loss_type="ipo", average_log_prob=True),
    "reference-free": dict(reference="none"),
}


@pytest.mark.parametrize("case", list(DPO_CASES), ids=list(DPO_CASES))
def test_dpo_objective_matches_oracle(setup, tmp_path, case):
    """`objective="dpo"` through the trainer, each option reaching the loss: DPO on (mean) token log-probs."""
    ds, proc = setup
    opts = DPO_CASES[case]
    average, reference_free = opts.get("average_log_prob", False), opts.get("reference") == "none"
    policy = tiny_model(proc)
    with torch.no_grad():
        policy.lm_head.weight.mul_(5.0)  # a sharper policy: margins of order 1, far from the loss's flat middle
    ref = tiny_model(proc, seed=1)
    oracle_policy, oracle_ref = copy.deepcopy(policy), copy.deepcopy(ref)
    beta = 0.5
    trainer = TPOTrainer(policy, ref_model=None if reference_free else ref,
                         args=_args(tmp_path, objective="dpo", beta=beta, **opts), train_dataset=ds,
                         processing_class=proc)
    batch = trainer.data_collator([ds[0], ds[1], ds[2]])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()

    def oracle(average):
        pi = _sequence_logps(oracle_policy, batch, average)
        with torch.no_grad():
            rf = torch.zeros_like(pi) if reference_free else _sequence_logps(oracle_ref, batch, average)
        half = pi.shape[0] // 2
        margin = (pi[:half] - pi[half:]) - (rf[:half] - rf[half:])
        return _pair_loss(margin, beta, opts.get("loss_type", "sigmoid"), opts.get("label_smoothing", 0.0)).mean(), pi

    want, pi = oracle(average)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    if average:  # the sum would be a different loss: the averaging is what is being checked
        assert abs(float(oracle(False)[0].detach()) - float(want.detach())) > 1e-2
    grads = dict(oracle_policy.named_parameters())
    for name in ("lm_head.weight", "model.language_model.layers.0.self_attn.q_proj.weight"):
        got = dict(trainer.model.named_parameters())[name].grad
        torch.testing.assert_close(got, grads[name].grad, rtol=1e-3, atol=1e-6, msg=name)
    logged = trainer._stored_metrics["train"]
    half = pi.shape[0] // 2
    torch.testing.assert_close(torch.as_tensor(logged["logps/chosen"][0]), pi[:half].mean().detach(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opts", [dict(offset=0.2), dict(weighting="none")], ids=["offset", "weighting-none"])
def test_tpo_options_reach_the_step(setup, tmp_path, opts):
    """TPOConfig's offset and weighting reach the trainer's step: its loss is the full-logits oracle's with them."""
    from test_trainer import _oracle_loss

    ds, proc = setup
    policy = tiny_model(proc)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref = tiny_model(proc, seed=1)
    oracle_policy = copy.deepcopy(policy)
    trainer = TPOTrainer(policy, ref_model=ref, args=_args(tmp_path, **opts), train_dataset=ds, processing_class=proc)
    batch = trainer.data_collator([ds[0], ds[1], ds[2]])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        if opts.get("weighting") == "none":  # plain DPO on summed log-probs, the clean image only
            pi, rf = _sequence_logps(oracle_policy, batch, False), _sequence_logps(ref, batch, False)
            half = pi.shape[0] // 2
            want = -F.logsigmoid(0.1 * ((pi[:half] - pi[half:]) - (rf[:half] - rf[half:]))).mean()
        else:
            want, _ = _oracle_loss(oracle_policy, ref, batch, offset=opts["offset"])
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_divides_the_accumulated_gradient(setup, tmp_path):
    """Accumulating 2 half batches is one step on the whole batch: the same SGD update (mean loss, divided)."""
    ds, proc = setup
    updates = {}
    for name, bs, accum in (("full", 4, 1), ("accumulated", 2, 2)):
        model = tiny_model(proc)
        with torch.no_grad():
            model.lm_head.weight.mul_(5.0)
        before = state_of(model)
        trainer = TPOTrainer(
            model, ref_model=tiny_model(proc, seed=1),
            args=_args(tmp_path / name, per_device_train_batch_size=bs, gradient_accumulation_steps=accum,
                       optim="sgd", learning_rate=1.0, detach_weights=True),
            train_dataset=ds, processing_class=proc,
        )
        trainer.train()
        after = state_of(trainer.model)
        updates[name] = {k: after[k] - before[k] for k in before}
    full, acc = updates["full"], updates["accumulated"]
    moved = [k for k in full if full[k].abs().max() > 0]
    assert "lm_head.weight" in moved
    # Some updates are zero in exact arithmetic (a key bias under softmax): an absolute floor from the largest.
    scale = max(float(full[k].abs().max()) for k in moved)
    for k in moved:
        torch.testing.assert_close(acc[k], full[k], rtol=1e-4, atol=1e-6 * scale, msg=k)


@pytest.mark.parametrize(
    "first,second",
    [
        (dict(offset=0.5), dict(offset=0.2)),
        (dict(average_log_prob=False), dict(average_log_prob=True)),
        (dict(objective="tpo"), dict(objective="dpo")),
        (dict(weighting="tpo"), dict(weighting="none")),
    ],
    ids=["offset", "average_log_prob", "objective", "weighting"],
)
def test_reference_cache_is_recomputed_when_an_option_changes_the_scores(setup, tmp_path, first, second):
    """Two runs sharing one reference cache: the second, with an option that changes the scores, must not
    reuse the first's scores; its table equals the one a run without any cache computes."""
    ds, proc = setup
    cache = str(tmp_path / "ref_scores.pt")

    def table(run, **kw):
        trainer = TPOTrainer(tiny_model(proc), args=_args(tmp_path / run, precompute_reference=True, **kw),
                             train_dataset=ds, processing_class=proc)
        return trainer._ref_table.clone()

    stale = table("first", reference_cache=cache, **first)
    got = table("second", reference_cache=cache, **second)
    fresh = table("fresh", reference_cache=str(tmp_path / "fresh.pt"), **second)
    assert not torch.allclose(stale, fresh), "the option does not change the scores: the case tests nothing"
    torch.testing.assert_close(got, fresh, rtol=1e-6, atol=1e-6)
    again = table("third", reference_cache=cache, **second)  # same settings: the cache is reused as is
    assert torch.equal(again, got)


def test_reference_cache_is_recomputed_for_another_reference_model(setup, tmp_path):
    ds, proc = setup
    cache = str(tmp_path / "ref_scores.pt")
    tables = []
    for seed in (0, 1):
        trainer = TPOTrainer(tiny_model(proc, seed=seed), args=_args(tmp_path / str(seed), precompute_reference=True,
                                                                     reference_cache=cache),
                             train_dataset=ds, processing_class=proc)
        tables.append(trainer._ref_table.clone())
    assert not torch.allclose(tables[0], tables[1])


def test_precomputed_reference_frees_the_reference_model(setup, tmp_path):
    """Once the reference scores are cached the reference model is not kept anywhere (accelerate's list of
    prepared models included): its memory goes back before training."""
    import gc
    import weakref

    ds, proc = setup
    ref = tiny_model(proc, seed=1)
    alive = weakref.ref(ref)
    trainer = TPOTrainer(tiny_model(proc), ref_model=ref, args=_args(tmp_path, precompute_reference=True),
                         train_dataset=ds, processing_class=proc)
    del ref
    gc.collect()
    assert trainer.ref_model is None and trainer.reference_mode == "precomputed"
    assert alive() is None, gc.get_referrers(alive())[:3]
