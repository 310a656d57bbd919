"""Adversarial audit of 2026-12-08: the training step's host-side planning (tpo_fast/trainer/model.py: the batch's
host copy, `_response_branches`, `policy_loss`, `sequence_reference_scores`; tpo_fast/trainer/packing.py).

- A batch with an empty response (no label after the first position; a custom collator's) was refused by the packed
  step only: the padded step (`shared_prefix=False, padding_free=False`, and every model that cannot pack) scored the
  empty response 0 and trained on the pair. Likewise a label on a padding position (a collator that does not mask
  its padding) trained the hidden state of a padding token. Both are refused by every step now, in any padding layout.
- A batch whose rows hold other numbers of image placeholders than one image's (a custom collator's: one pair's rows
  without any, another's with two images' worth) was stepped silently wherever the total matched: the features are
  scattered in order, so a row took the next row's image. Refused now, naming the row.
- A batch made under `torch.inference_mode()` (scoring a reference there) crashed inside the host copy's bookkeeping
  ("Inference tensors do not track version counter"); it is scored as any other batch now.

The oracle is the model's own forward on each row alone (no padding): full float64 logits, labels shifted as
`labels[:, 1:]` against `logits[:, :-1]`, the DPO sequence score (sum of the targets' log-softmax) written out.
"""

import copy
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from tiny_setup import tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer.collator import TPOCollator  # noqa: E402
from tpo_fast.trainer.model import StepOptions, policy_loss, route_forward, sequence_reference_scores  # noqa: E402

X = -100
OBJECTIVES = ["tpo", "dpo", "povid"]
PADDED = dict(shared_prefix=False, padding_free=False)
EMPTY = ("pair 1's rejected response is empty (no label other than ignore_index after the first position); drop the "
         "record, or give it at least one response token")
ON_PADDING = "labels on padding positions (attention_mask 0); the collator masks padding with ignore_index"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_data(str(tmp_path_factory.mktemp("data")), num_images=4), tiny_processor()


def _batch(ds, proc):
    """Two pairs; pair 0's chosen response is 9 words longer than its rejected one, so rows 2 (and 1, 3) are padded."""
    items = [dict(ds[0], chosen="there is a yellow square on the left . the square is yellow .",
                  rejected="a blue circle ."), ds[1]]
    return TPOCollator(proc)(items)


def _left_padded(batch):
    """The batch with every row's padding moved to its front."""
    out = dict(batch)
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", X)):
        rows = []
        for r in range(batch[key].shape[0]):
            n = int(batch["attention_mask"][r].sum())
            rows.append(torch.cat([torch.full((batch[key].shape[1] - n,), fill, dtype=batch[key].dtype),
                                   batch[key][r, :n]]))
        out[key] = torch.stack(rows)
    return out


def _dpo_scores(model, batch):
    """(2B,) float64 DPO sequence scores, each row run alone (cut to its attention mask) with its pair's image."""
    model = copy.deepcopy(model).double()
    pairs = batch["image_index"].numel()
    scores = []
    with torch.no_grad():
        for r in range(2 * pairs):
            n = int(batch["attention_mask"][r].sum())
            ids, labels = batch["input_ids"][r, :n], batch["labels"][r, :n]
            pixels = batch["pixel_values"][int(batch["image_index"][r % pairs])].double()
            logits = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                           pixel_values=pixels[None]).logits[0]
            targets, keep = labels[1:], labels[1:] != X
            logp = logits[:-1][keep].log_softmax(-1).gather(1, targets[keep][:, None])
            scores.append(logp.sum())
    return torch.stack(scores)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("packed", [{}, PADDED, dict(shared_prefix=False, padding_free=True)],
                         ids=["packed", "padded", "padding-free-rows"])
def test_every_step_refuses_an_empty_response(setup, objective, packed):
    """Pair 1's rejected row without any label: the policy's step and the reference's scoring stop with the packed
    step's message whatever the packing (the padded step scored the row 0 and trained on the pair)."""
    ds, proc = setup
    batch = _batch(ds, proc)
    batch["labels"][3] = X
    opts = StepOptions(objective=objective, backend="torch", reference="model", **packed)
    model = tiny_model(proc)
    with pytest.raises(ValueError, match="^" + re.escape(EMPTY) + "$"):
        sequence_reference_scores(model, batch, opts)
    with pytest.raises(ValueError, match="^" + re.escape(EMPTY) + "$"):
        policy_loss(model, batch, opts, torch.zeros(3 * 2 if objective == "povid" else 2 * 2))


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_the_padded_step_refuses_labels_on_padding(setup, objective, left):
    """A label on row 2's padding (the shorter rejected row of pair 0; in the left-padded layout, on its first
    padding slot) makes a padding position a target: refused by the padded step as the packed step refuses it, in
    either padding layout. The batch without that label passes."""
    ds, proc = setup
    batch = _batch(ds, proc)
    if left:
        batch = _left_padded(batch)
    mask = batch["attention_mask"]
    assert int(mask[2].sum()) < mask.shape[1]  # row 2 has padding
    column = int(mask[2].sum()) if not left else 1  # right: its first padding slot; left: the second one
    opts = StepOptions(objective=objective, backend="torch", reference="model", **PADDED)
    model = tiny_model(proc)
    sequence_reference_scores(model, batch, opts)  # the batch itself is fine
    batch["labels"][2, column] = 7
    with pytest.raises(ValueError, match="^" + re.escape(ON_PADDING) + "$"):
        sequence_reference_scores(model, batch, opts)


@pytest.mark.parametrize("packed", [{}, PADDED], ids=["packed", "padded"])
def test_reference_scores_of_a_batch_made_under_inference_mode(setup, packed):
    """A batch built under `torch.inference_mode()` (tensors without a version counter) and scored there: the DPO
    reference scores are the oracle's, through the routed forward as through the function; the policy's loss is the
    one of the same batch outside inference mode (it crashed in the host copy's bookkeeping)."""
    ds, proc = setup
    batch = _batch(ds, proc)
    ref = tiny_model(proc, seed=1)
    opts = StepOptions(objective="dpo", backend="torch", reference="model", **packed)
    expected = _dpo_scores(ref, batch)
    route_forward(ref, opts)
    with torch.inference_mode():
        made = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        assert made["input_ids"].is_inference()
        scores = ref(tpo_batch=made, tpo_mode="reference")
        again = sequence_reference_scores(ref, made, opts)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(again, scores, rtol=0, atol=0)
    policy = tiny_model(proc)
    outside = policy_loss(policy, batch, opts, scores.clone())["loss"]
    with torch.inference_mode():
        inside = policy_loss(policy, made, opts, scores)["loss"]
    torch.testing.assert_close(inside.clone(), outside.detach(), rtol=1e-6, atol=1e-7)


def _moved_placeholders(batch, image):
    """The batch with pair 0's image placeholders written as a text token and pair 1's rows given 16 more (two
    images' worth): the same total of placeholders, 0 or 32 per row."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    width = ids.shape[1] + 16
    out = dict(batch, input_ids=torch.zeros(4, width, dtype=ids.dtype), labels=torch.full((4, width), X),
               attention_mask=torch.zeros(4, width, dtype=mask.dtype))
    for r in range(4):
        n = int(mask[r].sum())
        row, row_labels = ids[r, :n].clone(), labels[r, :n]
        if r % 2 == 0:
            row[row == image] = 10
        else:
            first = int((row == image).nonzero()[0])
            row = torch.cat([row[:first], torch.full((16,), image), row[first:]])
            row_labels = torch.cat([torch.full((16,), X), row_labels])
        out["input_ids"][r, : len(row)], out["labels"][r, : len(row)] = row, row_labels
        out["attention_mask"][r, : len(row)] = 1
    return out


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("packed", [{}, PADDED], ids=["packed", "padded"])
def test_rows_with_other_numbers_of_image_placeholders_are_refused(setup, objective, packed):
    """Rows with 0, 32, 0, 32 image placeholders (64 in all, as four rows of one 16-token image each): the features
    of pair 0's image went into pair 1's chosen row. Refused, naming the first such row; the batch as TPOCollator
    wrote it (16 in every row) is stepped."""
    ds, proc = setup
    batch = _batch(ds, proc)
    image = proc.tokenizer.convert_tokens_to_ids("<image>")
    moved = _moved_placeholders(batch, image)
    assert (moved["input_ids"] == image).sum(1).tolist() == [0, 32, 0, 32]
    assert (batch["input_ids"] == image).sum(1).tolist() == [16, 16, 16, 16]
    opts = StepOptions(objective=objective, backend="torch", reference="model", **packed)
    model = tiny_model(proc)
    sequence_reference_scores(model, batch, opts)
    message = (f"pair 0's chosen row holds 0 image placeholders (token id {image}), where each row holds its pair's "
               f"one image: 16 placeholders, as TPOCollator writes them")
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        sequence_reference_scores(model, moved, opts)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        policy_loss(model, moved, opts, torch.zeros(3 * 2 if objective == "povid" else 2 * 2))


def test_a_precomputed_reference_needs_the_collators_record_indices(setup, tmp_path, monkeypatch):
    """precompute_reference=True looks the reference scores up by each pair's record index: a collator whose batches
    carry no 'index' was stopped by a bare KeyError('index') after the first batch's reference pass; now the
    trainer says what the collator must return before any scoring runs."""
    from test_trainer import _args

    from tpo_fast.trainer.trainer import TPOTrainer

    ds, proc = setup
    collate = TPOCollator(proc)

    def without_index(items):
        batch = collate(items)
        del batch["index"]
        return batch

    scored = []
    real = TPOTrainer._reference_scorer

    def counted(self):
        score = real(self)
        return lambda batch: scored.append(1) or score(batch)

    monkeypatch.setattr(TPOTrainer, "_reference_scorer", counted)
    args = _args(tmp_path, precompute_reference=True, per_device_eval_batch_size=2)
    with pytest.raises(ValueError, match=re.escape(
            "precompute_reference=True looks each pair's reference scores up by its record's index, but this batch "
            "has no 'index' tensor (keys: ['attention_mask', 'corrupted_pixel_values', 'image_index', 'input_ids', "
            "'labels', 'pixel_values']); make the data collator return 'index' (B,)")):
        TPOTrainer(tiny_model(proc), args=args, train_dataset=ds, processing_class=proc, data_collator=without_index)
    assert scored == []
