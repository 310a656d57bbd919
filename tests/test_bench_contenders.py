"""The benchmark's tpo_fast contenders (bench/_contenders/ours.py): what each one calls, with which settings, and
why it does not run where it cannot. The guard checks their outputs (tests/test_bench_smoke.py); these tests
check that each row times the path its name says, not another one that gives the same numbers."""

from __future__ import annotations

import importlib

import pytest
import torch
from _bench import bench_modules

from tpo_fast.ops.options import current_options


@pytest.fixture(scope="module")
def mods():
    contenders, ours, workloads = bench_modules("_contenders", "_contenders.ours", "_workloads")
    return contenders, ours, workloads


# What each workload's public function must be given by the bench, beyond its tensors: the settings the
# oracle (bench/_workloads) computes with, spelled out, so that a change of a library default cannot make
# the contender and the oracle disagree, or agree on something else than the case says.
_SETTINGS = {
    "primitive": {},
    "logits": {},
    "tpo": {"beta": 0.1},
    "dpo": {"beta": 0.1},
    "povid": {"beta": 0.1, "noise_weight": 0.5},
    "fisao": {"clip_eps": 0.2, "kl_coef": 0.05, "kl_estimator": "k3", "aggregation": "token_mean"},
}
_ENTRIES = {  # workload: (module, function)
    "primitive": ("tpo_fast", "token_logprobs"),
    "logits": ("tpo_fast", "logits_logprobs"),
    "tpo": ("tpo_fast.loss", "tpo_loss"),
    "dpo": ("tpo_fast.loss", "dpo_loss"),
    "povid": ("tpo_fast.loss", "povid_loss"),
    "fisao": ("tpo_fast.loss", "token_pg_loss"),
}


class _Stop(Exception):
    """Raised by a spy once it has recorded a call: the call's arguments are all a test needs."""


@pytest.mark.parametrize("name", ["tpo_fast-torch", "tpo_fast-torch-fused", "tpo_fast-torch-recompute",
                                  "tpo_fast-triton-fused", "tpo_fast-triton-fused-tgemm", "tpo_fast-cpp"])
def test_each_tpo_fast_contender_calls_its_public_function_with_its_backend_path_and_the_cases_settings(
        mods, monkeypatch, name):
    """Every workload a tpo_fast contender runs calls the public function it names, with the contender's backend,
    its `grad_mode` (none for the plain contender: the loss's default), the bench's loss settings, and, for the
    `-tgemm` / `-fused` triton contenders, the gradient GEMMs pinned inside the call."""
    contenders, _, workloads = mods
    c = contenders.all_contenders(("triton", "cpp", "torch"))[name]
    calls = []  # the raw keywords (not tests/_spies.record_calls' arguments with defaults filled in): a setting
    # the contender leaves to the library's default must show as missing
    for workload, (module, fn_name) in _ENTRIES.items():
        home = importlib.import_module(module)

        def spy(*args, _w=workload, **kwargs):
            calls.append((_w, kwargs, current_options().grad_gemm))
            raise _Stop

        monkeypatch.setattr(home, fn_name, spy)
    c.setup("cpu")
    expected_gemm = c.grad_gemm or current_options().grad_gemm
    assert set(c.workloads) == set(c._fn)
    for workload in c.workloads:
        inp = workloads.make_inputs(workloads.CASES["cpu-tiny"], workload, "cpu", torch.float32, 0)
        with pytest.raises(_Stop):
            c.run(workload, inp)
        w, kwargs, gemm = calls.pop()
        assert w == workload
        tensors = {k for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        settings = {k: v for k, v in kwargs.items() if k not in tensors}
        mode = {"grad_mode": c.grad_mode} if c.grad_mode else {}
        assert settings == {**_SETTINGS[workload], "backend": c.backend, **mode}, (name, workload)
        assert gemm == expected_gemm
    if c.backend == "cpp":
        assert list(c.workloads) == ["logits"]
    elif c.grad_mode:
        assert sorted(c.workloads) == ["dpo", "povid", "tpo"]
    else:
        assert sorted(c.workloads) == ["dpo", "fisao", "logits", "povid", "primitive", "tpo"]


def test_what_each_contender_runs_and_why_not_is_written_per_workload(mods):
    """The notes a report prints under each table: the call a row times (its backend, its path, the loss's
    default path where the contender leaves it to the loss), and why a workload does not apply."""
    contenders, _, _ = mods
    known = contenders.all_contenders(("triton", "cpp", "torch"))
    plain = known["tpo_fast-torch"]
    assert plain.workloads == {
        "primitive": "tpo_fast.token_logprobs(backend='torch')",
        "tpo": "tpo_fast.loss.tpo_loss(backend='torch'), default grad_mode='auto'",
        "dpo": "tpo_fast.loss.dpo_loss(backend='torch'), default grad_mode='auto'",
        "povid": "tpo_fast.loss.povid_loss(backend='torch'), default grad_mode='auto'",
        "fisao": "tpo_fast.loss.token_pg_loss(backend='torch')",
        "logits": "tpo_fast.logits_logprobs(backend='torch')",
    }
    assert plain.not_applicable == {}
    assert plain.labels == {w: "tpo_fast [torch] auto" for w in ("tpo", "dpo", "povid")}
    recompute = known["tpo_fast-torch-recompute"]
    assert recompute.workloads["dpo"] == "tpo_fast.loss.dpo_loss(backend='torch', grad_mode='recompute')"
    assert recompute.label == "tpo_fast [torch] recompute" and recompute.labels == {}
    only_pairs = "has no grad_mode: only the pair losses (tpo, dpo, povid) have a fused path"
    assert recompute.not_applicable == {
        "primitive": f"token_logprobs {only_pairs}",
        "fisao": f"token_pg_loss {only_pairs}",
        "logits": f"logits_logprobs {only_pairs}",
    }
    tgemm = known["tpo_fast-triton-fused-tgemm"]
    assert tgemm.workloads["tpo"] == (
        "tpo_fast.loss.tpo_loss(backend='triton', grad_mode='fused'), under kernel_options(grad_gemm='triton')")
    assert tgemm.label == "tpo_fast [triton] fused, triton gradient GEMMs"
    cpp = known["tpo_fast-cpp"]
    hidden = "not a backend of this workload (token_logprobs backends: auto, triton, torch, reference)"
    assert cpp.not_applicable["primitive"] == hidden
    assert cpp.not_applicable["tpo"] == hidden.replace("token_logprobs", "tpo_loss")
    assert list(cpp.workloads) == ["logits"]
    assert "tpo_fast-cpp-fused" not in known and "tpo_fast-torch-fused-tgemm" not in known
    # the triton -fused row pins its gradient GEMMs to cuBLAS; the torch backend has no such setting to pin
    assert (known["tpo_fast-triton-fused"].grad_gemm, known["tpo_fast-torch-fused"].grad_gemm) == ("torch", None)
    assert known["tpo_fast-torch-fused"].workloads["dpo"] == (
        "tpo_fast.loss.dpo_loss(backend='torch', grad_mode='fused')")


def test_the_backends_timed_are_the_gpu_ones_the_extensions_and_any_new_one_then_torch(mods, monkeypatch):
    """`tpo_fast_backends`: triton, cuda, cpp (each listed with its reason where it cannot run), any backend a later
    tpo_fast adds, torch last; never `auto` (it is one of those) or the materializing `reference`."""
    import tpo_fast

    contenders, _, _ = mods
    assert contenders.tpo_fast_backends() == ("triton", "cuda", "cpp", "torch") == contenders.TPO_FAST_BACKENDS
    monkeypatch.setattr(tpo_fast, "BACKENDS", ("auto", "triton", "new", "torch", "reference", "cuda", "cpp", "newer"))
    assert contenders.tpo_fast_backends() == ("triton", "cuda", "cpp", "new", "newer", "torch")


def test_a_tpo_fast_backend_that_cannot_run_here_says_why(mods, monkeypatch):
    contenders, ours, _ = mods
    known = contenders.all_contenders(("triton", "cuda", "cpp", "torch"))
    assert known["tpo_fast-triton"].availability("cpu", "tpo") == (
        "needs CUDA (the CPU Triton interpreter is far too slow to time)")
    assert known["tpo_fast-cuda"].availability("cpu", "logits") == "needs CUDA"
    assert known["tpo_fast-cpp"].availability("cuda", "logits") == (
        "CPU only (on CUDA the extension's backend is 'cuda')")
    assert known["tpo_fast-torch"].availability("cpu", "tpo") is None
    assert known["tpo_fast-torch"].availability("cuda", "tpo") is None
    assert known["tpo_fast-triton"].availability("cuda", "tpo") is None  # Triton is installed here
    # on their own devices the extension's backends ask the extension, whatever this build holds
    assert known["tpo_fast-cpp"].availability("cpu", "logits") == ours.extension_reason("cpp")
    assert known["tpo_fast-cuda"].availability("cuda", "logits") == ours.extension_reason("cuda")
    assert {c.kind for n, c in known.items() if n.startswith("tpo_fast-")} == {"ours"}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(ours.importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    assert known["tpo_fast-triton"].availability("cuda", "tpo") == "not installed: pip install triton"
    assert known["tpo_fast-torch"].availability("cuda", "tpo") is None
    monkeypatch.undo()
    # A loss without `grad_mode` (an older tpo_fast): the -fused and -recompute rows say the plain row times it.
    monkeypatch.setattr(ours, "grad_mode_default", lambda workload: None)
    assert known["tpo_fast-torch-recompute"].availability("cpu", "dpo") == (
        "this tpo_fast's dpo_loss has no grad_mode: its one path is the recompute one, timed as tpo_fast [torch]")
    assert known["tpo_fast-torch"].availability("cpu", "dpo") is None


def test_the_extensions_backends_say_why_the_extension_does_not_serve_them(mods, monkeypatch):
    """`cpp` / `cuda` ask the extension itself: missing, failing to load (its first line), loaded late, or built
    without CUDA kernels; and run when it loaded with the kernels they need."""
    _, ours, _ = mods
    from tpo_fast import _ext

    build = ours.BUILD
    for flag in ("HAS_CPU_EXT", "HAS_CUDA_EXT"):
        monkeypatch.setattr(_ext, flag, True)
    assert ours.extension_reason("cpp") is None and ours.extension_reason("cuda") is None
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", False)
    assert ours.extension_reason("cpp") is None

    def without(found: bool, error: str | None = None):
        def find_spec(name, *a):
            assert name == "tpo_fast._C"
            return object() if found else None
        monkeypatch.setattr(ours.importlib.util, "find_spec", find_spec)

        def load(name):
            assert name == "tpo_fast._C"
            if error:
                raise ImportError(error)
        monkeypatch.setattr(ours.importlib, "import_module", load)

    monkeypatch.setattr(_ext, "HAS_CPU_EXT", False)
    without(found=False)
    for backend in ("cpp", "cuda"):
        assert ours.extension_reason(backend) == f"not built: tpo_fast._C is missing; run `{build}` to build"
    without(found=True, error="undefined symbol: _ZN3c10\nsecond line")
    assert ours.extension_reason("cpp") == "tpo_fast._C does not load: undefined symbol: _ZN3c10"
    without(found=True)
    assert ours.extension_reason("cpp") == "tpo_fast._C loads now but did not when tpo_fast was imported; run again"
    assert ours.extension_reason("cuda") == (
        f"not built: tpo_fast._C has no CUDA kernels; run `{build}` with a CUDA torch and nvcc to build")
    monkeypatch.setattr(_ext, "HAS_CPU_EXT", True)  # the CPU kernels loaded: `cuda` still lacks its own
    assert ours.extension_reason("cpp") is None
    assert ours.extension_reason("cuda").startswith("not built: tpo_fast._C has no CUDA kernels")


def test_entry_finds_a_function_in_its_newest_home_and_names_every_home_it_tried(mods, monkeypatch):
    _, ours, _ = mods
    import tpo_fast.loss

    assert ours.entry("povid") == ("tpo_fast.loss.povid_loss", tpo_fast.loss.povid_loss)
    monkeypatch.delattr(tpo_fast.loss, "povid_loss")
    import tpo_fast.methods

    monkeypatch.setattr(tpo_fast.methods, "povid_loss", "older home", raising=False)
    assert ours.entry("povid") == ("tpo_fast.methods.povid_loss", "older home")
    monkeypatch.delattr(tpo_fast.methods, "povid_loss")
    with pytest.raises(ImportError, match=r"^none of tpo_fast\.loss\.povid_loss, tpo_fast\.methods\.povid_loss "
                                          r"exists$"):
        ours.entry("povid")
    assert ours._qualified("povid") == "povid_loss"  # a note still names the function
    assert ours.grad_mode_default("tpo") == "auto" and ours.grad_mode_default("primitive") is None


def test_a_peer_that_is_not_installed_names_the_package_to_install(mods, monkeypatch):
    contenders, _, _ = mods
    (base,) = bench_modules("_contenders.base")
    known = contenders.all_contenders(("torch",))
    monkeypatch.setattr(base.importlib.util, "find_spec", lambda name, *a: None)
    assert known["trl"].availability("cpu", "dpo") == "not installed: pip install trl"
    assert known["liger"].availability("cpu", "dpo") == "not installed: pip install liger-kernel"
    assert known["cce"].availability("cuda", "dpo") == "not installed: pip install cut-cross-entropy"
    monkeypatch.undo()
    for name in ("trl", "liger"):  # installed here (the bench extra): nothing to say
        if importlib.util.find_spec({"trl": "trl", "liger": "liger_kernel"}[name]) is not None:
            assert known[name].availability("cpu", "dpo") is None


def test_cut_cross_entropy_runs_its_triton_kernels_on_cuda_and_its_compiled_torch_impl_only_when_asked_on_a_cpu(mods):
    """On a CPU the bench leaves CCE out unless asked for (`--contenders cce`: allow_cpu), and then runs its
    torch_compile implementation, labelled as materializing the logits; on CUDA its own Triton kernels ("cce")."""
    pytest.importorskip("cut_cross_entropy")
    contenders, _, _ = mods
    assert contenders.CCE().availability("cpu", "dpo") == (
        "needs CUDA for its Triton kernels (on CPU, --contenders cce runs its torch_compile impl, which "
        "materializes N x V logits and compiles for ~30 s)")
    assert contenders.CCE().availability("cuda", "dpo") is None
    asked = contenders.CCE(allow_cpu=True)
    assert asked.availability("cpu", "dpo") is None
    asked.setup("cpu")
    assert (asked.impl, asked.label) == ("torch_compile", "Cut Cross-Entropy (torch_compile impl: materializes logits)")
    on_gpu = contenders.CCE()
    on_gpu.setup("cuda")
    assert (on_gpu.impl, on_gpu.label) == ("cce", "Cut Cross-Entropy")
    assert callable(on_gpu._lce)


def test_cce_exact_passes_filter_eps_none_and_cce_its_default(mods):
    """`cce-exact` is CCE with its gradient filtering off (`filter_eps=None`), so that CCE has a row that passes the
    oracle check where its default filtering misses it; `cce` leaves CCE's default. Both on a CPU only when named."""
    contenders, _, _ = mods
    known = contenders.all_contenders(("torch",))
    exact, default = known["cce-exact"], known["cce"]
    assert (exact.name, exact.kind, exact.label) == ("cce-exact", "peer", "Cut Cross-Entropy, exact gradient")
    assert exact.workloads["dpo"] == ("-linear_cross_entropy(reduction='none', filter_eps=None) per token; DPO in "
                                      "PyTorch")
    assert "cce-exact" in contenders.DEFAULT and contenders.CCE_NAMES == ("cce", "cce-exact")
    calls = []

    def lce(h, w, y, **kwargs):
        calls.append(kwargs)
        return torch.zeros(h.shape[0])

    for c in (exact, default):
        c._lce, c.impl = lce, "cce"
        c.logprobs(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long))
    assert calls == [{"reduction": "none", "impl": "cce", "filter_eps": None}, {"reduction": "none", "impl": "cce"}]
    exact.allow_cpu = True
    if importlib.util.find_spec("cut_cross_entropy") is not None:
        exact.setup("cpu")
        assert exact.label == "Cut Cross-Entropy, exact gradient (torch_compile impl: materializes logits)"


def test_liger_runs_its_dpo_loss_with_the_benchs_settings_compiled_on_cuda_only(mods, monkeypatch):
    """Liger's fused linear DPO loss: the bench's beta, a reference model's rows, summed (not averaged) log-probs
    as the DPO loss takes them, no NLL term; torch.compile on CUDA, eager on a CPU (and labelled so); it is handed
    the policy's weight, hidden states and targets and the reference's hidden states and weight, and its loss is
    the first output."""
    pytest.importorskip("liger_kernel")
    import liger_kernel.chunked_loss as chunked

    contenders, _, workloads = mods
    made, calls = [], []

    class Spy:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def __call__(self, *args, **kwargs):
            calls.append((args, kwargs))
            return ("the loss", "the metrics")

    monkeypatch.setattr(chunked, "LigerFusedLinearDPOLoss", Spy)
    for device, compiled, label in (("cpu", False, "Liger LigerFusedLinearDPOLoss (compiled=False on CPU)"),
                                    ("cuda", True, "Liger LigerFusedLinearDPOLoss")):
        c = contenders.all_contenders(("torch",))["liger"]
        c.setup(device)
        assert made.pop() == dict(beta=workloads.BETA, compiled=compiled, use_ref_model=True, average_log_prob=False,
                                  compute_nll_loss=False)
        assert c.label == label
    inp = {k: object() for k in ("weight", "hidden", "targets", "ref_hidden", "ref_weight")}
    assert c.run("dpo", inp) == "the loss"
    assert calls == [((inp["weight"], inp["hidden"], inp["targets"]),
                      {"ref_input": inp["ref_hidden"], "ref_weight": inp["ref_weight"]})]


def test_the_peers_visual_score_is_z_minus_z_tilde_from_one_gather(mods):
    """The TPO peers' visual score `(h - h~) . W[y]` equals the raw target logits' difference `z[y] - z~[y]` of the
    full logits (a float64 oracle), and its gradients are those of the difference: one gather of W[y] for both
    branches (two gave the peers a second (V, D) gradient in backward)."""
    (base,) = bench_modules("_contenders.base")
    g = torch.Generator().manual_seed(3)
    h, hc, w = (torch.randn(s, generator=g, requires_grad=True) for s in ((7, 5), (7, 5), (11, 5)))
    y = torch.tensor([0, 10, 3, 3, 7, 1, 10])
    got = base.visual_score(h, hc, w, y)
    hd, hcd, wd = (t.detach().double().requires_grad_() for t in (h, hc, w))
    want = (hd @ wd.t()).gather(1, y[:, None]).squeeze(1) - (hcd @ wd.t()).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    cot = torch.randn(7, generator=g)
    got_g = torch.autograd.grad(got, (h, hc, w), cot)
    want_g = torch.autograd.grad(want, (hd, hcd, wd), cot.double())
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)
