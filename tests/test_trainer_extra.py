"""TPOTrainer paths beyond the fp32 single-process ones: bf16 with gradient checkpointing on CPU (full and
LoRA) against fp32, and `accelerate launch` of `tpo-fast train`."""

import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from tiny_setup import state_of, tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer.config import TPOConfig  # noqa: E402
from tpo_fast.trainer.trainer import TPOTrainer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Step-1 agreement of bf16 (+ checkpointing) with fp32. A random tiny model is nearly uniform over its
# vocabulary, so policy and reference score every response alike and the loss sits at log 2 whatever the
# precision; `_train` sharpens the policy (lm_head x 10) and uses a distinct reference (another random model,
# or a LoRA adapter with random B and alpha/r = 8) so the step-1 loss is 0.6-0.83. Measured (4 model seeds x
# {fp32 weights under autocast, bf16 weights} x {full, LoRA}, transformers 5.24, torch 2.13 CPU): the bf16
# loss differs from the fp32 one by at most 3.2e-3 (margin errors up to 7e-3 of margins 0.03-0.24: bf16 keeps
# 8 significant bits, unit roundoff 2^-8 = 3.9e-3) and the mean chosen sequence log-prob (-42 to -56 nats) by
# at most 0.028 nats. The bounds leave about 3x room over the worst measured case; the seeds used here have
# |loss - log 2| >= 0.07, far outside the bound.
LOSS_TOL, LOGP_TOL = 1e-2, 0.1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return tiny_data(str(folder), num_images=16), tiny_processor()


def _lora_config():
    from peft import LoraConfig

    # init_lora_weights=False: a random (not zero) B, so the adapter-disabled reference differs from the policy.
    return LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      init_lora_weights=False)


def _train(setup, tmp_path, *, lora, dtype=torch.float32, steps=3, **kw):
    """Train `steps` steps; returns (logged rows, trainer, grad-enabled self_attn calls, q_proj output dtypes)."""
    ds, proc = setup
    model = tiny_model(proc, seed=0 if lora else 1)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model = model.to(dtype)
    ref = None if lora else tiny_model(proc, seed=101).to(dtype)
    layer = model.model.language_model.layers[0]
    attn_calls, q_dtypes = [], set()
    # A pre-hook: non-reentrant checkpointing stops the recompute early, before a module's forward hook.
    layer.self_attn.register_forward_pre_hook(lambda m, a: attn_calls.append(1) if torch.is_grad_enabled() else None)
    layer.self_attn.q_proj.register_forward_hook(lambda m, a, out: q_dtypes.add(out.dtype))
    args = TPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=2e-3, max_steps=steps,
        logging_steps=1, lr_scheduler_type="constant", warmup_steps=0, save_strategy="no", report_to="none",
        # the seed decides the adapter's initial weights: 5 puts the LoRA run's first loss 0.12 from log 2
        use_cpu=True, seed=5 if lora else 0, disable_tqdm=True, loss_backend="torch", max_grad_norm=0.0, **kw,
    )
    trainer = TPOTrainer(model, ref_model=ref, args=args, train_dataset=ds, processing_class=proc,
                         peft_config=_lora_config() if lora else None)
    before = state_of(trainer.model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, trainer, before, len(attn_calls), q_dtypes


@pytest.mark.parametrize("variant", ["autocast", "bf16-weights", "lora-bf16-weights"])
def test_bf16_gradient_checkpointing_matches_fp32(setup, tmp_path, variant, caplog):
    """bf16=True + gradient_checkpointing=True trains on CPU, and its step-1 loss is the fp32 one within bf16 error.

    "autocast": fp32 weights, bf16 compute (the Python API with an fp32 model); "bf16-weights": the model
    loaded in bf16 (what `tpo-fast train --bf16` did before it loaded fp32 for full fine-tuning); LoRA on a
    bf16 base (`--bf16 --lora-r`), reference = the adapter disabled.
    """
    lora = variant.startswith("lora")
    steps = 3
    base_logs, *_, base_calls, _ = _train(setup, tmp_path / "fp32", lora=lora, steps=1)
    dtype = torch.float32 if variant == "autocast" else torch.bfloat16
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        logs, trainer, before, calls, q_dtypes = _train(
            setup, tmp_path / variant, lora=lora, dtype=dtype, steps=steps, bf16=True, gradient_checkpointing=True
        )
    # Only bf16 weights that the optimizer itself updates lose small updates; LoRA adapters are fp32.
    assert ("without fp32 master weights" in caplog.text) == (variant == "bf16-weights"), caplog.text

    assert len(logs) == steps and all(math.isfinite(h["loss"]) for h in logs), logs
    assert q_dtypes == {torch.bfloat16}  # the trunk's matmuls ran in bf16 (autocast, or bf16 weights)
    # Checkpointing is on: the step's one trunk forward with gradient (clean and corrupted branch together) runs
    # again in backward.
    assert base_calls == 1 and calls == 2 * steps, (base_calls, calls)
    assert abs(base_logs[0]["loss"] - math.log(2)) > 5 * LOSS_TOL  # not log 2 against log 2
    assert logs[0]["loss"] == pytest.approx(base_logs[0]["loss"], abs=LOSS_TOL)
    assert logs[0]["logps/chosen"] == pytest.approx(base_logs[0]["logps/chosen"], abs=LOGP_TOL)

    after = state_of(trainer.model)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    if lora:
        assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    else:
        assert "lm_head.weight" in {k.replace("base_model.model.", "") for k in changed}
    trainable = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert trainable == ({torch.float32} if lora or variant == "autocast" else {torch.bfloat16})


def test_path_loads_fp32_for_full_fine_tuning(setup, tmp_path, caplog):
    """TPOTrainer(model=path, bf16=True) loads fp32 weights for full fine-tuning (no lost updates), bf16 for LoRA."""
    ds, proc = setup
    folder = tmp_path / "model"
    tiny_model(proc).to(torch.bfloat16).save_pretrained(folder)
    common = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, report_to="none",
                  use_cpu=True, save_strategy="no", disable_tqdm=True, loss_backend="torch", bf16=True)
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        full = TPOTrainer(str(folder), args=TPOConfig(**common), train_dataset=ds, processing_class=proc)
        assert {p.dtype for p in full.model.parameters()} == {torch.float32}
        lora = TPOTrainer(str(folder), args=TPOConfig(**common), train_dataset=ds, processing_class=proc,
                          peft_config=_lora_config())
    assert {p.dtype for p in lora.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert "without fp32 master weights" not in caplog.text


@pytest.mark.slow
def test_accelerate_launch_single_process(setup, tmp_path):
    """`accelerate launch --num_processes 1 --cpu -m tpo_fast.cli train ...` trains and saves."""
    pytest.importorskip("accelerate")
    ds, proc = setup
    model_dir = tmp_path / "model"
    tiny_model(proc).save_pretrained(model_dir)
    proc.save_pretrained(model_dir)
    config = tmp_path / "accelerate.yaml"  # explicit: no user default_config.yaml is read
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_machines: 1\n"
                      "num_processes: 1\nmixed_precision: 'no'\nuse_cpu: true\n")
    out, data = tmp_path / "run", os.path.join(os.path.dirname(ds.image_folder), "pairs.jsonl")  # tiny_data's
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
           "-m", "tpo_fast.cli", "train", "--model", str(model_dir), "--data", str(data), "--images",
           str(ds.image_folder), "--output", str(out), "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3",
           "--logging-steps", "1", "--loss-backend", "torch", "--save-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    proc_run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc_run.returncode == 0, f"{proc_run.stdout[-3000:]}\n{proc_run.stderr[-6000:]}"
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    from transformers import LlavaForConditionalGeneration

    saved = state_of(LlavaForConditionalGeneration.from_pretrained(out))
    initial = state_of(LlavaForConditionalGeneration.from_pretrained(model_dir))
    assert set(saved) == set(initial)
    assert not torch.equal(saved["lm_head.weight"], initial["lm_head.weight"])
    assert (out / "processor_config.json").exists()


_LIGER_CHECK = r"""
import sys, tempfile
sys.path.insert(0, {dist!r})
from tiny_setup import tiny_data, tiny_model, tiny_processor
from transformers.integrations.liger import apply_liger_kernel
from tpo_fast.trainer.config import TPOConfig
from tpo_fast.trainer.trainer import TPOTrainer

proc = tiny_processor()
ds = tiny_data(tempfile.mkdtemp(), num_images=4)
args = TPOConfig(output_dir=tempfile.mkdtemp(), use_liger_kernel=True, use_cpu=True, report_to="none")
assert args.liger_kernel_config == {{"fused_linear_cross_entropy": False}}, args.liger_kernel_config
trainer = TPOTrainer(tiny_model(proc, seed=1), ref_model=tiny_model(proc, seed=101), args=args, train_dataset=ds,
                     processing_class=proc)
routed = trainer.model.forward
apply_liger_kernel(trainer.model, trainer.args.liger_kernel_config)  # what Trainer.train() does first
assert trainer.model.forward == routed, trainer.model.forward
assert "LigerRMSNorm" in repr(trainer.model.model.language_model.norm.forward)  # its trunk kernels did apply
print("routed forward kept")
"""


def test_use_liger_kernel_keeps_the_routed_forward(tmp_path):
    """`use_liger_kernel=True`: `Trainer.train()` applies Liger's kernels to the model, and Liger's fused linear
    cross-entropy (on by default) replaced the instance's forward, through which the step runs. TPOConfig keeps
    that one off (the loss is tpo_fast's), and refuses it when asked for. In a subprocess: Liger also patches
    transformers' module-level functions (RoPE), which must not leak into other tests."""
    pytest.importorskip("liger_kernel")
    with pytest.raises(ValueError, match=r"fused_linear_cross_entropy': True\} would replace the model's forward"):
        TPOConfig(output_dir=str(tmp_path), use_liger_kernel=True, use_cpu=True, report_to="none",
                  liger_kernel_config={"fused_linear_cross_entropy": True})
    assert TPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none").liger_kernel_config is None
    script = _LIGER_CHECK.format(dist=os.path.join(HERE, "dist"))
    got = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert got.returncode == 0 and "routed forward kept" in got.stdout, got.stdout + got.stderr[-3000:]
