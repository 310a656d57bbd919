"""`tpo-fast csr | povid | fisao`: command-line entries of the other seed methods.

`povid` is `tpo-fast train --objective povid` under another name: POVID trains with `TPOTrainer`.

`register(subparsers)` adds the three subcommands to the `tpo-fast` parser; each sets
`func=<callable(args) -> int>`. Models are local folders (`save_pretrained` of a LLaVA model and
its processor): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger("tpo_fast")


def _load(path: str):
    from transformers import AutoProcessor

    from tpo_fast.trainer.trainer import load_llava

    if not Path(path).exists():
        raise SystemExit(f"model folder {path!r} does not exist (nothing is downloaded)")
    return load_llava(path), AutoProcessor.from_pretrained(path)


def _device(model):
    import torch

    return model.to("cuda") if torch.cuda.is_available() else model


def run_csr_command(args: argparse.Namespace) -> int:
    """`tpo-fast csr`: the calibrated self-rewarding loop end to end."""
    import torch

    from tpo_fast.methods.csr import CLIPScorer, CSROptions, read_prompts, run_csr

    torch.manual_seed(args.seed)
    model, processor = _load(args.model)
    model = _device(model)
    clip = CLIPScorer(args.clip)
    clip.model.to(next(model.parameters()).device)
    options = CSROptions(
        lam=args.lam, mix=args.mix, length_normalize=not args.no_length_normalize, num_beams=args.num_beams,
        candidates=args.candidates, max_sentences=args.max_sentences, max_sentence_tokens=args.max_sentence_tokens,
        backend=args.backend,
    )
    prompts = read_prompts(args.prompts, args.image_folder)
    summaries = run_csr(
        model, processor, clip, prompts, args.output_dir, iterations=args.iterations, options=options,
        beta=args.beta, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
    )
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(args.output_dir) / "csr_summary.json", "w", encoding="utf-8") as f:
        json.dump(summaries, f, indent=1)
    for s in summaries:
        print(f"csr iteration {s['iteration']}: {s['pairs']} pairs, dpo loss {s['loss']}")
    return 0


def run_povid_command(args: argparse.Namespace) -> int:
    """`tpo-fast povid`: an alias of `tpo-fast train --objective povid` (POVID stage 2 with `TPOTrainer`).

    Chosen: ground truth, rejected: the hallucination-injected answer. Every `train` flag applies;
    the older spellings `--output-dir`, `--image-folder`, `--noise-weight` and `--backend` still work.
    """
    from tpo_fast.cli import _run_train

    return _run_train(args)


def run_fisao_command(args: argparse.Namespace) -> int:
    """`tpo-fast fisao`: rollout-then-update with the vision-encoder token verifier."""
    import copy

    import torch

    from tpo_fast.methods.csr import read_prompts
    from tpo_fast.methods.fisao import VisionEncoderVerifier, fisao_step
    from tpo_fast.trainer.data import open_image

    torch.manual_seed(args.seed)
    model, processor = _load(args.model)
    model = _device(model).train()  # from_pretrained returns eval mode; the updates train
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    objects = None
    if args.objects:
        objects = [w.strip() for w in Path(args.objects).read_text(encoding="utf-8").split() if w.strip()]
    verifier = VisionEncoderVerifier(ref_model, processor.image_processor, objects=objects, low=args.low,
                                     high=args.high, mode=args.reward_mode)
    if args.calibration:
        cal = json.loads(Path(args.calibration).read_text(encoding="utf-8"))
        images = [open_image(c["image"], args.image_folder) for c in cal]
        low, high = verifier.calibrate(images, [c["correct"] for c in cal], [c["hallucinated"] for c in cal],
                                       processor.tokenizer)
        print(f"fisao: calibrated thresholds low={low:.4f} high={high:.4f}")
    if verifier.low is None:
        raise SystemExit("fisao needs calibrated thresholds: pass --calibration FILE or --low and --high")
    prompts = read_prompts(args.prompts, args.image_folder)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    for it in range(args.iterations):
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start : start + args.batch_size]
            images = [open_image(r["image"], None) for r in chunk]
            metrics = fisao_step(
                model, ref_model, processor, verifier, optimizer, images, [r["prompt"] for r in chunk],
                ppo_epochs=args.ppo_epochs, max_new_tokens=args.max_new_tokens, clip_eps=args.clip_eps,
                kl_coef=args.kl_coef, kl_estimator=args.kl_estimator, backend=args.backend,
            )
            print(json.dumps({"iteration": it + 1, **metrics}))
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local folder of a LLaVA model and its processor")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--image-folder", default=None, help="folder that relative image paths are resolved against")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch", "reference"])


def register(subparsers) -> None:
    """Add `csr`, `povid` and `fisao` to the `tpo-fast` subcommand parsers."""
    p = subparsers.add_parser("csr", help="calibrated self-rewarding: beam search + CLIP reward + DPO, iterated")
    _common(p)
    p.add_argument("--prompts", required=True, help=".json/.jsonl of {image, prompt} records")
    p.add_argument("--clip", required=True, help="local folder of a CLIPModel and its processor (R_image)")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--lam", type=float, default=0.9, help="share of the image reward (lambda)")
    p.add_argument("--mix", choices=["raw", "rank"], default="raw", help="raw rewards (paper) or ranks (official)")
    p.add_argument("--no-length-normalize", action="store_true", help="rank paths by summed, not mean, reward")
    p.add_argument("--num-beams", type=int, default=4, help="open paths kept per step (best half + worst half)")
    p.add_argument("--candidates", type=int, default=3, help="candidate sentences per path (HF beam search)")
    p.add_argument("--max-sentences", type=int, default=4)
    p.add_argument("--max-sentence-tokens", type=int, default=24)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=1, help="DPO epochs per iteration")
    p.set_defaults(func=run_csr_command)

    p = subparsers.add_parser(
        "povid", help="POVID stage 2 (alias of `train --objective povid`): DPO vs hallucinated + vs noisy argmax"
    )
    from tpo_fast.cli import _add_train_arguments

    _add_train_arguments(p, objective="povid")
    p.set_defaults(func=run_povid_command)

    p = subparsers.add_parser("fisao", help="FiSAO: token-verifier rewards + clipped token-level policy gradient")
    _common(p)
    p.add_argument("--prompts", required=True, help=".json/.jsonl of {image, prompt} records")
    p.add_argument("--calibration", default=None,
                   help="JSON list of {image, correct: [words], hallucinated: [words]} to fit the thresholds")
    p.add_argument("--low", type=float, default=None)
    p.add_argument("--high", type=float, default=None)
    p.add_argument("--objects", default=None, help="file of object words (default: COCO categories)")
    p.add_argument("--reward-mode", choices=["linear", "step"], default="linear")
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--kl-estimator", choices=["k1", "k2", "k3"], default="k3")
    p.set_defaults(func=run_fisao_command)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m tpo_fast.methods.cli csr ...`) until the lead wires `register` into tpo-fast."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="tpo-fast")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
