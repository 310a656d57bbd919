"""TPOTrainer with objective="povid" on a tiny random LLaVA (CPU): the routed step against the
full-logits oracle (methods_reference.py), `povid_step`, a short run, the reference modes and the CLI."""

import copy
import inspect
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from methods_reference import povid_scores_from_logits  # noqa: E402
from tiny_setup import state_of, tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.methods.povid import povid_step  # noqa: E402
from tpo_fast.trainer.collator import TPOCollator  # noqa: E402
from tpo_fast.trainer.config import TPOConfig  # noqa: E402
from tpo_fast.trainer.model import StepOptions, route_forward  # noqa: E402
from tpo_fast.trainer.trainer import TPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return tiny_data(str(folder), num_images=8), tiny_processor()


def _oracle(model, batch, grad):
    """(S_w, S_l, S_n) from the ordinary LLaVA forward's full logits (pixel_values per row)."""
    n = batch["image_index"].shape[0]
    idx = batch["image_index"]
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"][idx.repeat(2)]).logits
    with torch.no_grad():
        corrupted = model(input_ids=batch["input_ids"][:n], attention_mask=batch["attention_mask"][:n],
                          pixel_values=batch["corrupted_pixel_values"][idx]).logits
    targets = torch.full_like(batch["labels"], -100)  # shifted here, not by the library's own helper
    targets[:, :-1] = batch["labels"][:, 1:]
    return povid_scores_from_logits(logits, corrupted, targets)


def test_routed_povid_step_matches_full_logits_oracle(setup):
    ds, proc = setup
    batch = TPOCollator(proc)([ds[0], ds[1], ds[0]])  # 3 pairs, 2 distinct images
    n, w, beta = 3, 0.3, 0.2
    policy = tiny_model(proc)
    with torch.no_grad():  # move the policy away from the reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref = tiny_model(proc)
    oracle = copy.deepcopy(policy)
    twin = copy.deepcopy(policy)

    seen = {"vision": [], "trunk": [], "tokens": []}
    policy.model.vision_tower.register_forward_hook(
        lambda m, args, out: seen["vision"].append((args[0].shape[0], torch.is_grad_enabled())))
    def trunk(m, args, kwargs, out):
        seen["trunk"].append((kwargs["inputs_embeds"].shape[0], torch.is_grad_enabled()))
        seen["tokens"].append(kwargs["inputs_embeds"].shape[1])

    policy.model.language_model.register_forward_hook(trunk, with_kwargs=True)

    def no_logits(*_):
        raise AssertionError("the lm_head module ran: a (rows x V) logits tensor was built")

    policy.lm_head.register_forward_hook(no_logits)
    ref_hook = ref.lm_head.register_forward_hook(no_logits)
    opts = StepOptions(objective="povid", noise_weight=w, beta=beta, reference="model", backend="torch")
    route_forward(policy, opts)
    route_forward(ref, opts)
    ref_scores = ref(tpo_batch=batch, tpo_mode="reference")
    out = policy(tpo_batch=batch, tpo_ref_scores=ref_scores)
    out["loss"].backward()
    # Vision tower once per distinct image: clean with gradient, corrupted without. The clean trunk runs
    # one padding-free packed row (shared prefix: [image + prompt, chosen, rejected] per pair); the corrupted
    # trunk runs over the 3 chosen rows only (3 sequences in one row), without gradient.
    assert seen["vision"] == [(2, True), (2, False)]
    assert seen["trunk"] == [(1, True), (1, False)]
    rows = int(batch["attention_mask"][:n].sum())  # the chosen rows' real tokens: more than one pair's prefix
    assert seen["tokens"][1] < rows < seen["tokens"][0] < int(batch["attention_mask"].sum())

    ref_hook.remove()  # the oracle needs the full logits
    s_w, s_l, s_n = _oracle(oracle, batch, grad=True)
    with torch.no_grad():
        r_w, r_l, r_n = _oracle(ref, batch, grad=False)
    torch.testing.assert_close(ref_scores, torch.cat([r_w, r_l, r_n]), rtol=1e-5, atol=1e-4)
    noisy = -F.logsigmoid(beta * ((s_w - s_n) - (r_w - r_n)))
    halluc = -F.logsigmoid(beta * ((s_w - s_l) - (r_w - r_l)))
    expected = (w * noisy + (1 - w) * halluc).mean()
    expected.backward()
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    grads = {k: v.grad for k, v in oracle.named_parameters()}
    scale = max(float(g.abs().max()) for g in grads.values() if g is not None)
    for name, p in policy.named_parameters():
        if grads[name] is None:  # the vision tower: only the corrupted (argmax) branch would reach it
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-5 * scale, msg=name)
    m = out["metrics"]
    torch.testing.assert_close(m["rewards/chosen"], beta * (s_w - r_w).mean().detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m["rewards_noisy/rejected"], beta * (s_n - r_n).mean().detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m["logps/noisy"], s_n.mean().detach(), rtol=1e-5, atol=1e-4)
    for key in ("rewards/margins", "rewards/accuracies", "rewards_noisy/chosen", "rewards_noisy/margins",
                "logps/chosen", "logps/rejected", "noisy/argmax_match"):
        assert key in m, key
    assert 0 <= float(m["noisy/argmax_match"]) <= 1

    # povid_step is the same step: same loss and gradients from a fresh copy.
    twin_out = povid_step(twin, batch, ref_model=ref, beta=beta, noise_weight=w, backend="torch")
    twin_out.loss.backward()
    torch.testing.assert_close(twin_out.loss, out["loss"])
    with_grad = [name for name, p in policy.named_parameters() if p.grad is not None]
    assert [name for name, p in twin.named_parameters() if p.grad is not None] == with_grad and with_grad
    for (name, p), q in zip(twin.named_parameters(), policy.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    # The routed forward keeps advertising the model's own arguments (generate checks them).
    params = inspect.signature(policy.forward).parameters
    assert "pixel_values" in params and "tpo_batch" in params


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), objective="povid", per_device_train_batch_size=4, learning_rate=2e-3,
        max_steps=4, logging_steps=1, lr_scheduler_type="constant", warmup_steps=0, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True, loss_backend="torch", max_grad_norm=0.0,
    )
    base.update(kw)
    return TPOConfig(**base)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_povid_training_loss_falls(setup, tmp_path):
    ds, proc = setup
    args = _args(tmp_path, max_steps=16, logging_steps=4, learning_rate=1e-3)
    trainer = TPOTrainer(tiny_model(proc), args=args, train_dataset=ds, processing_class=proc)
    assert trainer.step_options.objective == "povid" and trainer.step_options.noise_weight == 0.5
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.04, [h["loss"] for h in logs]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]  # chosen vs hallucinated
    assert logs[-1]["rewards_noisy/margins"] > logs[0]["rewards_noisy/margins"]  # chosen vs noisy argmax
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "rewards_noisy/chosen",
                "rewards_noisy/rejected", "rewards_noisy/margins", "rewards_noisy/accuracies", "logps/noisy",
                "noisy/argmax_match", "tokens_per_second", "peak_memory_mb"):
        assert key in logs[-1], key


def test_povid_reference_modes_agree(setup, tmp_path):
    """Separate frozen model, LoRA adapter disabled, and the (3B,)-per-batch precomputed cache train identically."""
    from peft import LoraConfig

    ds, proc = setup
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    runs = {}
    for name, kw in {
        "adapter": dict(reference="adapter"),
        "model": dict(reference="model"),
        "precomputed": dict(reference="adapter", precompute_reference=True),
    }.items():
        base = tiny_model(proc)
        ref = tiny_model(proc) if name == "model" else None
        torch.manual_seed(1)  # same LoRA initialisation in every run
        trainer = TPOTrainer(
            base, ref_model=ref, args=_args(tmp_path / name, max_steps=3, learning_rate=1e-2, **kw),
            train_dataset=ds, processing_class=proc, peft_config=LoraConfig(**lora),
        )
        assert trainer.reference_mode == name
        trainer.train()
        lora_state = {k: v for k, v in state_of(trainer.model).items() if "lora_" in k}
        runs[name] = (_losses(trainer), lora_state)
    cache = torch.load(tmp_path / "precomputed" / "out" / "reference_scores.pt", weights_only=True)
    assert cache["scores"].shape == (len(ds), 3)  # chosen, rejected, noisy per record
    losses, params = runs["adapter"]
    assert losses[-1] != pytest.approx(losses[0])  # the reference matters once the policy has moved
    for name in ("model", "precomputed"):
        assert runs[name][0] == pytest.approx(losses, rel=1e-5, abs=1e-6), name
        for k, v in params.items():
            torch.testing.assert_close(
                runs[name][1][k], v, rtol=1e-3, atol=2e-5, msg=lambda m, name=name, k=k: f"{name}: {k}: {m}"
            )


def test_povid_config_and_parser():
    from tpo_fast.cli import build_parser

    with pytest.raises(ValueError, match="noise_weight must lie in"):
        TPOConfig(output_dir="unused", objective="povid", povid_noise_weight=1.5, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="objective must be one of"):
        TPOConfig(output_dir="unused", objective="rlhf", use_cpu=True, report_to="none")
    parser = build_parser()
    a = parser.parse_args(["train", "--model", "m", "--data", "d", "--output", "o", "--objective", "povid",
                           "--povid-noise-weight", "0.25"])
    assert (a.objective, a.povid_noise_weight, a.backend) == ("povid", 0.25, "auto")
    # `tpo-fast povid` is the same trainer path; every flag spelling parses (the older ones are aliases).
    a = parser.parse_args(["povid", "--model", "m", "--data", "d", "--output", "o", "--images", "i",
                           "--noise-weight", "0.3", "--loss-backend", "torch", "--max-steps", "2"])
    assert (a.command, a.objective, a.output_dir, a.image_folder, a.povid_noise_weight, a.backend) == (
        "povid", "povid", "o", "i", 0.3, "torch"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["povid", "--model", "m", "--data", "d", "--output", "o", "--objective", "tpo"])


def test_cli_train_objective_povid(setup, tmp_path):
    from tpo_fast.cli import main

    ds, proc = setup
    model_dir = tmp_path / "model"
    tiny_model(proc).save_pretrained(model_dir)
    proc.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ds.records[:4]))
    out = tmp_path / "run"
    assert main(["train", "--objective", "povid", "--povid-noise-weight", "0.5", "--model", str(model_dir),
                 "--data", str(data), "--images", str(ds.image_folder), "--output", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--lr", "1e-3", "--logging-steps", "1", "--precompute-reference",
                 "--loss-backend", "torch"]) == 0
    saved = os.listdir(out)
    assert "model.safetensors" in saved and "processor_config.json" in saved and "reference_scores.pt" in saved
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert len(logged) == 2
    for key in ("rewards/margins", "rewards_noisy/margins", "logps/noisy", "noisy/argmax_match"):
        assert key in logged[0], key
