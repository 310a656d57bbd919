"""TPOTrainer on a tiny random LLaVA (CPU): the step against a full-logits oracle, convergence,
reference modes, save/resume and the CLI."""

import copy
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from tiny_setup import state_of, tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer.collator import TPOCollator  # noqa: E402
from tpo_fast.trainer.config import TPOConfig  # noqa: E402
from tpo_fast.trainer.model import StepOptions, policy_loss, sequence_reference_scores  # noqa: E402
from tpo_fast.trainer.trainer import TPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return tiny_data(str(folder), num_images=16), tiny_processor()


def _oracle_loss(model, ref, batch, beta=0.1, offset=0.5, detach=False):
    """SPEC.md's TPO loss from full logits of the ordinary LLaVA forward (pixel_values per row)."""
    rows = batch["image_index"].repeat(2)

    def logits(m, px):  # position t predicts token t + 1: the last position predicts nothing
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=px[rows])
        return out.logits[:, :-1]

    targets = batch["labels"][:, 1:]  # shifted here, not with the library's shift_labels
    mask = (targets != -100).float()
    t = targets.clamp_min(0)[..., None]

    def score(m, grad):
        with torch.set_grad_enabled(grad):
            z_all = logits(m, batch["pixel_values"]).float()
            logp = torch.log_softmax(z_all, -1).gather(-1, t)[..., 0]
            z = z_all.gather(-1, t)[..., 0]
        with torch.set_grad_enabled(grad and not detach):
            zc = logits(m, batch["corrupted_pixel_values"]).float().gather(-1, t)[..., 0]
        s = (z - zc).detach() if detach else z - zc  # detach_weights: the token weights carry no gradient
        half = s.shape[0] // 2
        c = torch.cat([offset + torch.sigmoid(s[:half]), offset + 1 - torch.sigmoid(s[half:])])
        return ((logp + c.log()) * mask).sum(-1)

    pi, rf = score(model, True), score(ref, False)
    half = pi.shape[0] // 2
    return -F.logsigmoid(beta * ((pi[:half] - pi[half:]) - (rf[:half] - rf[half:]))).mean(), rf


@pytest.mark.parametrize("detach", [False, True], ids=["corrupted-grad", "detach-weights"])
def test_step_matches_full_logits_oracle(setup, detach):
    ds, proc = setup
    batch = TPOCollator(proc)([ds[0], ds[1], ds[0]])
    model = tiny_model(proc)
    with torch.no_grad():  # move the policy away from the reference
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref = tiny_model(proc)
    oracle = copy.deepcopy(model)

    images_seen = []
    model.model.vision_tower.register_forward_hook(lambda m, args, out: images_seen.append(args[0].shape[0]))
    opts = StepOptions(reference="model", detach_weights=detach, backend="torch")
    ref_scores = sequence_reference_scores(ref, batch, opts)
    out = policy_loss(model, batch, opts, ref_scores)
    out["loss"].backward()
    # 2 distinct images: one vision call for clean + corrupted together, or one each when detached
    assert images_seen == ([2, 2] if detach else [4])

    expected, ref_expected = _oracle_loss(oracle, ref, batch, detach=detach)
    expected.backward()
    torch.testing.assert_close(ref_scores.float(), ref_expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    grads = {k: v.grad for k, v in oracle.named_parameters()}
    scale = max(float(g.abs().max()) for g in grads.values() if g is not None)
    for name, p in model.named_parameters():
        # Some gradients are zero in exact arithmetic (a key bias under softmax): absolute floor.
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-5 * scale, msg=name)
    assert out["tokens"] == (batch["labels"][:, 1:] != -100).sum()


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=2e-3, max_steps=4,
        logging_steps=1, lr_scheduler_type="constant", warmup_steps=0, save_strategy="no", report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True, loss_backend="torch", max_grad_norm=0.0,
    )
    base.update(kw)
    return TPOConfig(**base)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
def test_training_loss_falls_and_reward_accuracy_rises(setup, tmp_path):
    ds, proc = setup
    args = _args(tmp_path, max_steps=16, logging_steps=4)
    trainer = TPOTrainer(tiny_model(proc), args=args, train_dataset=ds, processing_class=proc)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.1, [h["loss"] for h in logs]
    assert logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]
    assert logs[-1]["rewards/accuracies"] >= 0.9
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "visual_score/chosen",
                "visual_score/rejected", "tokens_per_second", "peak_memory_mb"):
        assert key in logs[-1], key
    assert logs[-1]["tokens_per_second"] > 0


@pytest.mark.parametrize("reference", ["model", "precomputed"])
@pytest.mark.parametrize("objective", ["tpo", "dpo"])
def test_a_training_step_reads_the_device_back_once(setup, tmp_path, monkeypatch, objective, reference):
    """A whole step as the Trainer runs it (`_prepare_inputs`, then `compute_loss` and backward): the host plans from
    the collator's CPU tensors, kept by `_prepare_inputs`, so the only read of the device is the policy loss's plan,
    after both trunk passes are issued (a GPU run had about thirty before). With precomputed reference scores the
    lookup reads the kept example indices and sends the scores without a wait."""
    from _spies import watch_device_reads

    ds, proc = setup
    kw = dict(precompute_reference=True, reference="model") if reference == "precomputed" else {}
    args = _args(tmp_path, objective=objective, **kw)
    trainer = TPOTrainer(tiny_model(proc), ref_model=tiny_model(proc, seed=1), args=args, train_dataset=ds,
                         processing_class=proc)
    assert trainer.reference_mode == reference
    prepared = trainer._prepare_inputs(trainer.data_collator([ds[0], ds[1], ds[2]]))
    trainer.compute_loss(trainer.model, prepared)  # once first: packing switches the attention once, logs once
    prepared = trainer._prepare_inputs(trainer.data_collator([ds[3], ds[1], ds[2]]))
    mode = watch_device_reads(monkeypatch, prepared)
    with mode:
        trainer.compute_loss(trainer.model, prepared).backward()
    assert mode.seen == ["tolist"], mode.seen


def test_reference_modes_agree(setup, tmp_path):
    """Separate frozen model, LoRA adapter disabled, and a precomputed cache train identically."""
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
            base, ref_model=ref, args=_args(tmp_path / name, max_steps=3, **kw), train_dataset=ds,
            processing_class=proc, peft_config=LoraConfig(**lora),
        )
        assert trainer.reference_mode == ("precomputed" if name == "precomputed" else name)
        trainer.train()
        lora_state = {k: v for k, v in state_of(trainer.model).items() if "lora_" in k}
        runs[name] = (_losses(trainer), lora_state)
    assert os.path.exists(tmp_path / "precomputed" / "out" / "reference_scores.pt")
    losses, params = runs["adapter"]
    assert losses[-1] != pytest.approx(losses[0])  # the reference matters once the policy has moved
    for name in ("model", "precomputed"):
        assert runs[name][0] == pytest.approx(losses, rel=1e-5, abs=1e-6), name
        for k, v in params.items():
            torch.testing.assert_close(
                runs[name][1][k], v, rtol=1e-3, atol=2e-5, msg=lambda m, name=name, k=k: f"{name}: {k}: {m}"
            )


def test_precompute_needs_seeded_noise(setup, tmp_path):
    ds, proc = setup
    from tpo_fast.trainer.data import PreferenceDataset

    fresh = PreferenceDataset(ds.records, ds.image_folder, noise_seed=None)
    with pytest.raises(ValueError, match="needs seeded corruption"):
        TPOTrainer(tiny_model(proc), args=_args(tmp_path, precompute_reference=True), train_dataset=fresh,
                   processing_class=proc)


@pytest.mark.slow
def test_resume_reproduces_the_next_steps(setup, tmp_path):
    ds, proc = setup
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, detach_weights=True)
    full = TPOTrainer(tiny_model(proc), args=args, train_dataset=ds, processing_class=proc)
    full.train()
    expected_losses, expected_state = _losses(full), state_of(full.model)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "optimizer.pt").exists()

    resumed = TPOTrainer(tiny_model(proc), args=args, train_dataset=ds, processing_class=proc)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # The history of steps 1-2 comes from the checkpoint, steps 3-4 are recomputed.
    assert _losses(resumed) == pytest.approx(expected_losses, rel=1e-5, abs=1e-6)
    for k, v in state_of(resumed.model).items():
        torch.testing.assert_close(v, expected_state[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_cli_train_saves_and_skips_bad_records(setup, tmp_path, capsys):
    from tpo_fast.cli import main

    ds, proc = setup
    model_dir = tmp_path / "model"
    tiny_model(proc).save_pretrained(model_dir)
    proc.save_pretrained(model_dir)
    records = [{"image": r["image"], "question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
               for r in ds.records[:8]]
    records.insert(3, {"image": "nope.png", "question": "q", "chosen": "a", "rejected": "b"})
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    common = ["train", "--model", str(model_dir), "--data", str(data), "--images", str(ds.image_folder),
              "--output", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3",
              "--logging-steps", "1", "--detach-weights"]
    capsys.readouterr()  # the model's save above
    assert main(common + ["--bad-records", "error"]) == 2  # one line, before the model loads
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("tpo-fast train: error: ") and "#3: unreadable image" in err[0], err
    assert main(common + ["--lora-r", "4", "--lora-targets", "q_proj,v_proj"]) == 0
    saved = os.listdir(tmp_path / "run")
    assert "adapter_model.safetensors" in saved and "processor_config.json" in saved
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert len(logged) == 2 and "rewards/margins" in logged[0] and "peak_memory_mb" in logged[0]
