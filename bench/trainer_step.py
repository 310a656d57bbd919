"""One training step of ours (TPO, DPO) against TRL's DPOTrainer on the same tiny LLaVA and batch (CPU).

Each contender runs in its own process so that its peak memory (peak RSS above the process's
RSS after set-up, on CPU; CUDA allocator peak on GPU) is its own. Reported per contender: median
step time (forward + backward + optimizer) over `--steps` timed steps after a warm-up, tokens/s
(non-padding tokens of the chosen and rejected rows per second), and peak memory. The TPO step
does more work by definition: a second trunk forward on the corrupted image and a reference
forward on each image.

    python bench/trainer_step.py [--vocab 32000] [--pairs 4] [--steps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CONTENDERS = ("ours-tpo", "ours-dpo", "trl-dpo")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %} ASSISTANT: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _setup(a):
    import torch

    from tpo_fast.trainer.data import PreferenceDataset
    from tpo_fast.trainer.synthetic import make_shapes_dataset, vocabulary
    from tpo_fast.trainer.tiny import build_tiny_llava, build_tiny_processor

    work = tempfile.mkdtemp(prefix="tpo-bench-")
    path = make_shapes_dataset(work, num_images=a.pairs, image_size=a.image_size, seed=0)
    ds = PreferenceDataset.from_file(path, os.path.join(work, "images"))
    proc = build_tiny_processor(vocabulary(), image_size=a.image_size, patch_size=a.patch_size)
    proc.chat_template = CHAT_TEMPLATE
    proc.tokenizer.chat_template = CHAT_TEMPLATE
    model = build_tiny_llava(a.vocab, image_token_id=proc.tokenizer.convert_tokens_to_ids("<image>"),
                             image_size=a.image_size, patch_size=a.patch_size, text_hidden=a.hidden,
                             vision_hidden=64, num_layers=a.layers)
    torch.manual_seed(0)
    return work, ds, proc, model


def run_one(name: str, a) -> dict:
    import torch

    work, ds, proc, model = _setup(a)
    common = dict(output_dir=os.path.join(work, "out"), per_device_train_batch_size=a.pairs, learning_rate=1e-5,
                  report_to="none", use_cpu=not torch.cuda.is_available(), save_strategy="no", disable_tqdm=True,
                  max_grad_norm=0.0)
    if name.startswith("ours"):
        from tpo_fast.trainer.config import TPOConfig
        from tpo_fast.trainer.trainer import TPOTrainer

        args = TPOConfig(objective=name.split("-")[1], **common)
        trainer = TPOTrainer(model, args=args, train_dataset=ds, processing_class=proc)
        batch = trainer.data_collator([ds[i] for i in range(a.pairs)])
        tokens = int(batch["attention_mask"].sum())
    else:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        rows = [{
            "images": [ds[i]["image"]],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ds[i]["prompt"]}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": ds[i]["chosen"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": ds[i]["rejected"]}]}],
        } for i in range(a.pairs)]
        args = DPOConfig(beta=0.1, max_length=None, **common)
        import copy

        # The same frozen-copy reference as ours (TRL would reload one from the model's path).
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        trainer = DPOTrainer(model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=proc)
        batch = next(iter(trainer.get_train_dataloader()))
        tokens = int(batch["attention_mask"].sum())
    batch = trainer._prepare_inputs(batch)
    model = trainer.model
    trainer.create_optimizer_and_scheduler(num_training_steps=a.steps + 2)
    trainer.current_gradient_accumulation_steps = 1  # set by the train loop, which we bypass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_mb()

    def step():
        model.train()
        loss = trainer.training_step(model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        return float(loss)

    step()  # warm-up
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    med = statistics.median(times)
    return {"contender": name, "median_step_s": round(med, 4), "spread_s": round(max(times) - min(times), 4),
            "tokens": tokens, "tokens_per_s": round(tokens / med, 1), "peak_mem_mb": round(peak, 1),
            "loss": round(loss, 5), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--only", choices=CONTENDERS, default=None, help="run one contender in this process")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.only:
        print("RESULT " + json.dumps(run_one(a.only, a)))
        return
    rows = []
    for name in CONTENDERS:
        argv = [sys.executable, __file__, "--only", name] + [
            x for k, v in vars(a).items() if k not in ("only", "json")
            for x in (f"--{k.replace('_', '-')}", str(v))
        ]
        out = subprocess.run(argv, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            rows.append({"contender": name, "error": (out.stderr or out.stdout).strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(line[len("RESULT "):]))
    import transformers
    import trl

    print(f"vocab {a.vocab}, text hidden {a.hidden}, {a.layers} layers, {a.pairs} pairs, "
          f"{(a.image_size // a.patch_size) ** 2} image tokens; transformers {transformers.__version__}, "
          f"trl {trl.__version__}")
    print(f"{'contender':<10} {'step s':>8} {'spread':>8} {'tokens':>7} {'tokens/s':>9} {'peak MiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['contender']:<10} failed: {r['error']}")
        else:
            print(f"{r['contender']:<10} {r['median_step_s']:>8.3f} {r['spread_s']:>8.3f} {r['tokens']:>7} "
                  f"{r['tokens_per_s']:>9.1f} {r['peak_mem_mb']:>9.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
