"""How the token primitives meet `torch.compile`: their entry points run eagerly inside a compiled region.

The primitives compact rows by a data-dependent count, choose chunks on the host and launch Triton, C++ or
chunked PyTorch work whose shapes follow the batch's mask; traced by TorchDynamo, each new mask would be a new
graph (or, on the Triton backend, a failed trace). So a compiled function that calls one of them breaks its
graph at the call, runs the primitive as written (the same kernels, the same numbers as without compile) and
resumes compiling after it. Outside a compiled region the entry point is the plain function (one flag read), and
importing tpo_fast does not import TorchDynamo. `torch.compile(..., fullgraph=True)` therefore refuses a function that
calls a primitive, at the line below that makes the break.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def eager_under_compile(fn: F) -> F:
    """`fn` as a graph break when TorchDynamo traces it (`torch.compiler.disable`, made on that path only, where
    Dynamo is already loaded), and `fn` itself otherwise."""

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)  # a graph break by design (see above)
        return fn(*args, **kwargs)

    return entry  # type: ignore[return-value]
