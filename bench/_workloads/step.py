"""The `step` workload: one whole training step (forward, backward, optimizer) of a LLaVA-shaped model.

A step case is a random LLaVA model built from a config (a small CLIP vision tower, a Llama text
model) and a set of shapes-world preference pairs whose prompts and responses are long enough to look
like training data: about `prompt_words` words of question after the image, responses of
`response_min`..`response_max` tokens, chosen and rejected of unequal lengths. Nothing is downloaded;
the tokenizer is tpo_fast's word-level one over the shapes vocabulary, so one word is one token.

Every contender of a case builds the same model (same seed) and trains on the same pairs. The
tokens a step is credited with are counted once, here, the same for every contender: per pair, the
prompt (BOS, template, image tokens, question) once, plus the chosen and the rejected response,
padding excluded. tokens/s = those tokens / the step's median time.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import asdict, dataclass, field, replace

import torch

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class StepCase:
    """One step benchmark: model shapes, data shapes, the micro-batch and the memory budget."""

    name: str
    model: str
    text_hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    pairs: int  # the timed micro-batch
    prompt_words: int
    response_min: int
    response_max: int
    dtype: str = "fp32"
    lora: bool = False
    needs_cuda: bool = False
    memory_budget_mib: float = 4096.0  # the budget of the largest-micro-batch search (total peak)
    max_pairs: int = 32  # the search stops there
    search_s: float = 120.0  # and after this many seconds
    records: int = 64  # pairs in the data set (micro-batches cycle through them)
    lora_rank: int = 128
    extra: dict = field(default_factory=dict)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    # The loss workloads' row fields: d, v, n (here the pairs of the timed micro-batch), n_seq rows.
    @property
    def d(self) -> int:
        return self.text_hidden

    @property
    def v(self) -> int:
        return self.vocab

    @property
    def n(self) -> int:
        return self.pairs

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        # No seq_len: the measuring child sets it to the collated batch's padded row length.
        return {**out, "d": self.d, "v": self.v, "n": self.n, "n_seq": 2 * self.pairs,
                "image_tokens": self.image_tokens}

    def job(self) -> dict:
        return {"name": self.name, "step": True}


STEP_CASES: dict[str, StepCase] = {
    # Seconds on a CPU: the smoke test's.
    "step-tiny": StepCase(
        "step-tiny", "tiny", text_hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512,
        image_size=28, patch_size=7, vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64,
        pairs=2, prompt_words=8, response_min=4, response_max=12, memory_budget_mib=512, max_pairs=4,
        search_s=20, records=8,
    ),
    # The toy bench/trainer_step.py timed (README's "0.17 s vs 2.03 s"): text hidden 128, 2 layers, vocab
    # 32000, 64 image tokens, shapes-world captions of ~10 tokens. Where TRL's time goes on it: docs/bench.md.
    "step-toy": StepCase(
        "step-toy", "llava-h128-l2", text_hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=32000,
        image_size=56, patch_size=7, vision_hidden=64, vision_layers=2, vision_heads=2, vision_intermediate=128,
        pairs=4, prompt_words=5, response_min=8, response_max=12, memory_budget_mib=1024, max_pairs=32,
        search_s=60, records=32,
    ),
    # The CPU case (issue 15): text hidden 512, 4 layers, vocab 32000, 144 image tokens, prompts of ~64
    # tokens, responses of 64-256, 4 pairs. LLaMA's MLP ratio (11008 / 4096).
    "cpu-step": StepCase(
        "cpu-step", "llava-h512-l4", text_hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1376,
        vocab=32000, image_size=168, patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=2,
        vision_intermediate=128, pairs=4, prompt_words=56, response_min=64, response_max=256,
        memory_budget_mib=3072, max_pairs=32, search_s=60, records=32,
    ),
    # cpu-step with LLaVA-1.5's 576 image tokens (336 px / 14): how the shared prefix's gain grows with the prefix
    # (the second copy of image and prompt that sharing removes: 29% of the unshared trunk's tokens on cpu-step,
    # about 41% here).
    "cpu-step-576": StepCase(
        "cpu-step-576", "llava-h512-l4", text_hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1376,
        vocab=32000, image_size=336, patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=2,
        vision_intermediate=128, pairs=4, prompt_words=56, response_min=64, response_max=256,
        memory_budget_mib=3072, max_pairs=32, search_s=60, records=32,
    ),
    # cpu-step-576 as the 7B case trains it: bf16 weights under bf16 autocast, LoRA on the text model's linear
    # layers (rank 16 at this width), LLaVA-1.5-7B's MLP ratio and head size, so activations keep the 7B step's
    # proportions. Where the CPU can show the step's memory per micro-batch with LoRA.
    "cpu-step-lora": StepCase(
        "cpu-step-lora", "llava-h512-l4", text_hidden=512, layers=4, heads=4, kv_heads=4, intermediate=1376,
        vocab=32000, image_size=336, patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=2,
        vision_intermediate=128, pairs=4, prompt_words=56, response_min=64, response_max=256, dtype="bf16",
        lora=True, lora_rank=16, memory_budget_mib=3072, max_pairs=32, search_s=60, records=32,
    ),
    # LLaVA-1.5-7B: Vicuna-7B text shapes, CLIP ViT-L/14-336 vision shapes (576 image tokens), random
    # init, bf16, LoRA r=128 on the text model's linear layers (LLaVA-1.5's LoRA recipe); the budget is
    # an 80 GB card's.
    "llava7b-step": StepCase(
        "llava7b-step", "llava-1.5-7b", text_hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
        vocab=32000, image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
        vision_intermediate=4096, pairs=4, prompt_words=56, response_min=64, response_max=256, dtype="bf16",
        lora=True, needs_cuda=True, memory_budget_mib=80 * 1024, max_pairs=64, search_s=240, records=64,
    ),
    # The 7B case's structure at toy widths, on a CPU: the same 32 text layers (LoRA on their 7 linear layers), 24
    # vision layers, 4 pairs and bf16 autocast, so every contender issues the operators, Python calls and module
    # hooks of its 7B step, on tensors small enough that its step time is the host's work: the time a GPU step
    # cannot go below where the host, not the device, is the bottleneck (docs/bench.md, "Host time").
    "llava7b-host": StepCase(
        "llava7b-host", "llava-1.5-7b-structure", text_hidden=64, layers=32, heads=8, kv_heads=8, intermediate=176,
        vocab=512, image_size=56, patch_size=14, vision_hidden=32, vision_layers=24, vision_heads=2,
        vision_intermediate=64, pairs=4, prompt_words=8, response_min=4, response_max=8, dtype="bf16", lora=True,
        lora_rank=8, memory_budget_mib=1024, max_pairs=8, search_s=0, records=8,
    ),
}
# llava7b-step at 2 pairs, for a card of about 80 GB (an H100): there the official structure's 4-pair step (107 GB in
# all on an H200, 2026-12-04) runs out of memory, and no row could be compared with it.
STEP_CASES["llava7b-step-2p"] = replace(STEP_CASES["llava7b-step"], name="llava7b-step-2p", pairs=2)
STEP_PRESETS = {"cpu-step": ["cpu-step"], "gpu-step": ["llava7b-step"]}

# Prompt and response text: sentences of the shapes world (tpo_fast.trainer.synthetic's vocabulary).
_QUESTION = "describe the image . what is in the image ? what do you see ?"


def _sentence(rng: random.Random, colours, shapes, positions) -> list[str]:
    return f"there is a {rng.choice(colours)} {rng.choice(shapes)} on the {rng.choice(positions)} .".split()


def _text(rng: random.Random, n_words: int, first: list[str]) -> str:
    from tpo_fast.trainer.synthetic import COLOURS, POSITIONS, SHAPES

    words = list(first)
    while len(words) < n_words:
        words += _sentence(rng, list(COLOURS), SHAPES, POSITIONS)
    return " ".join(words[:n_words])


def make_records(case: StepCase, seed: int = 0) -> list[dict]:
    """`case.records` pairs: {"image": PIL, "name", "prompt", "chosen", "rejected"}, the same for every seed user.

    Response lengths (in tokens, before EOS) are drawn uniformly from [response_min, response_max],
    chosen and rejected independently, so the two rows of a pair differ in length.
    """
    from tpo_fast.trainer.synthetic import shapes_scenes

    rng = random.Random(seed)
    out = []
    for scene in shapes_scenes(case.records, 1, seed):
        from tpo_fast.trainer.synthetic import draw_shape

        pair = scene.pairs[0]
        n_chosen = rng.randint(case.response_min, case.response_max)
        n_rejected = rng.randint(case.response_min, case.response_max)
        while n_rejected == n_chosen and case.response_max > case.response_min:
            n_rejected = rng.randint(case.response_min, case.response_max)
        out.append({
            "name": scene.name,
            "image": draw_shape(scene.shape, scene.colour, scene.position, case.image_size),
            "prompt": _text(rng, case.prompt_words, _QUESTION.split()),
            "chosen": _text(rng, n_chosen, pair["chosen"].split()),
            "rejected": _text(rng, n_rejected, pair["rejected"].split()),
        })
    return out


def build_processor(case: StepCase):
    """The tiny word-level `LlavaProcessor` for images of `case.image_size` pixels, with a chat template
    that renders TRL's conversational rows as our collator's prompt ("USER: <image>\\n{q} ASSISTANT:")."""
    from tpo_fast.trainer.synthetic import vocabulary
    from tpo_fast.trainer.tiny import build_tiny_processor

    proc = build_tiny_processor(vocabulary(), image_size=case.image_size, patch_size=case.patch_size)
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %} ASSISTANT: {% endif %}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{% if m['role'] == 'assistant' %}</s>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    proc.chat_template = template
    proc.tokenizer.chat_template = template
    return proc


def dtype_of(case: StepCase) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]


def build_model(case: StepCase, image_token_id: int, device: str, seed: int = 0):
    """A randomly initialised `LlavaForConditionalGeneration` of the case's shapes, on `device`, in the case's dtype."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=case.vision_hidden, intermediate_size=case.vision_intermediate,
        num_hidden_layers=case.vision_layers, num_attention_heads=case.vision_heads, image_size=case.image_size,
        patch_size=case.patch_size, projection_dim=case.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=case.vocab, hidden_size=case.text_hidden, intermediate_size=case.intermediate,
        num_hidden_layers=case.layers, num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
        max_position_embeddings=4096, pad_token_id=0, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype_of(case) if case.dtype != "fp16" else torch.float32)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype_of(case)).eval()


def lora_config(case: StepCase):
    """LLaVA-1.5's LoRA recipe: rank 128, alpha 256, every linear layer of the text model (vision frozen)."""
    from peft import LoraConfig

    return LoraConfig(
        r=case.lora_rank, lora_alpha=2 * case.lora_rank, lora_dropout=0.0,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    )


class StepData:
    """The case's pairs, once as files (for tpo_fast's `PreferenceDataset`) and once in memory (for TRL)."""

    def __init__(self, case: StepCase, seed: int = 0):
        from tpo_fast.trainer.data import PreferenceDataset

        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"the step workload's seed (--seed) must be an int in [0, 2**32 - 1], got {seed!r}: it "
                             "seeds the LoRA adapters through transformers' set_seed, which seeds NumPy too")
        self.case, self.seed = case, seed  # the run's --seed: the pairs', the model's (`build_model`), the adapter's
        self.records = make_records(case, seed)
        self.processor = build_processor(case)
        self.image_token_id = self.processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.folder = tempfile.mkdtemp(prefix="tpo-bench-step-")
        os.makedirs(os.path.join(self.folder, "images"))
        rows = []
        for r in self.records:
            r["image"].save(os.path.join(self.folder, "images", r["name"]))
            rows.append({"image": r["name"], "question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
        import json

        path = os.path.join(self.folder, "pairs.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        self.dataset = PreferenceDataset.from_file(path, os.path.join(self.folder, "images"))
        from tpo_fast.trainer.collator import TPOCollator

        self.collator = TPOCollator(self.processor)

    def indices(self, pairs: int) -> list[int]:
        """The records of a micro-batch of `pairs` pairs: the first ones, cycling when there are more pairs."""
        return [i % len(self.records) for i in range(pairs)]

    def padded_batch(self, pairs: int) -> dict[str, torch.Tensor]:
        """tpo_fast's collated batch of the micro-batch (chosen rows, then rejected rows, right-padded)."""
        return self.collator([self.dataset[i] for i in self.indices(pairs)])

    def tokens(self, pairs: int) -> dict[str, int]:
        """{"tokens": prompt once + chosen + rejected per pair, no padding; "padded": 2B x T positions}."""
        batch = self.padded_batch(pairs)
        mask, labels = batch["attention_mask"], batch["labels"]
        b = mask.shape[0] // 2
        response = (labels != -100).sum(1)
        prompt = mask.sum(1) - response
        total = int(prompt[:b].sum() + response.sum())
        return {"tokens": total, "padded": int(mask.numel()), "response": int(response.sum()),
                "row_len": int(mask.shape[1])}
