"""A precomputed reference is scored under the same mixed-precision autocast as the step it replaces.

Seen on an H100 (bench `llava7b-step-2p`, `ours-tpo-shared-refcache`: bf16 LLaVA, LoRA, `bf16=True`): the first loss
was 0.752 instead of ln 2. `TPOTrainer._precompute_reference` runs at init, before `train()` has prepared the model
(accelerate wraps its forward in the bf16 autocast), and the adapter reference was scored by calling
`sequence_reference_scores` directly: outside autocast, while the live step scores the policy (and a live adapter
reference) inside it. On CUDA the bf16 autocast runs layer_norm in fp32, so a bf16 CLIP keeps an fp32 residual stream
in the step and a bf16 one in the cache. CPU autocast keeps layer_norm in bf16, so there a bf16 model shows nothing;
these tests expose the same mismatch on CPU with an fp32 model under `bf16=True` (autocast runs its matmuls in bf16
in the step, fp32 in an unautocast cache), and with a bf16 model whose layer norms follow CUDA's autocast policy.

At step 0 the LoRA B factors are zero, so the reference (the adapter disabled) and the policy score alike: the first
loss must be ln 2 and the cached scores must equal the ones a live adapter reference computes in the step.
"""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from tiny_setup import tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer import model as model_module  # noqa: E402
from tpo_fast.trainer.config import TPOConfig  # noqa: E402
from tpo_fast.trainer.trainer import TPOTrainer  # noqa: E402

PAIRS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ds = tiny_data(str(tmp_path_factory.mktemp("data")), num_images=4)
    return torch.utils.data.Subset(ds, range(PAIRS)), tiny_processor()


def _cuda_like_layer_norm(monkeypatch):
    """F.layer_norm as CUDA autocast runs it (its fp32 list): computed and returned in fp32 inside an autocast
    region, whatever the input's dtype; unchanged outside one."""
    original = F.layer_norm

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled(x.device.type):
            return original(x, shape, weight, bias, eps)
        with torch.autocast(x.device.type, enabled=False):
            return original(x.float(), shape, None if weight is None else weight.float(),
                            None if bias is None else bias.float(), eps)

    monkeypatch.setattr(F, "layer_norm", layer_norm)


def _first_step(setup, tmp_path, dtype, precompute, **kw):
    """The first training step's loss and metrics (prepared as `train()` prepares the model: bf16 autocast), and the
    trainer."""
    from peft import LoraConfig

    ds, proc = setup
    args = TPOConfig(
        output_dir=str(tmp_path / f"out-{precompute}"), per_device_train_batch_size=PAIRS,
        per_device_eval_batch_size=PAIRS, learning_rate=1e-4, max_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, bf16=True, loss_backend="torch", precompute_reference=precompute,
        **kw,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    torch.manual_seed(1)
    trainer = TPOTrainer(tiny_model(proc).to(dtype), args=args, train_dataset=ds, processing_class=proc,
                         peft_config=lora)
    assert trainer.reference_mode == ("precomputed" if precompute else "adapter")
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    batch = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(PAIRS)]))
    loss = float(trainer.training_step(trainer.model_wrapped, batch))
    metrics = {k: float(v[0]) for k, v in trainer._stored_metrics["train"].items()}
    return loss, metrics, trainer, batch


@pytest.mark.parametrize("dtype,cuda_layer_norm", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-model", "bf16-model-cuda-layer-norm"])
@pytest.mark.parametrize("packing", [dict(shared_prefix=True), dict(shared_prefix=True, padding_free=False),
                                     dict(shared_prefix=False, padding_free=False)],
                         ids=["shared-padding-free", "shared-padded", "unshared"])
def test_cached_reference_matches_live_reference_under_bf16_autocast(setup, tmp_path, monkeypatch, dtype,
                                                                     cuda_layer_norm, packing):
    if cuda_layer_norm:
        _cuda_like_layer_norm(monkeypatch)
    live_scores = []
    original = model_module.sequence_reference_scores

    def recorded(*args, **kwargs):
        out = original(*args, **kwargs)
        live_scores.append(out.detach().float().cpu())
        return out

    monkeypatch.setattr(model_module, "sequence_reference_scores", recorded)  # the step's live adapter reference
    live_loss, live_metrics, _, _ = _first_step(setup, tmp_path, dtype, precompute=False, **packing)
    assert len(live_scores) == 1
    cached_loss, cached_metrics, trainer, batch = _first_step(setup, tmp_path, dtype, precompute=True, **packing)
    assert len(live_scores) == 1  # the cached step computed no reference

    # The cache's rows of the batch, in the step's layout (chosen scores, then rejected), against the live ones.
    cached = trainer._reference_scores(batch).cpu()
    torch.testing.assert_close(cached, live_scores[0], rtol=0, atol=1e-6)
    # Policy = reference at step 0: zero margins, loss ln 2, as the live reference gives.
    assert live_loss == pytest.approx(math.log(2), abs=1e-6)
    assert cached_loss == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(cached_metrics[key]) < 1e-6, (key, cached_metrics[key], live_metrics[key])


def test_cache_scored_without_the_steps_autocast_is_scored_again(setup, tmp_path):
    """A table's fingerprint names the autocast it was scored under: a table from before the reference was scored
    under the step's autocast (no "autocast" key), or one scored with bf16 off, is not reused under bf16=True."""
    ds, proc = setup
    cache = str(tmp_path / "reference_scores.pt")

    def table(run, bf16):
        args = TPOConfig(output_dir=str(tmp_path / run), per_device_train_batch_size=PAIRS,
                         per_device_eval_batch_size=PAIRS, report_to="none", use_cpu=True, save_strategy="no",
                         disable_tqdm=True, bf16=bf16, loss_backend="torch", precompute_reference=True,
                         reference_cache=cache)
        trainer = TPOTrainer(tiny_model(proc), args=args, train_dataset=ds, processing_class=proc)
        return trainer._ref_table.clone()

    fresh = table("a", bf16=True)
    stored = torch.load(cache, weights_only=False)
    assert stored["fingerprint"]["autocast"] == "bf16"
    del stored["fingerprint"]["autocast"]  # a table made before the key existed
    stored["scores"] = stored["scores"] + 1.0
    torch.save(stored, cache)
    assert torch.equal(table("b", bf16=True), fresh)
    plain = table("c", bf16=False)  # scored again, in fp32
    assert torch.load(cache, weights_only=False)["fingerprint"]["autocast"] == "no"
    assert not torch.equal(plain, fresh)
    assert torch.equal(table("d", bf16=True), fresh)
