"""`TPOLoss`, `DPOLoss`, `POVIDLoss` (tpo_fast/loss/modules.py): every option the module holds reaches its
functional loss, the defaults are the functional's, bad options fail at construction, and `repr` lists them.

The functional losses are checked against oracles elsewhere (tests/test_loss.py, tests/test_gaps_*_loss.py);
here a recording stand-in for the functional shows what the module passes on.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from tpo_fast.loss import DPOLoss, POVIDLoss, TPOLoss, dpo_loss, modules, povid_loss, tpo_loss

# module, functional, non-default value of every option
CASES = {
    "tpo": (TPOLoss, tpo_loss, dict(beta=0.3, weighting="none", offset=0.25, detach_weights=True, loss_type="ipo",
                                    label_smoothing=0.0, reference_free=True, average_log_prob=True, ignore_index=-1,
                                    backend="reference", grad_mode="recompute")),
    "dpo": (DPOLoss, dpo_loss, dict(beta=0.3, loss_type="hinge", label_smoothing=0.0, reference_free=True,
                                    average_log_prob=True, ignore_index=-1, backend="reference",
                                    grad_mode="recompute")),
    "povid": (POVIDLoss, povid_loss, dict(beta=0.3, noise_weight=0.2, loss_type="ipo", label_smoothing=0.0,
                                          reference_free=True, average_log_prob=True, ignore_index=-1,
                                          backend="reference", grad_mode="recompute")),
}


def _options(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.kind is p.KEYWORD_ONLY and not k.startswith("ref_")}


def _record(monkeypatch, name):
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return "out"

    monkeypatch.setattr(modules, name, fake)
    return seen


def _call(module, name):
    w, h, y = torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(2, 2, dtype=torch.long)
    if name == "dpo":
        return module(w, h, y, None, ref_seq_scores=torch.zeros(2))
    return module(w, h, h, y, None, ref_seq_scores=torch.zeros(2))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("given", ["defaults", "every-option", "smoothing"])
def test_every_option_reaches_the_functional(monkeypatch, name, given):
    """Defaults, then every option off its default (loss_type needs label_smoothing 0, so smoothing is apart)."""
    cls, fn, values = CASES[name]
    defaults = _options(fn)
    assert set(values) == set(defaults)  # the table covers every option of the functional
    if given == "smoothing":
        values = {**values, "loss_type": "sigmoid", "label_smoothing": 0.2}
    module = cls(**values) if given != "defaults" else cls()
    seen = _record(monkeypatch, fn.__name__)
    assert _call(module, name) == "out"
    want = values if given != "defaults" else defaults
    assert {k: seen.get(k, "<missing>") for k in want} == want
    assert seen["ref_seq_scores"].shape == (2,)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("bad, match", [
    (dict(label_smoothing=0.7), "label_smoothing"), (dict(loss_type="nope"), "loss_type"),
    (dict(backend="nope"), "backend"), (dict(grad_mode="nope"), "grad_mode"), (dict(ignore_index="x"), "ignore_index"),
])
def test_bad_options_fail_at_construction(name, bad, match):
    cls = CASES[name][0]
    with pytest.raises((ValueError, TypeError), match=match):
        cls(**bad)


def test_povid_noise_weight_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"^noise_weight must lie in \[0, 1\]"):
        POVIDLoss(noise_weight=1.5)


def test_repr_lists_the_options():
    assert repr(POVIDLoss(beta=0.3)) == (
        "POVIDLoss(beta=0.3, noise_weight=0.5, loss_type='sigmoid', label_smoothing=0.0, reference_free=False, "
        "average_log_prob=False, ignore_index=-100, backend='auto', grad_mode='auto')"
    )
    for cls in (TPOLoss, DPOLoss):
        text = repr(cls(beta=0.3))
        assert "beta=0.3" in text and "backend='auto'" in text and "grad_mode='auto'" in text, text
