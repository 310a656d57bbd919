"""README.md and docs/*.md run as written: every shell command and Python snippet, in order, per document.

The blocks are found when the tests are collected, so a document added or rewritten later is
picked up as it is then. Fenced blocks tagged `bash`/`sh`/`shell`/`console` run as one `bash -e`
script each; blocks tagged `python` run in one namespace per document, so a snippet may use what
an earlier one of the same document defined (a block selected alone first runs the earlier ones).
Other fences (`text`, none) are not run.

A marker on the line just before a fence says how to treat the block:

    <!-- gpu -->          not run here: needs a CUDA GPU (and usually a real checkpoint)
    <!-- slow -->         run, marked `slow` (longer than a few seconds)
    <!-- skip: reason --> not run, for the reason given (e.g. `make test`, which runs this suite)

A shell block with a `make` line is not run either, marked or not: `make test` and `make bench`
install, then run this suite or the whole benchmark (mark such blocks `<!-- skip: ... -->` anyway).

Each document runs in its own scratch folder that looks like the repository: `examples/` is a
copy (a snippet may write there), `bench/results/` is empty, everything else is a link. Commands
find the `tpo-fast`, `python`, `torchrun` of this interpreter first on PATH, never download
(HF_HUB_OFFLINE) and run DeepSpeed on the CPU when there is no GPU. Keep the snippets tiny: a
document that trains uses the shipped examples and a tiny model folder
(`python examples/make_tiny_models.py tiny-llava`).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHELL_LANGS = {"bash", "sh", "shell", "console"}
PYTHON_LANGS = {"python", "py"}
MARKER = re.compile(r"^<!--\s*(gpu|slow|skip)\s*:?\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
BLOCK_TIMEOUT_S = 600
EXAMPLES_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # 1-based line of the opening fence
    kind: str  # "shell" or "python"
    code: str
    marker: str | None  # "gpu", "slow", "skip" or None
    reason: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}-{self.kind}"


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def parse_blocks(path: Path) -> list[Block]:
    """The runnable fenced blocks of one markdown file, with the marker before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1 : j])
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = MARKER.match(lines[k].strip()) if k >= 0 else None
        kind = "shell" if lang in SHELL_LANGS else "python" if lang in PYTHON_LANGS else None
        if kind is not None:
            blocks.append(Block(
                str(path.relative_to(ROOT)), i + 1, kind, code + "\n",
                marker.group(1) if marker else None, marker.group(2) if marker else "",
            ))
        i = j + 1
    return blocks


ALL_BLOCKS = [b for doc in documents() for b in parse_blocks(doc)]


def _param(block: Block):
    marks = []
    if block.marker == "slow":
        marks.append(pytest.mark.slow)
    if block.marker == "gpu":
        marks.append(pytest.mark.gpu)
    return pytest.param(block, id=block.id, marks=marks)


def _runs_make(block: Block) -> bool:
    return block.kind == "shell" and any(line.strip().startswith("make ") for line in block.code.splitlines())


def _runnable(block: Block) -> bool:
    return block.marker not in ("gpu", "skip") and not _runs_make(block)


class DocRun:
    """One document's scratch folder, Python namespace and how far its blocks have run."""

    def __init__(self, doc: str, folder: Path):
        self.doc = doc
        self.folder = folder
        self.namespace: dict = {"__name__": "__doc_snippet__"}
        self.done: set[int] = set()
        folder.mkdir(parents=True, exist_ok=True)
        for entry in ROOT.iterdir():
            if entry.name in (".git", ".venv") or entry.name.startswith("."):
                continue
            if entry.name == "examples":
                shutil.copytree(entry, folder / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
            elif entry.name == "bench" and entry.is_dir():
                (folder / "bench").mkdir()
                for sub in entry.iterdir():
                    if sub.name != "results":
                        (folder / "bench" / sub.name).symlink_to(sub)
                (folder / "bench" / "results").mkdir()
            else:
                (folder / entry.name).symlink_to(entry)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
        return env

    def run(self, block: Block) -> None:
        for earlier in ALL_BLOCKS:
            if earlier.doc == self.doc and earlier.line < block.line and _runnable(earlier) \
                    and earlier.line not in self.done:
                self._run_one(earlier, setup_for=block)
        self._run_one(block)

    def _run_one(self, block: Block, setup_for: Block | None = None) -> None:
        self.done.add(block.line)
        where = f"{block.id}" + (f" (run first, as set-up of {setup_for.id})" if setup_for else "")
        if block.kind == "shell":
            proc = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=self.folder, env=self.env(),
                capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S,
            )
            if proc.returncode != 0:
                pytest.fail(f"{where} exited with {proc.returncode}:\n{block.code}\n--- stdout (tail)\n"
                            f"{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-5000:]}", pytrace=False)
            return
        cwd = os.getcwd()
        os.chdir(self.folder)
        saved_env = dict(os.environ)
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        try:
            with redirect_stdout(io.StringIO()):
                exec(compile(block.code, f"{block.doc}:{block.line}", "exec"), self.namespace)
        except Exception as e:  # noqa: BLE001 - the report says where in the docs it broke
            raise AssertionError(f"{where} raised {type(e).__name__}: {e}\n{block.code}") from e
        finally:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(saved_env)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory):
    runs: dict[str, DocRun] = {}

    def get(doc: str) -> DocRun:
        if doc not in runs:
            runs[doc] = DocRun(doc, tmp_path_factory.mktemp(re.sub(r"\W", "_", doc)))
        return runs[doc]

    return get


@pytest.mark.parametrize("block", [_param(b) for b in ALL_BLOCKS])
def test_doc_block_runs_as_written(block: Block, doc_runs):
    if block.marker == "gpu":
        pytest.skip("marked <!-- gpu -->: needs a CUDA GPU")
    if block.marker == "skip":
        pytest.skip(f"marked <!-- skip -->: {block.reason or 'no reason given'}")
    if _runs_make(block):
        pytest.skip("runs make (set-up, then the whole test suite or benchmark); mark it <!-- skip: ... -->")
    doc_runs(block.doc).run(block)


FILE_FLAGS = ("--data", "--prompts", "--calibration", "--objects", "--deepspeed", "--config_file", "--config-file")


def test_commands_name_files_the_repository_ships():
    """Every data or config file a documented command names (GPU ones too) is in the repository."""
    missing = []
    for block in ALL_BLOCKS:
        if block.kind != "shell":
            continue
        script = re.sub(r"\\\n", " ", block.code)
        for line in script.splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            for flag, value in zip(words, words[1:], strict=False):
                if flag in FILE_FLAGS and not value.startswith("$"):
                    if not (ROOT / value).exists():
                        missing.append(f"{block.id}: {flag} {value}")
    assert not missing, "documented commands name files the repository does not ship:\n" + "\n".join(missing)


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation but `-` and `_` dropped, spaces to
    `-`, a repeated one numbered -1, -2, ... (fenced blocks skipped: their `#` lines are comments)."""
    seen: dict[str, int] = {}
    out, fenced = set(), False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        if fenced or not re.match(r"^#{1,6} ", line):
            continue
        title = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", line.lstrip("#").strip())
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_relative_links_and_anchors_resolve():
    """Every relative link of README.md and docs/*.md names a file of the repository, relative to the document's own
    folder (three links in docs/ were written relative to the root), and every #anchor a heading of its target."""
    broken = []
    for doc in documents():
        text = doc.read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):  # https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                file = (doc.parent / path).resolve() if path else doc
                if not file.exists():
                    broken.append(f"{doc.relative_to(ROOT)}:{n}: {target} (no such file)")
                elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file.read_text("utf-8")):
                    broken.append(f"{doc.relative_to(ROOT)}:{n}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_heading_anchors_are_githubs():
    text = "# Losses: `tpo_loss` and **DPO**\n## Set-up (CPU)\n## Set-up (CPU)\n```bash\n# not a heading\n```\n"
    assert heading_anchors(text) == {"losses-tpo_loss-and-dpo", "set-up-cpu", "set-up-cpu-1"}


COMMAND = re.compile(r"(?:tpo-fast|-m tpo_fast\.cli)\s+([a-z]+)([^`#\n]*)|python ((?:bench|scripts)/\w+\.py)([^`#\n]*)")


def _help_flags(argv: list[str]) -> set[str]:
    """The --flags a command's --help lists (its parser's own words, aliases included)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert out.returncode == 0, f"{argv} --help failed:\n{out.stderr[-2000:]}"
    return set(re.findall(r"(?<![\w-])--[a-z][\w-]*", out.stdout))


def test_documented_flags_exist():
    """Every --flag of a command written in README.md or docs/*.md (prose, inline spans, GPU and skipped blocks: those
    are never run) is one that command's parser takes: `tpo-fast <subcommand>` and `python bench/<x>.py` /
    `python scripts/<x>.py`. A renamed or removed flag in a command nobody runs went unnoticed."""
    from tpo_fast.cli import SUBCOMMANDS

    wanted: dict[tuple[str, ...], list[tuple[str, str, str]]] = {}
    for doc in documents():
        text = re.sub(r"\\\n\s*", " ", doc.read_text(encoding="utf-8"))  # a command continued on the next line
        for sub, args, script, script_args in COMMAND.findall(text):
            if sub and sub not in SUBCOMMANDS:
                continue  # "tpo-fast <subcommand> --help", prose such as "tpo-fast as ..."
            key = ("-m", "tpo_fast.cli", sub) if sub else (script,)
            for word in (args if sub else script_args).split():
                if word.startswith("--") and len(word) > 2:
                    flag = word.split("=", 1)[0].rstrip(".,;:)'\"")
                    wanted.setdefault(key, []).append((doc.name, flag, (sub or script) + (args or script_args)))
    assert wanted, "no documented command found: the pattern is broken"
    unknown = []
    for key, uses in wanted.items():
        flags = _help_flags(list(key))
        unknown += [f"{doc}: {flag} in `{' '.join(cmd.split()[:8])} ...`"
                    for doc, flag, cmd in uses if flag not in flags]
    assert not unknown, "documented flags that the command does not take:\n" + "\n".join(sorted(set(unknown)))


def test_markers_are_known():
    unknown = []
    for doc in documents():
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            s = line.strip()
            if s.startswith("<!--") and re.match(r"<!--\s*(gpu|slow|skip)\b", s) and not MARKER.match(s):
                unknown.append(f"{doc.name}:{n}: {s}")
    assert not unknown, "malformed doc markers:\n" + "\n".join(unknown)


def test_shipped_examples_are_what_the_script_writes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_examples", ROOT / "examples" / "make_examples.py")
    make_examples = importlib.util.module_from_spec(spec)
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in examples/
    try:
        spec.loader.exec_module(make_examples)
    finally:
        sys.dont_write_bytecode = dont_write
    written = make_examples.write_examples(tmp_path)
    for path in written:
        shipped = ROOT / "examples" / path.relative_to(tmp_path)
        assert shipped.exists(), f"{shipped} is not shipped; run python examples/make_examples.py"
        assert shipped.read_bytes() == path.read_bytes(), f"{shipped} differs from what make_examples.py writes"
    files = [p for p in (ROOT / "examples").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    total = sum(p.stat().st_size for p in files)
    assert total < EXAMPLES_MAX_BYTES, f"examples/ holds {total} bytes; keep it under 1 MB"
    for name in ("deepspeed/zero2.json", "deepspeed/zero3.json"):
        config = json.loads((ROOT / "examples" / name).read_text())
        assert config["zero_optimization"]["stage"] in (2, 3)
    yaml = pytest.importorskip("yaml")
    fsdp = yaml.safe_load((ROOT / "examples" / "accelerate" / "fsdp2.yaml").read_text())
    assert fsdp["fsdp_config"]["fsdp_version"] == 2
