"""Save a tiny random LLaVA (and, for CSR, a tiny CLIP) as model folders, for trying the commands on a CPU.

    python examples/make_tiny_models.py tiny-llava                  # LLaVA model + processor
    python examples/make_tiny_models.py tiny-llava --clip tiny-clip # and a CLIP model for `tpo-fast csr`

Nothing is downloaded: the models are built from configs with random weights
(`tpo_fast.trainer.tiny.save_tiny_llava`, `save_tiny_clip`), their tokenizer knows the words of
the shapes-world examples. Each folder loads like a real checkpoint (`from_pretrained`), so every
`--model DIR` in the docs takes it; it is under 1 MB and learns nothing useful beyond the examples.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("llava", help="folder for the tiny LLaVA model and its processor")
    parser.add_argument("--clip", default=None, help="also write a tiny CLIP model here (CSR's image reward)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    a = parser.parse_args(argv)

    from tpo_fast.trainer.tiny import save_tiny_clip, save_tiny_llava

    print(f"tiny LLaVA: {save_tiny_llava(a.llava, seed=a.seed)}")
    if a.clip:
        print(f"tiny CLIP: {save_tiny_clip(a.clip, seed=a.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
