"""`tpo-fast demo`: TPO on a tiny random LLaVA and a synthetic shapes set, on CPU, in about two minutes.

Nothing is downloaded: the model is built from configs (`tiny.py`), the data generated
(`synthetic.py`). The chosen caption names the true colour and shape, the rejected one a colour
or shape that is not in the image; the demo prints the loss and the reward accuracy as they improve.

What it keeps, under its output folder (a temporary one when none is given):

    model/                the trained model and its processor (from_pretrained loads both)
    data/pairs.jsonl      the preference pairs, image paths relative to data/images/
    data/images/          the generated images
    run/                  the Trainer's output folder (logs; no checkpoints)

so `tpo-fast train --model DIR/model --data DIR/data/pairs.jsonl --image-folder DIR/data/images ...`
goes on from there.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

import torch


@dataclass
class DemoResult:
    """First and last logged values of the run (averages over the first and last logging windows), and
    where the trained model (with its processor), the pairs and their images were saved."""

    first_loss: float
    last_loss: float
    first_accuracy: float
    last_accuracy: float
    history: list[dict]
    model_dir: str = ""
    data_file: str = ""
    image_folder: str = ""


def run_demo(
    output_dir: str | None = None,
    *,
    max_steps: int = 200,
    batch_size: int = 8,
    num_images: int = 256,
    learning_rate: float = 2e-3,
    objective: str = "tpo",
    logging_steps: int = 20,
    seed: int = 0,
    quiet: bool = False,
) -> DemoResult:
    """Train a tiny random LLaVA with TPO on generated shapes and save it with its processor in
    `output_dir/model`; returns the first and last logged metrics and the saved paths."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from tpo_fast.trainer.config import TPOConfig
    from tpo_fast.trainer.data import PreferenceDataset
    from tpo_fast.trainer.synthetic import make_shapes_dataset, vocabulary
    from tpo_fast.trainer.tiny import build_tiny_llava, build_tiny_processor
    from tpo_fast.trainer.trainer import TPOTrainer

    hf_logging.set_verbosity_error()
    work = output_dir or tempfile.mkdtemp(prefix="tpo-fast-demo-")
    data = make_shapes_dataset(os.path.join(work, "data"), num_images=num_images, seed=seed)
    processor = build_tiny_processor(vocabulary(), image_size=28, patch_size=7)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    model = build_tiny_llava(len(processor.tokenizer), image_token_id=image_token_id, seed=seed)
    image_folder = os.path.join(work, "data", "images")
    dataset = PreferenceDataset.from_file(data, image_folder, noise_seed=seed)
    args = TPOConfig(
        output_dir=os.path.join(work, "run"), objective=objective, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, max_steps=max_steps, logging_steps=logging_steps, lr_scheduler_type="constant",
        warmup_steps=0, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(), seed=seed,
        noise_seed=seed,
        disable_tqdm=quiet, dataloader_num_workers=0,
        # The tiny model's vision tower is random, not a trained CLIP: it must learn the shapes it sees, so it trains
        # here (the official recipe, the trainer's default, freezes a trained tower).
        freeze_vision_tower=False,
    )
    trainer = TPOTrainer(model, args=args, train_dataset=dataset, processing_class=processor)
    if quiet:
        logging.getLogger("tpo_fast").setLevel(logging.ERROR)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h and "rewards/accuracies" in h]
    if len(history) < 2:
        raise RuntimeError(f"the demo logged {len(history)} step(s); raise max_steps above logging_steps")
    model_dir = os.path.join(work, "model")
    trainer.save_model(model_dir)
    processor.save_pretrained(model_dir)
    first, last = history[0], history[-1]
    return DemoResult(
        first["loss"], last["loss"], first["rewards/accuracies"], last["rewards/accuracies"], history,
        model_dir=model_dir, data_file=str(data), image_folder=image_folder,
    )
