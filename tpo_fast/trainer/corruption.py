"""Image corruption for TPO's corrupted branch (docs/math.md, "Image corruption").

The official code (alibaba/TPO, `add_diffusion_noise`) takes the raw image as floats in [0, 1] at
its original resolution, applies the forward diffusion step `t` of a 1000-step sigmoid schedule and
converts back with `mul(255).byte()` and no clamp, so out-of-range values wrap modulo 256.
"""

from __future__ import annotations

import hashlib
import numbers

import numpy as np
import torch
from PIL import Image

OVERFLOW_MODES = ("wrap", "clamp")
NUM_DIFFUSION_STEPS = 1000
# the seeds `torch.Generator.manual_seed` takes: a signed or an unsigned 64-bit integer
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


def is_int(value: object) -> bool:
    """An integer (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def diffusion_coefficients(step: int) -> tuple[float, float]:
    """`(sqrt(abar[step]), sqrt(1 - abar[step]))` of the official sigmoid schedule (0-based step)."""
    if not is_int(step):
        raise ValueError(f"noise step must be an int in [0, {NUM_DIFFUSION_STEPS - 1}], got {step!r}")
    step = int(step)
    if not 0 <= step < NUM_DIFFUSION_STEPS:
        raise ValueError(f"noise step must be in [0, {NUM_DIFFUSION_STEPS - 1}], got {step}")
    betas = torch.sigmoid(torch.linspace(-6, 6, NUM_DIFFUSION_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)[step]
    return float(abar.sqrt()), float((1 - abar).sqrt())


def example_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one image from the run seed and a stable key (its relative path).

    Python's `hash` is salted per process, so a digest keeps reruns and ranks in agreement.
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def add_diffusion_noise(
    image: Image.Image,
    step: int = 500,
    *,
    seed: int | None = None,
    overflow: str = "wrap",
) -> Image.Image:
    """Return the image after `step` forward-diffusion steps, as an RGB PIL image of the same size.

    Args:
        image: the raw image (any PIL mode; converted to RGB), at its original resolution.
        step: 0-based diffusion step; 500 (the paper's) gives `x = 0.86302 x0 + 0.50517 eps`.
        seed: an int (Python's or NumPy's, in [-2**63, 2**64 - 1]) that seeds the Gaussian noise so a rerun
            reproduces it; None draws fresh noise (the official behaviour, which makes a cached reference inexact).
        overflow: "wrap" (official: `mul(255).byte()` wraps modulo 256) or "clamp" to [0, 255].
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image (e.g. Image.open(path)), got {type(image).__name__}")
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    if seed is not None and not (is_int(seed) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise ValueError(f"seed must be an int in [-2**63, 2**64 - 1], or None for fresh noise, got {seed!r}")
    a, b = diffusion_coefficients(step)
    x0 = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)  # [H, W, 3]
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    x = (a * x0 + b * eps) * 255.0
    if overflow == "clamp":
        x = x.clamp(0, 255)
    # torch's float->uint8 cast is undefined for out-of-range values; go through int64 and wrap
    # explicitly, which is what `.byte()` does on the official CPU/CUDA builds (truncation toward 0).
    pixels = torch.remainder(x.to(torch.int64), 256).to(torch.uint8)
    return Image.fromarray(pixels.numpy())
