"""Shared tiny fixtures of the trainer tests and the torchrun scripts: data, processor, model, baseline."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from tpo_fast.trainer.collator import TPOCollator  # noqa: E402
from tpo_fast.trainer.data import PreferenceDataset  # noqa: E402
from tpo_fast.trainer.synthetic import make_shapes_dataset, vocabulary  # noqa: E402
from tpo_fast.trainer.tiny import build_tiny_llava, build_tiny_processor  # noqa: E402


def tiny_data(folder: str, num_images: int = 16, seed: int = 0) -> PreferenceDataset:
    path = make_shapes_dataset(folder, num_images=num_images, image_size=28, seed=seed)
    return PreferenceDataset.from_file(path, os.path.join(folder, "images"), noise_seed=seed)


def load_tiny_data(folder: str, seed: int = 0) -> PreferenceDataset:
    """The set `tiny_data(folder)` wrote, without writing it again (safe from several processes)."""
    return PreferenceDataset.from_file(os.path.join(folder, "pairs.jsonl"), os.path.join(folder, "images"),
                                       noise_seed=seed)


def tiny_processor():
    return build_tiny_processor(vocabulary(), image_size=28, patch_size=7)


def tiny_model(processor, seed: int = 0, **kwargs):
    return build_tiny_llava(
        len(processor.tokenizer), image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"), seed=seed,
        **kwargs,
    )


def lora_config():
    """LoRA on every text linear layer, random B as well as A (`init_lora_weights=False`): the policy differs from
    its adapter-disabled reference from the first step, and both factors get gradients."""
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")


def tiny_lora_model(processor, seed: int = 0):
    """`tiny_model` with `lora_config()`'s adapter, its random factors drawn from seed + 1."""
    from peft import get_peft_model

    model = tiny_model(processor, seed=seed)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, lora_config())


def state_of(model) -> dict[str, torch.Tensor]:
    """A plain CPU fp32 copy of the parameters by name (DTensor / ZeRO-3 shards gathered)."""
    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "full_tensor"):
            p = p.full_tensor()
        out[name.replace("_fsdp_wrapped_module.", "").replace("module.", "", 1)] = p.detach().float().cpu().clone()
    return out


def baseline_run(folder: str, steps: int, global_batch: int, lr: float, seed: int = 0, lora: bool = False):
    """One process, manual loop: sequential global batches, frozen-copy reference, SGD, no clipping.

    With `lora`: the policy is `tiny_lora_model`, the reference a frozen copy of the model before the adapter was
    added, and the step runs on plain padded rows (no shared prefix, no packing, no gradient checkpointing): an
    oracle for the 2-process LoRA runs, which take the reference from the policy with its adapter switched off
    and run the shared-prefix packed step under gradient checkpointing.
    Returns (losses per step, final parameters) -- what the 2-process runs must reproduce.
    """
    import copy

    from tpo_fast.trainer.model import StepOptions, route_forward, sequence_reference_scores

    ds = tiny_data(folder)
    proc = tiny_processor()
    collate = TPOCollator(proc)
    torch.manual_seed(seed)
    if lora:
        ref = tiny_model(proc, seed=seed).requires_grad_(False).eval()
        model = tiny_lora_model(proc, seed=seed)
        opts = StepOptions(reference="model", backend="torch", shared_prefix=False, padding_free=False)
    else:
        model = tiny_model(proc, seed=seed)
        ref = copy.deepcopy(model).requires_grad_(False).eval()
        opts = StepOptions(reference="model", backend="torch")
    route_forward(model, opts)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        batch = collate([ds[i] for i in range(step * global_batch, (step + 1) * global_batch)])
        ref_scores = sequence_reference_scores(ref, batch, opts)
        out = model(tpo_batch=batch, tpo_ref_scores=ref_scores)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"].detach()))
    return losses, state_of(model)
