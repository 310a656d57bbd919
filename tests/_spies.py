"""Recording stand-ins for the functions a module calls, to check which options reach the layer below."""

from __future__ import annotations

import inspect


def record_calls(monkeypatch, owner, names, calls: list) -> None:
    """Wrap each `owner.<name>` so that a call appends `(name, arguments)` to `calls` (the arguments by parameter
    name, defaults filled in) and then calls through to the original."""
    for name in names:
        fn = getattr(owner, name)
        monkeypatch.setattr(owner, name, _recorder(name, fn, inspect.signature(fn), calls))


def _recorder(name, fn, signature, calls):
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append((name, dict(bound.arguments)))
        return fn(*args, **kwargs)

    return wrapper
