"""CSR's sentence-level beam search on a scripted tree (issue 17): which paths the pruning keeps when an
expansion has more children than beams, and how `length_normalize` ranks paths, with exact scores.

The model, processor and CLIP scorer are stand-ins: `generate` returns the scripted children of the path it
is asked to extend (and records which paths were extended), CLIP returns each sentence's scripted value, and
the text reward is 0 with `lam=1`, so every sentence's value is exactly its script value.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import BatchFeature

from tpo_fast.methods import csr
from tpo_fast.methods.csr import CSROptions, SearchPath, build_preferences

PAD, EOS, UNK, DOT = 0, 1, 2, 3
WORDS = ["A", "B", "C", "D", "E", "F", "A1", "B1", "C1", "D1", "E1", "E2"]
ID = {w: 4 + i for i, w in enumerate(WORDS)}
PROMPT = [40, 41]

# path (the words of its sentences) -> its children: (word, value, ends the answer with eos).
# Root: 5 open children for 3 beams (keep the best 2 and the worst 1: A, B, E; C and D are pruned) and F,
# a one-sentence answer (finished at once).
TREE = {
    (): [("A", 5.0, False), ("B", 4.0, False), ("C", 3.0, False), ("D", 2.0, False), ("E", 1.0, False),
         ("F", 8.0, True)],
    ("A",): [("A1", 9.0, False)],
    ("B",): [("B1", -10.0, False)],
    ("C",): [("C1", 50.0, False)],  # reached only if the pruning keeps C: it would be the best path
    ("D",): [("D1", -50.0, False)],  # reached only if the pruning keeps D: it would be the worst path
    ("E",): [("E1", 2.0, False), ("E2", -1.0, False)],
}
VALUE = {w: v for children in TREE.values() for w, v, _ in children}


class Tokenizer:
    eos_token_id, pad_token_id, unk_token_id = EOS, PAD, UNK

    def convert_tokens_to_ids(self, token):
        return DOT if token == "." else ID.get(token, UNK)

    def decode(self, ids, skip_special_tokens=True):
        names = {v: k for k, v in ID.items()} | {DOT: "."}
        return " ".join(names[i] for i in ids if i in names)


class Processor:
    tokenizer = Tokenizer()

    def __call__(self, text, images, return_tensors):
        return BatchFeature({"input_ids": torch.tensor([PROMPT]), "pixel_values": torch.zeros(1, 3, 2, 2)})


class ScriptedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(image_token_id=None)
        self.extended: list[tuple[str, ...]] = []

    def generate(self, input_ids, **kwargs):
        words = tuple(Tokenizer().decode(input_ids[0, len(PROMPT):].tolist()).replace(" .", "").split())
        self.extended.append(words)
        rows = [[ID[w], EOS if eos else DOT] for w, _, eos in TREE[words]]
        return torch.cat([input_ids.expand(len(rows), -1), torch.tensor(rows)], dim=1)


def clip_value(image, texts):
    return torch.tensor([VALUE[t.split()[0]] for t in texts])


@pytest.fixture
def search(monkeypatch, tmp_path):
    from PIL import Image

    monkeypatch.setattr(csr, "sentence_log_probs", lambda model, p, px, prefix, cands, backend: torch.zeros(len(cands)))
    image = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(image)

    def run(length_normalize):
        model = ScriptedModel()
        options = CSROptions(lam=1.0, num_beams=3, candidates=6, max_sentences=2, length_normalize=length_normalize,
                             backend="torch")
        out = tmp_path / f"pairs-{length_normalize}.json"
        n = build_preferences(model, Processor(), clip_value, [{"image": str(image), "prompt": "q", "index": 0}], out,
                              options)
        assert n == 1
        return model.extended, json.loads(out.read_text())[0]

    return run


@pytest.mark.parametrize("length_normalize", [True, False], ids=["mean", "sum"])
def test_pruning_keeps_the_best_and_the_worst_paths(search, length_normalize):
    extended, _ = search(length_normalize)
    # The root, then the 2 best (A 5, B 4) and the worst (E 1) of its 5 open children; C and D pruned.
    assert extended == [(), ("A",), ("B",), ("E",)]


def test_length_normalized_scores_choose_the_best_mean(search):
    # Finished: F [8] mean 8; A A1 [5, 9] mean 7; E E1 [1, 2] 1.5; E E2 [1, -1] 0; B B1 [4, -10] -3.
    _, pair = search(True)
    assert (pair["chosen"], pair["chosen_score"]) == ("F", 8.0)
    assert (pair["rejected"], pair["rejected_score"]) == ("B . B1 .", -3.0)


def test_summed_scores_choose_the_best_sum(search):
    # Finished: A A1 14; F 8; E E1 3; E E2 0; B B1 -6.
    _, pair = search(False)
    assert (pair["chosen"], pair["chosen_score"]) == ("A . A1 .", 14.0)
    assert (pair["rejected"], pair["rejected_score"]) == ("B . B1 .", -6.0)


def test_search_path_score():
    path = SearchPath(values=[1.0, 2.0, 6.0])
    assert path.score() == 3.0 and path.score(length_normalize=True) == 3.0
    assert path.score(length_normalize=False) == 9.0
    assert SearchPath().score() == 0.0 and SearchPath().score(length_normalize=False) == 0.0
