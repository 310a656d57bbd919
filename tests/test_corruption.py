"""tpo_fast/trainer/corruption.py against oracles written from the official code's description (docs/math.md, "Image
corruption"): the 1000-step sigmoid schedule in float64, the float32 forward step of a raw image with `.byte()`'s
wrap, the accepted steps, image modes, and the per-image seed (the corrupted-image cache and every rank rely on
it being the same number in every process and release)."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from tpo_fast.trainer.corruption import add_diffusion_noise, diffusion_coefficients, example_seed


def _schedule_oracle(step: int) -> tuple[float, float]:
    """betas = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5, alpha-bar their running product of 1 - beta."""
    t = np.linspace(-6.0, 6.0, 1000)
    betas = 1.0 / (1.0 + np.exp(-t)) * (5e-3 - 1e-5) + 1e-5
    abar = np.prod(1.0 - betas[: step + 1])
    return float(np.sqrt(abar)), float(np.sqrt(1.0 - abar))


@pytest.mark.parametrize("step", [0, 1, 250, 500, 999])
def test_diffusion_coefficients_are_the_float64_sigmoid_schedule(step):
    a, b = diffusion_coefficients(step)
    want_a, want_b = _schedule_oracle(step)
    assert a == pytest.approx(want_a, rel=1e-12, abs=1e-15) and b == pytest.approx(want_b, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("step", [-1, 1000])
def test_steps_outside_the_schedule_are_refused(step):
    with pytest.raises(ValueError, match=rf"^noise step must be in \[0, 999\], got {step}$"):
        diffusion_coefficients(step)
    with pytest.raises(ValueError, match=rf"^noise step must be in \[0, 999\], got {step}$"):
        add_diffusion_noise(Image.new("RGB", (2, 2)), step, seed=0)


def test_the_noisy_image_is_the_float32_forward_step_wrapped_like_byte():
    """On a 256 x 256 image (some 200k values, enough that float64 arithmetic in place of the official float32
    truncates some of them to another integer), every pixel equals the float32 oracle; the default step is 500."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    a, b = _schedule_oracle(500)
    x0 = pixels.astype(np.float32) / np.float32(255)
    eps = torch.randn((256, 256, 3), generator=torch.Generator().manual_seed(11), dtype=torch.float32).numpy()
    x = (np.float32(a) * x0 + np.float32(b) * eps) * np.float32(255)
    assert x.dtype == np.float32
    want = np.remainder(np.trunc(x).astype(np.int64), 256).astype(np.uint8)
    got = add_diffusion_noise(image, seed=11)
    assert got.mode == "RGB" and got.size == (256, 256)
    np.testing.assert_array_equal(np.asarray(got), want)
    x64 = (a * pixels.astype(np.float64) / 255 + b * eps.astype(np.float64)) * 255
    assert (np.trunc(x64) != np.trunc(x)).any(), "float64 gives the same pixels here: the check tests nothing"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_any_image_mode_is_corrupted_as_its_rgb_conversion(mode):
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    got = add_diffusion_noise(image, 300, seed=4)
    assert got.mode == "RGB" and got.size == (5, 6)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(add_diffusion_noise(image.convert("RGB"), 300, seed=4)))


def test_example_seed_is_the_63_bit_little_endian_blake2b_of_seed_and_key():
    for seed, key in [(0, "a.png"), (3, "red.png"), (12345, "sub/dir/image 1.jpg")]:
        digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
        assert example_seed(seed, key) == int.from_bytes(digest, "little") % 2**63
    assert example_seed(0, "a.png") == 2270807864399832634  # fixed across processes and releases
    seeds = [example_seed(0, f"{i}.png") for i in range(256)]
    assert max(seeds) < 2**63 and max(seeds) >= 2**62  # 63 bits used, not more


def test_an_unknown_overflow_mode_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^overflow must be one of \('wrap', 'clamp'\), got 'saturate'$"):
        add_diffusion_noise(Image.new("RGB", (2, 2)), seed=0, overflow="saturate")
