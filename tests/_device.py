"""Where a backend's test inputs live: Triton compiles only for CUDA tensors.

On a CPU machine everything stays on the CPU (Triton runs under its interpreter, see conftest.py)
and `moved` returns its arguments unchanged; on a CUDA machine the `triton` cases move their
inputs to the GPU so that the compiled kernels are what gets tested.
"""

from __future__ import annotations

import torch


def backend_device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def moved(device: torch.device, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors on `device`, as fresh leaves that require grad where the originals did."""
    out = []
    for t in tensors:
        if t is None or t.device == device:
            out.append(t)
            continue
        m = t.detach().to(device)
        out.append(m.requires_grad_() if t.requires_grad else m)
    return out
