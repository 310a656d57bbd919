"""`tpo-fast csr`: calibrated self-rewarding (beam search + CLIP reward + DPO, iterated) end to end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tpo_fast.cli._common import (
    UsageError,
    add_prompt_run_arguments,
    check_prompt_run,
    need_at_least,
    need_model,
    need_valid,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_prompt_run_arguments(p, output_help="output folder: iter_N/ (preferences.json, model/) and csr_summary.json",
                             batch_help="pairs per DPO step")
    p.add_argument("--clip", required=True, metavar="DIR",
                   help="local folder of a CLIPModel and its processor (the image reward R_image)")
    p.add_argument("--iterations", type=int, default=3, help="rounds of generate, score, train")
    p.add_argument("--lam", type=float, default=0.9, help="share of the image reward (lambda)")
    p.add_argument("--mix", choices=["raw", "rank"], default="raw", help="raw rewards (paper) or ranks (official)")
    p.add_argument("--no-length-normalize", action="store_true", help="rank paths by summed, not mean, reward")
    p.add_argument("--num-beams", type=int, default=4, help="open paths kept per step (best half + worst half)")
    p.add_argument("--candidates", type=int, default=3, help="candidate sentences per path (HF beam search)")
    p.add_argument("--max-sentences", type=int, default=4, help="sentences per response")
    p.add_argument("--max-sentence-tokens", type=int, default=24, help="tokens per sentence")
    p.add_argument("--beta", type=float, default=0.1, help="inverse temperature of the DPO loss")
    p.add_argument("--epochs", type=int, default=1, help="DPO epochs per iteration")


def check(a: argparse.Namespace) -> None:
    from tpo_fast.loss import check_loss_options  # the DPO loss's own rule for beta (finite, > 0)

    check_prompt_run(a)
    need_model(a.clip, "--clip", "a CLIPModel and its processor")
    need_at_least(batch_size=(a.batch_size, 1), iterations=(a.iterations, 1), num_beams=(a.num_beams, 2),
                  candidates=(a.candidates, 1), max_sentences=(a.max_sentences, 1),
                  max_sentence_tokens=(a.max_sentence_tokens, 1), epochs=(a.epochs, 1), beta=(a.beta, 0),
                  lam=(a.lam, 0))
    if a.beta == 0 or a.lam > 1:
        raise UsageError(f"--beta {a.beta} --lam {a.lam}: out of range; pass --beta > 0 and --lam in [0, 1]")
    need_valid(f"--beta {a.beta}", lambda: check_loss_options(a.beta, weighting="none"),
               "pass the DPO loss's inverse temperature, e.g. 0.1")


def run(a: argparse.Namespace) -> int:
    import torch

    from tpo_fast.cli._common import load_model, read_prompt_records
    from tpo_fast.methods.csr import CLIPScorer, CSROptions, run_csr

    prompts = read_prompt_records(a, "csr")
    if prompts is None:
        return 2
    torch.manual_seed(a.seed)
    model, processor = load_model(a.model)
    clip = CLIPScorer(a.clip)
    clip.model.to(next(model.parameters()).device)
    options = CSROptions(
        lam=a.lam, mix=a.mix, length_normalize=not a.no_length_normalize, num_beams=a.num_beams,
        candidates=a.candidates, max_sentences=a.max_sentences, max_sentence_tokens=a.max_sentence_tokens,
        backend=a.backend,
    )
    summaries = run_csr(
        model, processor, clip, prompts, a.output_dir, iterations=a.iterations, options=options,
        beta=a.beta, lr=a.lr, batch_size=a.batch_size, epochs=a.epochs, seed=a.seed,
    )
    Path(a.output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(a.output_dir) / "csr_summary.json", "w", encoding="utf-8") as f:
        json.dump(summaries, f, indent=1)
    for s in summaries:
        print(f"csr iteration {s['iteration']}: {s['pairs']} pairs, dpo loss {s['loss']}")
    return 0
