"""`run_demo` (tpo_fast/trainer/demo.py): what it hands the trainer, what it keeps where, and the first and last
logged windows it reports, on two- and three-step runs; its defaults with the trainer stopped once built."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from tpo_fast.trainer.demo import run_demo


@pytest.fixture
def tpo_fast_logger():
    logger = logging.getLogger("tpo_fast")
    level = logger.level
    logger.setLevel(logging.NOTSET)
    yield logger
    logger.setLevel(level)


@pytest.mark.parametrize("steps", [2, 3])  # two logged windows are enough; of three the middle one is neither end
def test_a_short_demo_run(built_trainers, tmp_path, monkeypatch, tpo_fast_logger, steps):
    from tpo_fast.trainer.synthetic import make_shapes_dataset
    from tpo_fast.trainer.tiny import build_tiny_llava

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    r = run_demo(str(tmp_path), max_steps=steps, batch_size=2, num_images=6, learning_rate=0.01, objective="dpo",
                 logging_steps=1, seed=2, quiet=True)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    (trainer,) = built_trainers
    a = trainer.args
    assert (a.output_dir, a.objective, a.per_device_train_batch_size, a.learning_rate, a.max_steps, a.logging_steps,
            a.lr_scheduler_type, a.warmup_steps, a.save_strategy, a.report_to, a.use_cpu, a.seed, a.noise_seed,
            a.disable_tqdm, a.dataloader_num_workers) == (
        str(tmp_path / "run"), "dpo", 2, 0.01, steps, 1, "constant", 0, "no", [], True, 2, 2, True, 0)
    assert tpo_fast_logger.level == logging.ERROR  # quiet: only errors from tpo_fast
    assert logging.getLogger().level != logging.ERROR
    # the data: six shapes-world pictures drawn with the seed, corrupted with the seed's noise
    pairs = (tmp_path / "data" / "pairs.jsonl").read_text()
    assert pairs == make_shapes_dataset(tmp_path / "other", num_images=6, seed=2).read_text()
    assert len(trainer.train_dataset) == 6 and trainer.train_dataset.noise_seed == 2
    # the model: the tiny LLaVA of the seed, its image token the processor's
    processor = trainer.processing_class
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    want = build_tiny_llava(len(processor.tokenizer), image_token_id=image_token, seed=2)
    assert all(torch.equal(trainer.initial[n], p) for n, p in want.named_parameters())
    assert trainer.model.config.image_token_id == image_token
    assert processor.image_processor.crop_size == {"height": 28, "width": 28} and processor.patch_size == 7
    # what it reports: every logged window (two are enough), the first and the last
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == steps and r.history == history and len({h["loss"] for h in history}) == steps
    assert (r.first_loss, r.first_accuracy) == (history[0]["loss"], history[0]["rewards/accuracies"])
    last = history[steps - 1]
    assert (r.last_loss, r.last_accuracy) == (last["loss"], last["rewards/accuracies"])
    assert (r.model_dir, r.data_file, r.image_folder) == (
        str(tmp_path / "model"), str(tmp_path / "data" / "pairs.jsonl"), str(tmp_path / "data" / "images"))
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "llava"
    assert (tmp_path / "model" / "processor_config.json").exists()


def test_a_run_that_logs_once_says_what_to_do(built_trainers, tmp_path):
    with pytest.raises(RuntimeError, match=r"^the demo logged 1 step\(s\); raise max_steps above logging_steps$"):
        run_demo(str(tmp_path), max_steps=2, logging_steps=2, num_images=4, batch_size=2, quiet=True)


def test_the_demo_defaults(built_trainers, tmp_path):
    built_trainers.stop = True
    with pytest.raises(built_trainers.Stopped):
        run_demo()  # a temporary folder
    a = built_trainers[0].args
    assert (a.objective, a.per_device_train_batch_size, a.learning_rate, a.max_steps, a.logging_steps, a.seed,
            a.noise_seed, a.disable_tqdm) == ("tpo", 8, 2e-3, 200, 20, 0, 0, False)
    assert a.freeze_vision_tower is False  # a random tower must learn the shapes (README's demo table trained it)
    assert len(built_trainers[0].train_dataset) == 256
    assert os.path.basename(os.path.dirname(a.output_dir)).startswith("tpo-fast-demo-")
