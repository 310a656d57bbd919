"""The oldest transformers the trainer is tested with, checked when `TPOConfig` is imported and when a step first
meets its model (`unwrap_llava`).

The step re-implements part of `LlavaModel.forward` on transformers 5's API (`get_image_features(...,
return_dict=True).pooler_output`, `get_placeholder_mask`); on an older release it would fail deep inside a step.
`make test-compat` runs the model-level tests under exactly this version (scripts/test_transformers_compat.sh), and
pyproject.toml declares it as the floor; tests/test_packaging.py keeps the three equal.
"""

from __future__ import annotations

MIN_TRANSFORMERS = "5.17.0"
_checked: list[str] = []  # the version already found good


def require_transformers(found: str | None = None) -> None:
    """Raise ImportError, saying what to install, when transformers (or `found`, a version string) is older than
    `MIN_TRANSFORMERS`."""
    if found is None:
        import transformers

        found = transformers.__version__
        if found in _checked:
            return
    from packaging.version import Version

    if Version(Version(found).base_version) < Version(MIN_TRANSFORMERS):  # 5.17.0.dev0 and 5.17 count as 5.17.0
        raise ImportError(
            f"tpo_fast's trainer needs transformers >= {MIN_TRANSFORMERS} (the oldest release it is tested with), "
            f"found {found}; run: pip install -U 'transformers>={MIN_TRANSFORMERS}'. The losses (tpo_fast.loss) "
            f"do not need transformers."
        )
    _checked.append(found)
