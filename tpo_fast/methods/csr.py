"""CSR, calibrated self-rewarding (arXiv 2405.14622, github YiyangZhou/CSR): the data loop.

Per iteration: for every (image, prompt), a sentence-level beam search with the current model;
each candidate sentence gets a calibrated reward from

    R_image = CLIP image-text score of the sentence (`logits_per_image`, as the official `score.py`)
    R_text  = the model's own log-probability of the sentence given the prompt and the path so far,
              averaged over its tokens (what Hugging Face `sequences_scores` gives the official
              sampler), computed here with `tpo_fast.token_stats` (no logits kept)

mixed with lambda = 0.9 by one of two rules:

- `mix="raw"` (the paper): `v = lambda R_image + (1 - lambda) R_text`;
- `mix="rank"` (the official `construct.py`): within the siblings of one expansion, rank both scores
  (best = 1/n ... worst = n/n) and `v = -(lambda rank_image + (1 - lambda) rank_text)`, so that higher
  is better under both rules.

A path's score is the sum of its sentences' `v`, divided by its number of sentences with
`length_normalize=True` (the default). The official `construct.py` sorts by `score / len(path)`, where its path
also holds the root (prompt) node: it divides by the number of sentences + 1, which can rank paths of different
lengths the other way round (a 1-sentence path at -1.0 and a 3-sentence one at -2.4 in total: here the second is
the better, there the first, -0.5 against -0.6). After each
expansion the open paths are pruned to the best `ceil(num_beams / 2)` and the worst
`floor(num_beams / 2)` (keeping both ends is what lets the worst path survive to be the rejected
answer); the best finished path and the worst one whose answer differs from it (`best_and_worst`) become the
chosen and rejected responses, written
as a preference file `load_preference_records` reads. Then DPO (beta 0.1) with the previous
iteration's model as the reference (`TPOTrainer`, `objective="dpo"`); iterate (3 iterations in the paper).

Candidates come from Hugging Face beam search (`num_beams = num_return_sequences = candidates`,
stopping at the sentence end token or eos). The official uses diverse group beam search
(`num_beam_groups`, `diversity_penalty=3.0`), which transformers 5 no longer ships in `generate`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tpo_fast.ops import token_stats

logger = logging.getLogger("tpo_fast")

MIXES = ("raw", "rank")


class CLIPScorer:
    """`R_image`: CLIP's `logits_per_image` (logit scale times cosine) of an image against texts.

    Args:
        model: a `transformers.CLIPModel`, or a local path to one (loaded offline with its processor).
        processor: a CLIP processor (tokenizer + image processor); loaded from `model` when a path.
    """

    def __init__(self, model: nn.Module | str | os.PathLike, processor: Any = None) -> None:
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoProcessor, CLIPModel

            path = str(model)
            if not Path(path).exists():
                raise FileNotFoundError(f"CLIP model folder {path!r} does not exist (nothing is downloaded)")
            processor = AutoProcessor.from_pretrained(path) if processor is None else processor
            model = CLIPModel.from_pretrained(path)
        if processor is None:
            raise ValueError("a CLIPModel instance needs its processor")
        self.model = model.eval()
        self.processor = processor

    @torch.no_grad()
    def __call__(self, image: Any, texts: Sequence[str]) -> torch.Tensor:
        """fp32 (K,) scores of one image against K texts."""
        device = next(self.model.parameters()).device
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        inputs = self.processor(text=list(texts), images=image, return_tensors="pt", padding=True, truncation=True,
                                max_length=max_len)
        out = self.model(**{k: v.to(device) for k, v in inputs.items()})
        return out.logits_per_image[0].float().cpu()


def mix_rewards(r_image: torch.Tensor, r_text: torch.Tensor, lam: float = 0.9, mix: str = "raw") -> torch.Tensor:
    """Calibrated rewards of K sibling candidates, fp32 (K,), higher is better (see the module docstring)."""
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {MIXES} ('raw': the paper, 'rank': the official code), got {mix!r}")
    if not 0 <= lam <= 1:
        raise ValueError(f"lambda (the image reward's share) must lie in [0, 1], got {lam}")
    if r_image.shape != r_text.shape or r_image.dim() != 1:
        raise ValueError(f"r_image and r_text must both be (K,), got {tuple(r_image.shape)} and {tuple(r_text.shape)}")
    if mix == "raw":
        return lam * r_image.float() + (1 - lam) * r_text.float()
    n = r_image.numel()

    def rank(scores: torch.Tensor) -> torch.Tensor:
        # Official `calculate_ranks`: sorted descending (stable), best gets 1/n, worst n/n.
        order = sorted(range(n), key=lambda i: -float(scores[i]))
        out = torch.empty(n)
        for position, i in enumerate(order):
            out[i] = (position + 1) / n
        return out

    return -(lam * rank(r_image) + (1 - lam) * rank(r_text))


@dataclass
class SearchPath:
    """One path of the sentence tree: response token ids so far, its sentences and their rewards."""

    ids: list[int] = field(default_factory=list)
    sentences: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    done: bool = False

    def score(self, length_normalize: bool = True) -> float:
        total = sum(self.values)
        return total / len(self.values) if (length_normalize and self.values) else total


@dataclass(frozen=True)
class CSROptions:
    """Options of the sentence-level beam search (defaults: the paper's lambda; small tree)."""

    lam: float = 0.9
    mix: str = "raw"
    length_normalize: bool = True
    num_beams: int = 4
    candidates: int = 3
    max_sentences: int = 4
    max_sentence_tokens: int = 24
    max_response_tokens: int = 128
    backend: str = "auto"

    def __post_init__(self):
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {self.mix!r}")
        if not 0 <= self.lam <= 1:
            raise ValueError(f"lam must lie in [0, 1] (the paper uses 0.9), got {self.lam}")
        for name in ("num_beams", "candidates", "max_sentences", "max_sentence_tokens", "max_response_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.num_beams < 2:
            raise ValueError("num_beams must be >= 2: the search keeps the best and the worst paths")


def _generation_ids(model: nn.Module, tokenizer: Any) -> tuple[list[int], list[int]]:
    from tpo_fast.methods.fisao import no_sample_ids

    end = tokenizer.convert_tokens_to_ids(".")
    stops = [tokenizer.eos_token_id] + ([end] if end is not None and end != tokenizer.unk_token_id else [])
    return [s for s in stops if s is not None], no_sample_ids(model, tokenizer)


@torch.no_grad()
def sentence_log_probs(
    model: nn.Module, prompt_ids: torch.Tensor, pixel_values: torch.Tensor, prefix: list[int],
    candidates: list[list[int]], backend: str = "auto",
) -> torch.Tensor:
    """`R_text`: mean log-prob of each candidate's tokens given prompt + prefix, fp32 (K,), via the primitive.

    An lm_head with an active, unmerged PEFT adapter raises ValueError (the primitive reads the head's weight, PEFT's
    frozen base weight: the adapter would be silently left out of the scores)."""
    from tpo_fast.trainer.model import backbone_hidden, encode_images, plain_lm_head, shift_labels, unwrap_llava

    llava = unwrap_llava(model)
    lm_head = plain_lm_head(llava)
    device = prompt_ids.device
    head = prompt_ids.tolist() + prefix
    length = len(head) + max(len(c) for c in candidates)
    k = len(candidates)
    input_ids = torch.zeros((k, length), dtype=torch.long, device=device)
    labels = torch.full((k, length), -100, dtype=torch.long, device=device)
    mask = torch.zeros((k, length), dtype=torch.long, device=device)
    for i, cand in enumerate(candidates):
        row = head + cand
        input_ids[i, : len(row)] = torch.tensor(row, device=device)
        labels[i, len(head) : len(row)] = torch.tensor(cand, device=device)
        mask[i, : len(row)] = 1
    feats = encode_images(llava, pixel_values)
    hidden = backbone_hidden(llava, input_ids, mask, feats.expand(k, -1, -1))
    targets = shift_labels(labels)
    start = len(head) - 1
    hidden, targets = hidden[:, start:], targets[:, start:].contiguous()
    stats = token_stats(hidden.reshape(-1, hidden.shape[-1]), lm_head.weight, targets.reshape(-1),
                        bias=lm_head.bias, backend=backend)
    logp = stats.logprobs.view(targets.shape)
    counts = (targets != -100).sum(-1).clamp(min=1)
    return (logp.sum(-1) / counts).float().cpu()


@torch.no_grad()
def sentence_beam_search(
    model: nn.Module, processor: Any, clip: CLIPScorer, image: Any, prompt: str, options: CSROptions = CSROptions()
) -> tuple[SearchPath, SearchPath] | None:
    """The (best, worst) finished paths for one (image, prompt), or None when no two distinct answers exist."""
    from tpo_fast.methods.fisao import format_prompt

    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    inputs = processor(text=[format_prompt(processor, prompt)], images=[image], return_tensors="pt").to(device)
    prompt_ids = inputs["input_ids"][0]
    stops, banned = _generation_ids(model, tokenizer)
    active, finished = [SearchPath()], []
    for depth in range(options.max_sentences):
        children: list[SearchPath] = []
        for path in active:
            ids = torch.cat([prompt_ids, torch.tensor(path.ids, dtype=torch.long, device=device)])[None]
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                num_beams=options.candidates, num_return_sequences=options.candidates, do_sample=False,
                max_new_tokens=options.max_sentence_tokens, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                suppress_tokens=banned or None,
            )
            cands, texts, seen = [], [], set()
            for row in out[:, ids.shape[1]:].tolist():
                # A row ends at its first stop token (eos or "."): beam search pads the rows that stopped early,
                # with eos when there is no pad id (or pad id 0), and that padding is no part of the sentence.
                end = next((j for j, token in enumerate(row) if token in stops), None)
                if end is not None:
                    row = row[: end + 1]
                while row and row[-1] == tokenizer.pad_token_id and row[-1] not in stops:
                    row.pop()
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                if not text or tuple(row) in seen:
                    continue
                seen.add(tuple(row))
                cands.append(row)
                texts.append(text)
            if not cands:
                if path.sentences:
                    finished.append(SearchPath(path.ids, path.sentences, path.values, done=True))
                continue
            r_text = sentence_log_probs(model, prompt_ids, inputs["pixel_values"], path.ids, cands, options.backend)
            r_image = clip(image, texts)
            values = mix_rewards(r_image, r_text, options.lam, options.mix)
            for cand, text, value in zip(cands, texts, values.tolist(), strict=True):
                child = SearchPath(path.ids + cand, path.sentences + [text], path.values + [value])
                child.done = (
                    cand[-1] == tokenizer.eos_token_id or depth == options.max_sentences - 1
                    or len(child.ids) >= options.max_response_tokens
                )
                (finished if child.done else children).append(child)
        children.sort(key=lambda p: p.score(options.length_normalize), reverse=True)
        top = math.ceil(options.num_beams / 2)
        bottom = options.num_beams - top
        active = children if len(children) <= options.num_beams else children[:top] + children[-bottom:]
        if not active:
            break
    return best_and_worst(finished, options.length_normalize)


def best_and_worst(finished: list[SearchPath], length_normalize: bool) -> tuple[SearchPath, SearchPath] | None:
    """The best finished path and the worst one whose answer differs from the best's (the chosen and rejected
    responses), or None when every finished path gives the best's answer. Paths of equal score keep their order
    (a stable sort, as the official ranking)."""
    ranked = sorted(finished, key=lambda p: p.score(length_normalize), reverse=True)
    if not ranked:
        return None
    best = ranked[0]
    text = " ".join(best.sentences)
    for worst in reversed(ranked[1:]):  # the worst path whose text differs: not only the last one
        if " ".join(worst.sentences) != text:
            return best, worst
    return None


def read_prompts(path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Prompt records `{"image", "prompt"}` (also "question"/"query", "image_path") from .json or .jsonl."""
    from tpo_fast.trainer.data import (
        IMAGE_KEYS,
        PROMPT_KEYS,
        _as_text,
        _chat_turn_problem,
        _first,
        _image_source,
        read_records,
    )

    records = []
    for i, raw in enumerate(read_records(path)):
        if not isinstance(raw, dict) or "__error__" in raw:
            raise ValueError(f"{path}: record #{i} is not a JSON object")
        image = _image_source(_first(raw, IMAGE_KEYS))
        prompt = _as_text(_first(raw, PROMPT_KEYS))
        why = _chat_turn_problem(_first(raw, PROMPT_KEYS), "prompt")  # a conversation cut to its last message
        if why is not None:
            raise ValueError(f"{path}: record #{i}'s {why}")
        if not isinstance(image, str) or prompt is None:
            raise ValueError(f"{path}: record #{i} needs an image path (one of {list(IMAGE_KEYS)}) and a prompt "
                             f"(one of {list(PROMPT_KEYS)})")
        if image_folder is not None and not Path(image).is_absolute():
            image = str(Path(image_folder) / image)
        if not Path(image).is_file():  # found here, not midway through an iteration's search
            where = "" if image_folder is not None else " (relative paths are read from the working folder: pass the " \
                "image folder)"
            raise ValueError(f"{path}: record #{i}'s image {image} does not exist{where}")
        records.append({"image": str(Path(image).resolve()), "prompt": prompt, "index": i})
    if not records:
        raise ValueError(f"{path}: no prompt records")
    return records


def build_preferences(
    model: nn.Module, processor: Any, clip: CLIPScorer, prompts: list[dict[str, Any]], out_file: str | os.PathLike,
    options: CSROptions = CSROptions(), iteration: int = 0,
) -> int:
    """Run the search for every prompt record and write the pairs as JSON; returns the number of pairs."""
    from tpo_fast.trainer.data import open_image

    was_training = model.training
    model.eval()
    pairs = []
    for record in prompts:
        image = open_image(record["image"], None)
        found = sentence_beam_search(model, processor, clip, image, record["prompt"], options)
        if found is None:
            logger.warning("CSR: prompt #%d gave no two distinct answers; skipped", record["index"])
            continue
        best, worst = found
        pairs.append({
            "image": record["image"], "prompt": record["prompt"],
            "chosen": " ".join(best.sentences), "rejected": " ".join(worst.sentences),
            "chosen_score": best.score(options.length_normalize),
            "rejected_score": worst.score(options.length_normalize),
            "iteration": iteration, "source_index": record["index"],
        })
    model.train(was_training)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "w", encoding="utf-8") as f:
        json.dump(pairs, f, indent=1)
    return len(pairs)


def dpo_train(
    model: nn.Module, ref_model: nn.Module, processor: Any, pref_file: str | os.PathLike, output_dir: str | os.PathLike,
    *, beta: float = 0.1, lr: float = 1e-6, batch_size: int = 2, epochs: int = 1, backend: str = "auto", seed: int = 0,
) -> float:
    """DPO on a preference file against `ref_model` (the previous iteration); returns the mean step loss.

    `TPOTrainer` with `objective="dpo"` and `ref_model` as the reference: AdamW at a constant `lr`,
    no gradient clipping, nothing saved (`output_dir` only holds the trainer's run files). The model
    is trained in place on the device it is on.
    """
    from tpo_fast.trainer.config import TPOConfig
    from tpo_fast.trainer.data import PreferenceDataset
    from tpo_fast.trainer.trainer import TPOTrainer

    args = TPOConfig(
        output_dir=str(output_dir), objective="dpo", reference="model", beta=beta, learning_rate=lr,
        per_device_train_batch_size=batch_size, num_train_epochs=epochs, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=0.0, save_strategy="no", report_to="none", logging_steps=1, seed=seed,
        loss_backend=backend, disable_tqdm=True, dataloader_num_workers=0,
        use_cpu=next(model.parameters()).device.type == "cpu",
    )
    dataset = PreferenceDataset.from_file(pref_file)
    trainer = TPOTrainer(model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=processor)
    return float(trainer.train().training_loss)


def run_csr(
    model: nn.Module, processor: Any, clip: CLIPScorer, prompts: list[dict[str, Any]], output_dir: str | os.PathLike,
    *, iterations: int = 3, options: CSROptions = CSROptions(), beta: float = 0.1, lr: float = 1e-6,
    batch_size: int = 2, epochs: int = 1, save: bool = True, seed: int = 0,
) -> list[dict[str, Any]]:
    """The CSR loop: per iteration build preferences with the current model, then DPO against the previous one.

    Writes `output_dir/iter_{k}/preferences.json` and (with `save`) the model and processor there.
    Returns one summary per iteration: pairs, mean loss, paths.
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    summaries = []
    for k in range(1, iterations + 1):
        folder = Path(output_dir) / f"iter_{k}"
        pref_file = folder / "preferences.json"
        n_pairs = build_preferences(model, processor, clip, prompts, pref_file, options, iteration=k)
        summary = {"iteration": k, "pairs": n_pairs, "preferences": str(pref_file), "loss": None}
        if n_pairs == 0:
            logger.warning("CSR iteration %d: no preference pairs; the model is left unchanged", k)
        else:
            ref_model = copy.deepcopy(model)  # the previous iteration's model (TPOTrainer freezes it)
            summary["loss"] = dpo_train(
                model, ref_model, processor, pref_file, folder / "dpo", beta=beta, lr=lr, batch_size=batch_size,
                epochs=epochs, backend=options.backend, seed=seed + k,
            )
            del ref_model
        if save:
            model.save_pretrained(folder / "model")
            processor.save_pretrained(folder / "model")
            summary["model"] = str(folder / "model")
        logger.info("CSR iteration %d: %s", k, summary)
        summaries.append(summary)
    return summaries
