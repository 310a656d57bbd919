"""scripts/kernel_mutants.py, the mutation runs of the Triton kernels (mutmut cannot mutate a jit function): which
mutants it makes of a kernel's source, and that a run kills a mutant the tests notice and reports one they do not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import kernel_mutants  # noqa: E402

KERNEL = '''import triton
import triton.language as tl


def helper(a, b):
    return a + b


@triton.jit
def k(X, Y, N, BLOCK: tl.constexpr):
    """1 + 1 in a docstring is text."""
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0)
    if BLOCK > 1:
        x += tl.where(x > 0, x, -x)
    tl.static_print("\u00fc", x * 2)
    tl.store(Y + offs, tl.max(x, axis=0), mask=mask)
'''


def test_mutants_of_a_kernel_change_one_operator_constant_call_or_keyword_each():
    """The jit function's body only (not the plain helper, not the docstring); each mutant one edit, named by its
    line and what it changes; byte columns right after a non-ASCII character (line 17)."""
    got = {m.name: m for m in kernel_mutants.mutants_of("kernels/k.py", KERNEL)}
    want = {
        "k.py:12:Constant:0->1": "    offs = tl.arange(1, BLOCK)",
        "k.py:13:Compare:<-><=": "    mask = offs <= N",
        "k.py:14:BinOp:+->-": "    x = tl.load(X - offs, mask=mask, other=0.0)",
        "k.py:14:Keyword:mask=->": "    x = tl.load(X + offs, other=0.0)",
        "k.py:14:Keyword:other=->": "    x = tl.load(X + offs, mask=mask)",
        "k.py:14:Constant:0.0->1.0": "    x = tl.load(X + offs, mask=mask, other=1.0)",
        "k.py:15:If:->not": "    if not (BLOCK > 1):",
        "k.py:15:Compare:>->>=": "    if BLOCK >= 1:",
        "k.py:15:Constant:1->2": "    if BLOCK > 2:",
        "k.py:16:AugAssign:+=->-=": "        x -= tl.where(x > 0, x, -x)",
        "k.py:16:AugAssign:+=->=": "        x = tl.where(x > 0, x, -x)",
        "k.py:16:Compare:>->>=": "        x += tl.where(x >= 0, x, -x)",
        "k.py:16:Constant:0->1": "        x += tl.where(x > 1, x, -x)",
        "k.py:16:Call:tl.where(c, a, b)->(c, b, a)": "        x += tl.where(x > 0, -x, x)",
        "k.py:16:UnaryOp:-->": "        x += tl.where(x > 0, x, x)",
        "k.py:17:BinOp:*->/": '    tl.static_print("\u00fc", x / 2)',
        "k.py:17:Constant:2->3": '    tl.static_print("\u00fc", x * 3)',
        "k.py:18:BinOp:+->-": "    tl.store(Y - offs, tl.max(x, axis=0), mask=mask)",
        "k.py:18:Call:tl.max->tl.min": "    tl.store(Y + offs, tl.min(x, axis=0), mask=mask)",
        "k.py:18:Constant:0->1": "    tl.store(Y + offs, tl.max(x, axis=1), mask=mask)",
        "k.py:18:Keyword:mask=->": "    tl.store(Y + offs, tl.max(x, axis=0))",
    }
    assert sorted(got) == sorted(want)
    original = KERNEL.splitlines()
    for name, line in want.items():
        mutated = got[name].source.splitlines()
        changed = [i for i, (a, b) in enumerate(zip(original, mutated, strict=True)) if a != b]
        assert changed == [got[name].line - 1] and mutated[changed[0]] == line, name
        assert f"\n+{line}\n" in got[name].diff, name
    # the tests that reach a mutant are those of its statement; an `if` is its header line alone
    assert got["k.py:15:If:->not"].lines == (15, 15) and got["k.py:16:UnaryOp:-->"].lines == (16, 16)


def test_a_multi_line_statement_is_reached_through_any_of_its_lines():
    source = "import triton\n\n\n@triton.jit\ndef k(X, N):\n    y = (\n        X\n        + N\n    )\n"
    (mutant,) = kernel_mutants.mutants_of("kernels/k.py", source)
    assert (mutant.name, mutant.lines) == ("k.py:8:BinOp:+->-", (6, 9))


def test_lines_break_where_python_breaks_them_not_inside_a_utf8_character():
    """"\u00c5" is the bytes C3 85; read as Latin-1, 0x85 is a line break to `str.splitlines`, which shifted every
    line after the comment by one and left the file without a single mutant."""
    source = "import triton\n\n\n@triton.jit\ndef k(X):\n    # \u00c5ngstr\u00f6m\n    y = X + 1\n"
    got = {m.name: m.source.splitlines()[6] for m in kernel_mutants.mutants_of("kernels/k.py", source)}
    assert got == {"k.py:7:BinOp:+->-": "    y = X - 1", "k.py:7:Constant:1->2": "    y = X + 2"}


def test_a_run_kills_what_the_tests_notice_and_reports_the_rest(tmp_path):
    """`kernels/scale.py` against its own test file: a factor test compared `s == 1.0` against `s != 1.0`
    (killed); the value loaded into masked-off lanes is never stored (a survivor, listed with its diff)."""
    only = ["scale.py:25:Compare:==->!=", "scale.py:26:Keyword:other=->"]
    cmd = [sys.executable, str(ROOT / "scripts" / "kernel_mutants.py"), "kernels/scale.py", "--tests",
           "tests/test_triton_scale.py", "--only", *only, "--jobs", "1", "--workdir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    results = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert {name: r["status"] for name, r in results.items()} == {only[0]: "killed", only[1]: "survived"}
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.startswith("kernels/scale.py: 2 mutants, {'killed': 1, 'survived': 1}; killed 1 of 2 reached "
                              "on the CPU = 50.0% (")
    assert "survived: scale.py:26:Keyword:other=->\n" in summary and "+    g = tl.load(G + offs, mask=mask)" in summary
    shown = subprocess.run([*cmd[:2], "--workdir", str(tmp_path), "--show", only[0]], capture_output=True, text=True)
    assert shown.stdout.startswith(f"{only[0]}: killed\n")
    assert "+    mask = offs < tl.where(s != 1.0, 0, N)" in shown.stdout
    # the working tree's kernel is untouched: the mutants were written into the copies
    assert "s == 1.0" in (ROOT / "kernels" / "scale.py").read_text()


def test_files_outside_kernels_are_refused():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_mutants.py"), "tpo_fast/ops/options.py"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr == "tpo_fast/ops/options.py: not a file under kernels/\n"


@pytest.mark.parametrize("module", ["kernels/scale.py", "kernels"])
def test_make_mutants_hands_kernels_to_the_script(module, tmp_path):
    """`make mutants MODULE=kernels/...` runs scripts/kernel_mutants.py (a fake interpreter records its argv)."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "argv"}\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PY": str(fake), "MODULE": module, "TESTS": "tests/test_triton_scale.py"}
    subprocess.run(["bash", str(ROOT / "scripts" / "mutants.sh")], env=env, check=True, cwd=ROOT)
    file = [module] if module != "kernels" else []
    assert (tmp_path / "argv").read_text().split() == [
        str(ROOT / "scripts" / "kernel_mutants.py"), *file, "--tests", "tests/test_triton_scale.py", "--jobs", "2",
        "--python", str(fake)]
