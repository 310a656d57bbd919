"""Mutation testing of the Triton kernels (kernels/*.py) under the CPU interpreter.

mutmut cannot mutate a `@triton.jit` function: it replaces each function by a trampoline, and Triton reads the
kernel's own source. This script mutates the kernel source text itself, one small change at a time, and runs
the tests that execute the changed line, under TRITON_INTERPRET=1, in a copy of the tree:

    make mutants MODULE=kernels/token_stats_fwd.py             # scripts/mutants.sh hands kernels/ to this script
    python scripts/kernel_mutants.py kernels/scale.py kernels/_cast.py [--tests tests/test_x.py ...] [--jobs 2]
    python scripts/kernel_mutants.py --show 'scale.py:27:Compare:==->!='   # a mutant's diff, from the last run

1. The tree (tracked and untracked-not-ignored files) is copied to $MUTANTS_DIR/kernels (default
   /tmp/tpo_fast_mutants/kernels), once per parallel job, with kernels/ as tpo_fast/kernels inside the package.
2. The tests run once, unmutated, under coverage with one context per test, which gives the tests that
   execute each kernel line under the interpreter (and each test's time).
3. Every jit function's body is mutated: arithmetic, bitwise and comparison operators, `+=` into `=` and `-=`,
   numbers (n -> n + 1), `float("inf")`'s sign, True/False, unary minus and `not` dropped, `if c:` into
   `if not (c):`, tl.max/min, maximum/minimum, exp/exp2, log/log2, sum/max and argmax/argmin swapped,
   `tl.where`'s two values swapped, and a `mask=` or `other=` keyword dropped.
4. Each mutant runs against the tests that reach its statement, fastest first, stopping at the first failure
   (`pytest -x`): a failure, a crash or a timeout kills it. A mutant on a line no test reaches on the CPU (a
   GPU-only branch) is counted apart as "not reached", never as killed.

The summary (counts, the kill rate, each survivor with its diff) is printed and left in summary.txt of the
work folder, every mutant's result in results.json. Not part of CI: all kernels take about half an hour on
2 cores. docs/testing.md lists the known equivalent survivors.
"""

from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import dataclasses
import difflib
import json
import os
import queue
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = (  # every test file that launches a kernel under the interpreter (about a minute unmutated)
    "tests/test_primitives.py",
    "tests/test_gaps_triton_impl.py",
    "tests/test_gaps_triton_fused.py",
    "tests/test_fused_loss.py",
    "tests/test_triton_matmul.py",
    "tests/test_triton_scale.py",
    "tests/test_logits_logprobs.py",
    "tests/test_gaps_logits.py",
    "tests/test_gaps_ops.py",
    "tests/test_gaps_fused.py",
    "tests/test_triton_edges.py",
)
BINOPS = {
    ast.Add: ("+", ["-"]),
    ast.Sub: ("-", ["+"]),
    ast.Mult: ("*", ["/"]),
    ast.Div: ("/", ["*"]),
    ast.FloorDiv: ("//", ["*", "%"]),
    ast.Mod: ("%", ["//"]),
    ast.BitAnd: ("&", ["|"]),
    ast.BitOr: ("|", ["&"]),
    ast.BitXor: ("^", ["|"]),
    ast.RShift: (">>", ["<<"]),
    ast.LShift: ("<<", [">>"]),
}
COMPARES = {
    ast.Lt: ("<", ["<="]),
    ast.LtE: ("<=", ["<"]),
    ast.Gt: (">", [">="]),
    ast.GtE: (">=", [">"]),
    ast.Eq: ("==", ["!="]),
    ast.NotEq: ("!=", ["=="]),
}
AUGASSIGNS = {ast.Add: ("+=", ["=", "-="]), ast.Sub: ("-=", ["=", "+="]), ast.Mult: ("*=", ["="])}
CALL_SWAPS = {
    "max": "min",
    "min": "max",
    "maximum": "minimum",
    "minimum": "maximum",
    "exp": "exp2",
    "log": "log2",
    "sum": "max",
    "argmax": "argmin",
}
DROPPED_KEYWORDS = ("mask", "other")
INF_STRINGS = {"inf": "-inf", "-inf": "inf", "+inf": "-inf"}
PLUGIN = '''
"""Loaded by scripts/kernel_mutants.py: one coverage context per test, and each test's time."""
import json, os, time
import coverage, pytest

_TIMES = {}

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.switch_context(item.nodeid)
    start = time.perf_counter()
    yield
    _TIMES[item.nodeid] = time.perf_counter() - start
    if cov is not None:
        cov.switch_context("")

def pytest_runtest_logreport(report):
    if report.failed:
        _TIMES.setdefault("__failed__", []).append(report.nodeid)

def pytest_sessionfinish(session):
    with open(os.environ["KERNEL_MUTANTS_TIMES"], "w") as f:
        json.dump(_TIMES, f)
'''


@dataclasses.dataclass
class Mutant:
    """One change of one kernel file: `source` is the whole mutated file."""

    name: str
    file: str  # kernels/<file>.py
    line: int
    lines: tuple[int, int]  # the enclosing statement's first and last line (the tests reaching them run)
    source: str
    diff: str
    status: str = "pending"
    tests: int = 0
    seconds: float = 0.0


def _line_offsets(data: bytes) -> list[int]:
    """Byte offset of each line's start. `bytes.splitlines` breaks at \n, \r and \r\n only, as Python's tokenizer
    does (a str would also break inside a UTF-8 character whose bytes decode to \x85 or \x1c-\x1e)."""
    offsets = [0]
    for line in data.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    return offsets


class _Mutator:
    """Collects (start, end, replacement, label, node) text edits over the jit functions of one file.

    ast gives UTF-8 byte columns: the source is handled as bytes, so a non-ASCII comment does not shift them."""

    def __init__(self, source: str):
        self.data = source.encode()
        self.offsets = _line_offsets(self.data)
        self.edits: list[tuple[int, int, bytes, str, ast.AST]] = []

    def pos(self, line: int, col: int) -> int:
        return self.offsets[line - 1] + col

    def start(self, node: ast.AST) -> int:
        return self.pos(node.lineno, node.col_offset)

    def end(self, node: ast.AST) -> int:
        return self.pos(node.end_lineno, node.end_col_offset)

    def add(self, start: int, end: int, text: str, label: str, stmt: ast.AST) -> None:
        self.edits.append((start, end, text.encode(), label, stmt))

    def operator_between(self, left: ast.AST, right: ast.AST, symbol: str) -> int | None:
        """Byte offset of `symbol` in the gap between two operands (closing/opening brackets and blanks aside)."""
        gap = self.data[self.end(left) : self.start(right)]
        stripped = gap.lstrip(b") \t\r\n\\")
        if not stripped.startswith(symbol.encode()):
            return None
        return self.end(left) + len(gap) - len(stripped)

    def visit(self, node: ast.AST, stmt: ast.AST) -> None:
        if isinstance(node, ast.stmt):
            stmt = node
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return  # a docstring
        self.mutate(node, stmt)
        for child in ast.iter_child_nodes(node):
            self.visit(child, stmt)

    def swap_operator(self, kind: str, op: ast.AST, table: dict, left: ast.AST, right: ast.AST, stmt: ast.AST) -> None:
        """One mutant per replacement of the operator `op` written between `left` and `right` (`table`: its
        symbol and replacements by operator type)."""
        if type(op) not in table:
            return
        symbol, others = table[type(op)]
        at = self.operator_between(left, right, symbol)
        if at is not None:
            for other in others:
                self.add(at, at + len(symbol), other, f"{kind}:{symbol}->{other}", stmt)

    def mutate(self, node: ast.AST, stmt: ast.AST) -> None:
        if isinstance(node, ast.BinOp):
            self.swap_operator("BinOp", node.op, BINOPS, node.left, node.right, stmt)
        elif isinstance(node, ast.Compare) and len(node.ops) == 1:
            self.swap_operator("Compare", node.ops[0], COMPARES, node.left, node.comparators[0], stmt)
        elif isinstance(node, ast.AugAssign):
            self.swap_operator("AugAssign", node.op, AUGASSIGNS, node.target, node.value, stmt)
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool):
                self.add(self.start(node), self.end(node), str(not value), f"Constant:{value}->{not value}", stmt)
            elif isinstance(value, (int, float)):
                new = value + 1
                text = hex(new) if self.data[self.start(node) : self.end(node)].lower().startswith(b"0x") else repr(new)
                self.add(self.start(node), self.end(node), text, f"Constant:{value!r}->{text}", stmt)
            elif isinstance(value, str) and value.lower() in INF_STRINGS:
                new = INF_STRINGS[value.lower()]
                self.add(self.start(node), self.end(node), repr(new), f"Constant:{value}->{new}", stmt)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            label = "UnaryOp:-" if isinstance(node.op, ast.USub) else "UnaryOp:not"
            self.add(self.start(node), self.start(node.operand), "", f"{label}->", stmt)
        elif isinstance(node, ast.If):
            test = node.test
            text = self.data[self.start(test) : self.end(test)].decode()
            self.add(self.start(test), self.end(test), f"not ({text})", "If:->not", stmt)
        elif isinstance(node, ast.Call):
            self.mutate_call(node, stmt)

    def mutate_call(self, node: ast.Call, stmt: ast.AST) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "tl":
            if func.attr in CALL_SWAPS:
                new = CALL_SWAPS[func.attr]
                self.add(self.start(func), self.end(func), f"tl.{new}", f"Call:tl.{func.attr}->tl.{new}", stmt)
            if func.attr == "where" and len(node.args) == 3:
                a, b = node.args[1], node.args[2]
                a_text = self.data[self.start(a) : self.end(a)].decode()
                b_text = self.data[self.start(b) : self.end(b)].decode()
                self.add(self.start(a), self.end(b), f"{b_text}, {a_text}", "Call:tl.where(c, a, b)->(c, b, a)", stmt)
        for i, keyword in enumerate(node.keywords):
            before = [*node.args, *(k.value for k in node.keywords[:i])]
            if keyword.arg in DROPPED_KEYWORDS and before:
                # drop ", mask=..." from the end of the previous argument to the end of the keyword's value
                self.add(self.end(before[-1]), self.end(keyword.value), "", f"Keyword:{keyword.arg}=->", stmt)


def _is_jit(func: ast.FunctionDef) -> bool:
    for decorator in func.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
    return False


def mutants_of(path: str, source: str) -> list[Mutant]:
    """Every mutant of the `@triton.jit` functions' bodies in one kernel file (those that still parse)."""
    tree = ast.parse(source)
    mutator = _Mutator(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and _is_jit(node):
            for stmt in node.body:
                mutator.visit(stmt, stmt)
    out: list[Mutant] = []
    seen: dict[str, int] = {}
    base = Path(path).name
    for start, end, text, label, stmt in sorted(mutator.edits, key=lambda e: (e[0], e[3])):
        data = mutator.data[:start] + text + mutator.data[end:]
        mutated = data.decode()
        try:
            ast.parse(mutated)
        except SyntaxError:
            continue
        line = mutator.data[:start].count(b"\n") + 1
        name = f"{base}:{line}:{label}"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        diff = "".join(
            difflib.unified_diff(
                source.splitlines(keepends=True), mutated.splitlines(keepends=True), path, path, n=0
            )
        )
        first = stmt.lineno
        if isinstance(stmt, (ast.If, ast.While)):  # the header only: its body's lines are their own statements
            last = stmt.test.end_lineno or first
        elif isinstance(stmt, ast.For):
            last = stmt.iter.end_lineno or first
        else:
            last = stmt.end_lineno or first
        out.append(Mutant(name, path, line, (first, last), mutated, diff))
    return out


def copy_tree(dest: Path) -> None:
    """The tracked and untracked-not-ignored files, with kernels/ also at tpo_fast/kernels (as installed)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for name in files:
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for ext in ROOT.glob("tpo_fast/_C*.so"):
        shutil.copy2(ext, dest / "tpo_fast" / ext.name)
    shutil.copytree(dest / "kernels", dest / "tpo_fast" / "kernels")


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1",
        PYTHONPATH=str(tree) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def baseline(tree: Path, tests: list[str], python: str) -> tuple[dict[tuple[str, int], set[str]], dict[str, float]]:
    """Which tests execute each kernel line, and each test's seconds, from one unmutated run under coverage."""
    (tree / "_kernel_mutants_plugin.py").write_text(PLUGIN)
    rc = tree / ".coveragerc_kernel_mutants"
    rc.write_text("[run]\ninclude = tpo_fast/kernels/*\n")
    env = _env(tree)
    env["KERNEL_MUTANTS_TIMES"] = str(tree / "times.json")
    cmd = [python, "-m", "coverage", "run", f"--rcfile={rc}", "--data-file=.coverage_kernel_mutants", "-m",
           "pytest", "-q", "-p", "no:cacheprovider", "-p", "_kernel_mutants_plugin", "-m", "not slow", *tests]
    result = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    times = json.loads((tree / "times.json").read_text())
    failed = times.pop("__failed__", [])
    if result.returncode != 0 or failed:
        sys.exit(f"the unmutated tests fail ({failed or result.returncode}); fix them first:\n{result.stdout[-3000:]}")
    import coverage  # noqa: PLC0415  (only the baseline needs it, and only in the venv)

    data = coverage.CoverageData(basename=str(tree / ".coverage_kernel_mutants"))
    data.read()
    reached: dict[tuple[str, int], set[str]] = {}
    for measured in data.measured_files():
        rel = "kernels/" + Path(measured).name
        for line, contexts in data.contexts_by_lineno(measured).items():
            reached.setdefault((rel, line), set()).update(c for c in contexts if c)
    return reached, times


def run_mutant(mutant: Mutant, tree: Path, tests: list[str], times: dict[str, float], python: str) -> None:
    target = tree / "tpo_fast" / mutant.file
    original = target.read_text()
    target.write_text(mutant.source)
    args = tree / "mutant_tests.txt"
    args.write_text("\n".join(tests) + "\n")
    budget = 30.0 + 5.0 * sum(times.get(t, 1.0) for t in tests)
    start = time.perf_counter()
    try:
        result = subprocess.run(
            [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", f"@{args}"],
            cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=budget,
        )
        if result.returncode == 0:
            mutant.status = "survived"
        elif result.returncode in (1, 3) or result.returncode < 0:  # a failure, an internal error, a signal
            mutant.status = "killed"
        else:
            mutant.status = f"error (pytest exit {result.returncode})"
    except subprocess.TimeoutExpired:
        mutant.status = "timeout"
    finally:
        target.write_text(original)
    mutant.tests = len(tests)
    mutant.seconds = time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="kernel files (default: every kernels/*.py with a jit function)")
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS), help="test files or node ids")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", "2")))
    default_work = os.path.join(os.environ.get("MUTANTS_DIR", "/tmp/tpo_fast_mutants"), "kernels")
    parser.add_argument("--workdir", default=default_work)
    parser.add_argument("--python", default=os.environ.get("PY", sys.executable))
    parser.add_argument("--only", nargs="+", help="only the mutants whose names start with one of these")
    parser.add_argument("--show", metavar="NAME", help="print one mutant's diff and result from the last run")
    args = parser.parse_args()
    work = Path(args.workdir)

    if args.show:
        results = json.loads((work / "results.json").read_text())
        match = [r for r in results if r["name"] == args.show]
        if not match:
            print(f"no mutant named {args.show!r} in {work / 'results.json'}", file=sys.stderr)
            return 2
        print(f"{match[0]['name']}: {match[0]['status']}\n{match[0]['diff']}")
        return 0

    files = args.files or sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "kernels").glob("*.py") if "@triton.jit" in p.read_text()
    )
    for name in files:
        if not name.startswith("kernels/") or not (ROOT / name).is_file():
            print(f"{name}: not a file under kernels/", file=sys.stderr)
            return 2
    mutants = [m for f in files for m in mutants_of(f, (ROOT / f).read_text())]
    if args.only:
        mutants = [m for m in mutants if m.name.startswith(tuple(args.only))]
    t0 = time.time()
    trees = [work / f"tree{i}" for i in range(max(1, args.jobs))]
    for tree in trees:
        copy_tree(tree)
    print(f"{len(mutants)} mutants of {', '.join(files)} in {work}; baseline run of {' '.join(args.tests)}", flush=True)
    reached, times = baseline(trees[0], args.tests, args.python)

    free: queue.Queue[Path] = queue.Queue()
    for tree in trees:
        free.put(tree)

    def job(mutant: Mutant) -> Mutant:
        tests: set[str] = set()
        for line in range(mutant.lines[0], mutant.lines[1] + 1):
            tests |= reached.get((mutant.file, line), set())
        if not tests:
            mutant.status = "not reached"
            return mutant
        tree = free.get()
        try:
            run_mutant(mutant, tree, sorted(tests, key=lambda t: (times.get(t, 1.0), t)), times, args.python)
        finally:
            free.put(tree)
        return mutant

    done = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(trees)) as pool:
        for mutant in pool.map(job, mutants):
            done += 1
            print(f"[{done}/{len(mutants)}] {mutant.status:11s} {mutant.name} ({mutant.tests} tests, "
                  f"{mutant.seconds:.0f} s)", flush=True)

    counts = dict(collections.Counter(m.status for m in mutants))
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    tested = len(mutants) - counts.get("not reached", 0)
    rate = 100.0 * killed / tested if tested else 0.0
    lines = [f"{', '.join(files)}: {len(mutants)} mutants, {counts}; killed {killed} of {tested} reached on the "
             f"CPU = {rate:.1f}% ({time.time() - t0:.0f} s)"]
    for m in mutants:
        if m.status not in ("killed", "timeout"):
            lines.append(f"{m.status}: {m.name}\n{m.diff}")
    summary = "\n".join(lines)
    print(summary)
    (work / "summary.txt").write_text(summary + "\n")
    results = [{k: v for k, v in dataclasses.asdict(m).items() if k != "source"} for m in mutants]
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
