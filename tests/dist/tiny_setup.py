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


def state_of(model) -> dict[str, torch.Tensor]:
    """A plain CPU fp32 copy of the parameters by name (DTensor / ZeRO-3 shards gathered)."""
    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "full_tensor"):
            p = p.full_tensor()
        out[name.replace("_fsdp_wrapped_module.", "").replace("module.", "", 1)] = p.detach().float().cpu().clone()
    return out


def baseline_run(folder: str, steps: int, global_batch: int, lr: float, seed: int = 0):
    """One process, manual loop: sequential global batches, frozen-copy reference, AdamW, no clipping.

    Returns (losses per step, final parameters) -- what the 2-process runs must reproduce.
    """
    import copy

    from tpo_fast.trainer.model import StepOptions, route_forward, sequence_reference_scores

    ds = tiny_data(folder)
    proc = tiny_processor()
    collate = TPOCollator(proc)
    torch.manual_seed(seed)
    model = tiny_model(proc, seed=seed)
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    opts = StepOptions(reference="model", backend="torch")
    route_forward(model, opts)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
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
