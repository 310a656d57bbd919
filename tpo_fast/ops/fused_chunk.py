"""Per-chunk cores of the fused-gradient pair losses, one per backend (`fused_pairs.py` drives them).

A core sees the compacted rows of one chunk of whole pairs. `stats` computes the chunk's logits once
and keeps them; `logit_grad` overwrites them with `dZ = coef_p * softmax + coef_y * onehot(y)
[+ coef_y2 * onehot(y2)]`; `backprop` finishes `dH = dZ W`, `dW += dZ^T H` and `db += sum dZ`.
The corrupted branch only ever needs the gathered logit `h~ . W[y]` and its rank-1 gradient.

With `split_target` (a 16-bit weight whose gradient also takes the corrupted rows) `logit_grad` keeps each row's
target entry of dZ out of the buffer, in fp32, and it is added as a rank-1 term: `dH += tgt W[y]` in `backprop`,
`dW[y] += tgt h` there too (TorchChunk, whose dW is fp32) or with the corrupted rows in `gather_backward`
(TritonChunk, whose dW is in the weight's dtype). The clean target term and the corrupted one `g~ h~` nearly
cancel where the two images' hidden states are close: in a 16-bit dZ or dW the larger term's rounding error would
outlive the cancellation (16% of the weight gradient's norm in a case built for it), so they meet in fp32 first.

- `TorchChunk`: fp32 math in plain PyTorch (any device, any GEMM library), like `torch_chunked.py`,
  whose bf16 GEMMs with bf16 inputs on a GPU or a CPU with bf16 units it shares (`torch_chunked._logits` for
  the logits, `torch_chunked.gradient_gemms` for dH and dW).
- `TritonChunk`: the GEMM-shaped Triton forward stores each logits tile's `exp(z - tile max)` in the
  weight's dtype while it reduces the logsumexp and picks out the target logits (no second pass over the
  logits; a bf16 buffer is half the bytes of fp32 logits), a Triton kernel writes dZ in place over it, and
  the two gradient GEMMs run on cuBLAS. dW accumulates in the weight's dtype with fp32 products
  and one rounding per chunk (fp32 weights: fp32 throughout), so no V x D fp32 buffer exists.
"""

from __future__ import annotations

import torch

from tpo_fast.ops import torch_chunked


def _safe(y2: torch.Tensor) -> torch.Tensor:
    # second targets are -1 where a row has none (its coefficient is then 0)
    return y2.clamp(min=0)


class TorchChunk:
    """fp32 chunk core in plain PyTorch; gradient buffers are fp32 and cast once by the caller."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, need_w: bool, need_b: bool) -> None:
        self.weight = weight
        self._w32: torch.Tensor | None = None  # the weight's fp32 copy, made when a GEMM first needs it
        self.b32 = None if bias is None else bias.float()
        self.need_w = need_w
        self.gw: torch.Tensor | None = None  # written by the first chunk's GEMM (even of 0 rows): no zero fill
        self.gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        self._buf: torch.Tensor | None = None
        self._sumexp: torch.Tensor | None = None
        self._tgt: tuple[torch.Tensor, torch.Tensor] | None = None  # (y, fp32 target entries of dZ): split_target

    def _gemm_args(self, h: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
        """(bf16, w32) for the GEMMs of the rows `h`: whether they run on bf16 operands, and the weight's fp32
        copy where they take it (None for the bf16 GEMMs on CUDA, which take the bf16 weight)."""
        bf16 = torch_chunked.uses_bf16_gemms(h, self.weight.dtype)
        if not torch_chunked.needs_fp32_weight(h, bf16):
            return bf16, None
        if self._w32 is None:
            self._w32 = self.weight.float()
        return bf16, self._w32

    def stats(
        self, h: torch.Tensor, y: torch.Tensor, y2: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """fp32 (lse, z[y], z[y2] | None) of the rows; keeps exp(z - max) for `logit_grad`."""
        bf16, w32 = self._gemm_args(h)
        logits = torch_chunked._logits(h, self.weight, self.b32, bf16, w32)  # [R, V] fp32, the chunk's one buffer
        z = logits.gather(1, y[:, None]).squeeze(1)
        z2 = None if y2 is None else logits.gather(1, _safe(y2)[:, None]).squeeze(1)
        m = logits.amax(dim=-1, keepdim=True)
        m.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # a non-finite row max shifts by 0
        self._buf = logits.sub_(m).exp_()  # in place: exp(z - max)
        self._sumexp = self._buf.sum(-1)
        return self._sumexp.log() + m.squeeze(1), z, z2

    def logit_grad(self, coef_p, y, coef_y, y2, coef_y2, split_target: bool = False) -> torch.Tensor:
        dz = self._buf.mul_((coef_p / self._sumexp)[:, None])  # coef_p * softmax, in place
        dz.scatter_add_(1, y[:, None], coef_y[:, None])
        if y2 is not None:
            dz.scatter_add_(1, _safe(y2)[:, None], coef_y2[:, None])
        if split_target:  # the target entries leave the buffer, which the bf16 GEMMs may round
            self._tgt = (y, dz.gather(1, y[:, None]).squeeze(1))
            dz.scatter_(1, y[:, None], 0.0)
        return dz

    def backprop(self, dz: torch.Tensor, h: torch.Tensor, need_h: bool, out: torch.Tensor | None = None):
        """fp32 dH of the rows (None unless need_h), into `out` when given; accumulates dW and db. With bf16
        inputs on a GPU or a CPU with bf16 units the GEMMs consume `dz` (`torch_chunked.gradient_gemms`)."""
        if self.gb is not None:
            self.gb += dz.sum(0)
        bf16, w32 = self._gemm_args(h)
        self.gw, dh = torch_chunked.gradient_gemms(dz, h, self.weight, w32, bf16, self.gw, self.need_w, need_h, out)
        split, self._tgt = self._tgt, None
        if split is not None:  # the target entries, rank-1 (fp32 gw: added in any order)
            y, tgt = split
            if self.gb is not None:
                self.gb.index_add_(0, y, tgt)
            if self.need_w:
                self.gw.index_add_(0, y, tgt[:, None] * h.float())
            if dh is not None:
                dh.addcmul_(tgt[:, None], self.weight[y])
        return dh

    def gather(self, hc: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch_chunked.gather_logits(hc, self.weight, self.b32, y)

    def forward_stats(self, h, hc, y):
        """fp32 (lse, z[y], z~[y] | None) without a gradient or a kept buffer (a reference branch)."""
        return torch_chunked.forward(h, self.weight, self.b32, hc, y, False, self._gemm_args(h)[1])[:3]

    def gather_backward(self, hc, y, g, need_hc: bool, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """fp32 dH~ = g W[y] of the corrupted rows (None unless need_hc), into `out` when given; dW[y] += g h~."""
        if self.need_w:
            if self.gw is None:
                self.gw = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
            self.gw.index_add_(0, y, g[:, None] * hc.float())
        if self.gb is not None:
            self.gb.index_add_(0, y, g)
        # 16-bit rows widen inside the product (exact), one kernel into fp32
        return torch.mul(self.weight[y], g[:, None], out=out) if need_hc else None

    def release(self) -> None:
        self._buf = self._sumexp = None


class TritonChunk:
    """Triton forward and dZ kernels, cuBLAS gradient GEMMs; dW in the weight's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, need_w: bool, need_b: bool) -> None:
        self.weight, self.bias = weight, bias
        self.need_w = need_w
        self.gw: torch.Tensor | None = None  # allocated by the first chunk's GEMM
        self.gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        self._stored = None  # triton_fused.StoredChunk of the chunk in flight
        self._tgt: tuple[torch.Tensor, torch.Tensor] | None = None  # (y, fp32 target entries of dZ): split_target
        # (y, tgt, h) of the clean rows' target terms, which `gather_backward` adds to dW with the corrupted rows
        self._rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def stats(self, h, y, y2):
        from tpo_fast.ops import triton_fused

        self._stored = triton_fused.exp_tiles_and_lse(h, self.weight, self.bias, y, y2)
        return self._stored.lse, self._stored.z, self._stored.z2

    def logit_grad(self, coef_p, y, coef_y, y2, coef_y2, split_target: bool = False) -> torch.Tensor:
        from tpo_fast.ops import triton_fused, triton_impl

        if split_target:
            on_y = coef_y if y2 is None else coef_y + torch.where(y2 == y, coef_y2, 0.0)  # a second target on y
            self._tgt = (y, triton_impl.target_entries(self._stored.z, self._stored.lse, coef_p, on_y))
        return triton_fused.softmax_grad_inplace(self._stored, coef_p, y, coef_y, y2, coef_y2, split_target)

    def backprop(self, dz: torch.Tensor, h: torch.Tensor, need_h: bool, out: torch.Tensor | None = None):
        from tpo_fast.ops import triton_fused, triton_impl

        if self.need_w:
            self.gw = triton_fused.accumulate_dw(self.gw, dz, h, self.weight)
        if self.gb is not None:
            self.gb += dz.sum(0, dtype=torch.float32)
        dh = triton_fused.mm_f32(dz, self.weight, out) if need_h else None
        split, self._tgt = self._tgt, None
        if split is not None:  # the target entries, rank-1: dH and db now, dW with the corrupted rows
            y, tgt = split
            if self.gb is not None:
                self.gb.index_add_(0, y, tgt)
            if dh is not None and y.numel():
                with triton_impl._device_guard(h):
                    triton_impl._launch_indexed_bwd(h, None, self.weight, y, tgt, None, dh, None, None, None, True)
            self._rows = (y, tgt, h)
        return dh

    def gather(self, hc: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from tpo_fast.ops import triton_impl

        return triton_impl.gather_logits(hc, self.weight, self.bias, y)

    def forward_stats(self, h, hc, y):
        """fp32 (lse, z[y], z~[y] | None) without a gradient or a kept buffer (a reference branch): the
        per-token primitive's forward kernel, which reduces the logits tile by tile and stores none."""
        from tpo_fast.ops import triton_impl

        return triton_impl.forward(h, self.weight, self.bias, hc, y, False)[:3]

    def gather_backward(self, hc, y, g, need_hc, out=None):
        from tpo_fast.ops import triton_fused

        rows, self._rows = self._rows, None  # set by a split_target `backprop` of the same rows
        if self.need_w:
            self.gw = triton_fused.scatter_dw(self.gw, y, g, hc, self.weight, rows[1:] if rows is not None else None)
        if self.gb is not None:
            self.gb.index_add_(0, y, g)
        # the 16-bit rows widen inside the product (exact), one kernel into fp32
        return torch.mul(self.weight[y], g[:, None], out=out) if need_hc else None

    def release(self) -> None:
        self._stored = None


def make_core(backend: str, weight, bias, need_w: bool, need_b: bool):
    cls = TritonChunk if backend == "triton" else TorchChunk
    return cls(weight, bias, need_w, need_b)
