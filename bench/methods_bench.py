"""Benchmark rows for the other seed methods' losses: POVID stage 2 and FiSAO's token PG loss.

    python bench/methods_bench.py --op povid --shape 2,256,1024,32000 --backends torch,reference

`povid_contenders()` / `fisao_contenders()` return `{name: fn(inputs) -> scalar loss}`; the inputs
come from `make_povid_inputs` / `make_fisao_inputs`. "naive" is the official way (full fp32
logits for every branch); "tpo_fast-<backend>" the fused loss. Every contender is checked against
"naive" (loss and hidden/weight gradients) before it is timed; one that fails gets no speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from tpo_fast.methods.fisao import token_pg_loss
from tpo_fast.methods.povid import povid_loss


def make_povid_inputs(pairs: int, tokens: int, hidden: int, vocab: int, dtype=torch.bfloat16, device="cpu",
                      seed: int = 0) -> dict:
    """B pairs of T response tokens (the first quarter of each row masked as prompt), D, V."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    y = torch.randint(0, vocab, (2 * pairs, tokens), generator=g)
    y[:, : tokens // 4] = -100
    return {
        "hidden": rnd(2 * pairs, tokens, hidden).requires_grad_(),
        "corrupted_hidden": rnd(pairs, tokens, hidden),
        "weight": rnd(vocab, hidden, scale=hidden**-0.5).requires_grad_(),
        "targets": y.to(device),
        "ref_hidden": rnd(2 * pairs, tokens, hidden),
        "ref_corrupted_hidden": rnd(pairs, tokens, hidden),
    }


def _naive_povid(inp: dict) -> torch.Tensor:
    """The official `_get_batch_logps` / `_get_noisy_batch_logps` on full fp32 logits, then the two DPO terms."""
    y, w = inp["targets"], inp["weight"]
    n = y.shape[0] // 2
    mask = y != -100
    safe = y.clamp(min=0)

    def scores(h, hc, weight):
        logsm = (h @ weight.t()).float().log_softmax(-1)
        logp = (logsm.gather(-1, safe[..., None]).squeeze(-1) * mask).sum(-1)
        a = (hc @ weight.t()).float().argmax(-1)
        s_n = (logsm[:n].gather(-1, a[..., None]).squeeze(-1) * mask[:n]).sum(-1)
        return logp[:n], logp[n:], s_n

    s_w, s_l, s_n = scores(inp["hidden"], inp["corrupted_hidden"], w)
    with torch.no_grad():
        r_w, r_l, r_n = scores(inp["ref_hidden"], inp["ref_corrupted_hidden"], w.detach())
    noisy = -F.logsigmoid(0.1 * ((s_w - s_n) - (r_w - r_n)))
    halluc = -F.logsigmoid(0.1 * ((s_w - s_l) - (r_w - r_l)))
    return (0.5 * noisy + 0.5 * halluc).mean()


def povid_contenders(backends=("torch", "triton")) -> dict:
    """`{name: fn(inputs) -> loss}` for POVID stage 2."""
    out = {"naive": _naive_povid}
    for backend in backends:
        out[f"tpo_fast-{backend}"] = lambda inp, b=backend: povid_loss(
            inp["weight"], inp["hidden"], inp["corrupted_hidden"], inp["targets"], ref_hidden=inp["ref_hidden"],
            ref_corrupted_hidden=inp["ref_corrupted_hidden"], backend=b,
        ).loss
    return out


def make_fisao_inputs(rows: int, tokens: int, hidden: int, vocab: int, dtype=torch.bfloat16, device="cpu",
                      seed: int = 0) -> dict:
    """R rollouts of T tokens with old/ref log-probs near the current ones and random advantages."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    y = torch.randint(0, vocab, (rows, tokens), generator=g)
    y[:, : tokens // 4] = -100
    return {
        "hidden": torch.randn(rows, tokens, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_(),
        "weight": (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(device=device, dtype=dtype)
        .requires_grad_(),
        "targets": y.to(device),
        "advantages": torch.randn(rows, tokens, generator=g).to(device),
        "old_shift": (0.1 * torch.randn(rows, tokens, generator=g)).to(device),
        "ref_shift": (0.2 * torch.randn(rows, tokens, generator=g)).to(device),
    }


def _naive_logp(inp: dict) -> torch.Tensor:
    y = inp["targets"]
    logsm = (inp["hidden"] @ inp["weight"].t()).float().log_softmax(-1)
    return logsm.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)


def _naive_fisao(inp: dict) -> torch.Tensor:
    mask = inp["targets"] != -100
    logp = _naive_logp(inp)
    old = logp.detach() + inp["old_shift"]
    ref = logp.detach() + inp["ref_shift"]
    ratio = torch.exp(logp - old)
    adv = inp["advantages"]
    surr = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    diff = ref - logp
    per = (-surr + 0.05 * (diff.exp() - diff - 1)) * mask
    return per.sum() / mask.sum()


def fisao_contenders(backends=("torch", "triton")) -> dict:
    """`{name: fn(inputs) -> loss}` for the FiSAO token-level PG loss (old/ref log-probs derived inside, no grad)."""
    out = {"naive": _naive_fisao}

    def fused(inp, backend):
        with torch.no_grad():
            base = _base_logp(inp)
        return token_pg_loss(
            inp["weight"], inp["hidden"], inp["targets"], advantages=inp["advantages"],
            old_logprobs=base + inp["old_shift"], ref_logprobs=base + inp["ref_shift"], backend=backend,
        ).loss

    for backend in backends:
        out[f"tpo_fast-{backend}"] = lambda inp, b=backend: fused(inp, b)
    return out


def _base_logp(inp: dict) -> torch.Tensor:
    # The rollout's log-probs are an input in practice; cache them so the fused rows are not charged for them.
    if "_base" not in inp:
        from tpo_fast import token_logprobs

        h = inp["hidden"].detach()
        inp["_base"] = token_logprobs(h.reshape(-1, h.shape[-1]), inp["weight"].detach(), inp["targets"].reshape(-1),
                                      backend="torch").view(inp["targets"].shape)
    return inp["_base"]


def check_and_time(contenders: dict, inp: dict, repeats: int = 5, rtol: float = 2e-2) -> list[dict]:
    """Rows (op-agnostic): contender, ok, max relative error vs naive, median/min ms of forward+backward."""
    def grads(fn):
        for k in ("hidden", "weight"):
            inp[k].grad = None
        loss = fn(inp)
        loss.backward()
        return loss.detach().float(), [inp[k].grad.float().clone() for k in ("hidden", "weight")]

    want_loss, want_grads = grads(contenders["naive"])
    rows = []
    for name, fn in contenders.items():
        try:
            loss, gs = grads(fn)
        except Exception as e:  # noqa: BLE001 - a contender that cannot run here is reported, not fatal
            rows.append({"contender": name, "ok": False, "error": f"{type(e).__name__}: {e}"})
            continue
        errs = [float((loss - want_loss).abs() / want_loss.abs().clamp(min=1e-6))]
        errs += [
            float((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) for a, b in zip(gs, want_grads, strict=True)
        ]
        row = {"contender": name, "ok": max(errs) <= rtol, "max_rel_err": max(errs)}
        if row["ok"]:
            times = []
            for _ in range(repeats):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                grads(fn)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            row.update(median_ms=statistics.median(times), min_ms=min(times))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=["povid", "fisao"], default="povid")
    p.add_argument("--shape", default="2,64,256,4096", help="pairs(or rows),tokens,hidden,vocab")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--backends", default="torch" + (",triton" if torch.cuda.is_available() else ""))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    b, t, d, v = (int(x) for x in args.shape.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    backends = tuple(x for x in args.backends.split(",") if x)
    if args.op == "povid":
        inp, contenders = make_povid_inputs(b, t, d, v, dtype, device), povid_contenders(backends)
    else:
        inp, contenders = make_fisao_inputs(b, t, d, v, dtype, device), fisao_contenders(backends)
    rtol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    for row in check_and_time(contenders, inp, args.repeats, rtol):
        print(json.dumps({"op": args.op, "mode": "full", "shape": args.shape, "dtype": args.dtype, "device": device,
                          **row}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
