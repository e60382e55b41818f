"""The docs name only what exists: repo paths, `python -m` modules and the flags of `pdserve` commands.

Checked: README.md and docs/*.md except docs/benchmarks.md, which is a dated log whose older sections name
files and flags that were deleted or renamed since, and must keep saying what was measured then.

- A backticked path (`engine/scheduler.py`, `kernels/attention/`, `*/actor.py`) whose first part is a
  top-level entry of the repository must exist; one that starts with another of its folders and ends in a file
  suffix (`quantize/projections.py`, relative to the package the text is about) must be the tail of some
  file's path; `engine/tp/kv_shards.gather_layer` must be a module defining that name.
- `python -m X.Y` of a repo package must be a module or a package with `__main__.py` (others are skipped).
- A `--flag` after `pdserve up|generate|info|scale|bench` in the same code span or code line, or in the first
  column of a table under a "`pdserve X` flags" heading, must be an option of that command's argparse parser,
  built the way the CLI builds it (nothing is started).
A failure names the doc, the line and the missing name.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "README.md", *(p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "benchmarks.md"))
TOP_LEVEL = frozenset(p.name for p in ROOT.iterdir() if not p.name.startswith("."))
COMMANDS = ("up", "generate", "info", "scale", "bench")

FENCE = re.compile(r"^\s*```")
INLINE_CODE = re.compile(r"`([^`]+)`")
PATH = re.compile(r"^\*?[\w.*-]*(/[\w.*-]+)+/?$|^[\w.-]+/$")
FILE_SUFFIX = re.compile(r"\.(py|c|h|md|yaml|yml|json|jsonl|proto|toml|txt|safetensors|gguf)$")
MODULE = re.compile(r"python\s+-m\s+([A-Za-z_][\w.]*)")
COMMAND = re.compile(r"\bpdserve\s+(" + "|".join(COMMANDS) + r")\b")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
FLAGS_HEADING = re.compile(r"^#+ .*`pdserve (\w+)` flags")
COMMENT = re.compile(r"\s#\s.*$")  # a shell comment in a code block: its words are not arguments


@dataclass(frozen=True)
class Snippet:
    """Code as a doc shows it: an inline code span or one line of a fenced block."""
    doc: Path
    line: int
    text: str

    def where(self) -> str:
        return f"{_name(self.doc)}:{self.line}"


def _name(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix() if doc.is_relative_to(ROOT) else str(doc)


def _line_of(text: str, offset: int, first_line: int) -> int:
    return first_line + text.count("\n", 0, offset)


def snippets(doc: Path) -> Iterator[Snippet]:
    """Inline code spans (they may wrap lines, so paragraphs are scanned whole) and fenced code lines (a line
    ending in a backslash continues on the next, as in a shell)."""
    lines = doc.read_text().splitlines()
    in_fence = False
    paragraph: list[str] = []
    start = 0
    command = ""  # a fenced command continued over lines, and where it started
    command_start = 0

    def flush() -> Iterator[Snippet]:
        text = "\n".join(paragraph)
        for m in INLINE_CODE.finditer(text):
            yield Snippet(doc, _line_of(text, m.start(), start), m.group(1).replace("\n", " "))
        paragraph.clear()

    for number, line in enumerate(lines, start=1):
        if FENCE.match(line):
            yield from flush()
            if command:  # a block's last line ended in a backslash
                yield Snippet(doc, command_start, command)
                command = ""
            in_fence = not in_fence
        elif in_fence:
            command_start = command_start if command else number
            command += COMMENT.sub("", line)
            if command.endswith("\\"):
                command = command[:-1] + " "
            else:
                yield Snippet(doc, command_start, command)
                command = ""
        elif line.strip():
            if not paragraph:
                start = number
            paragraph.append(line)
        else:
            yield from flush()
    yield from flush()


@cache
def all_files() -> tuple[str, ...]:
    return tuple(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
                 if p.is_file() and not {".venv", ".git", "__pycache__"} & set(p.parts))


@cache
def dir_names() -> frozenset[str]:
    return frozenset(part for f in all_files() for part in f.split("/")[:-1])


def defines(file: Path, symbol: str) -> bool:
    """Whether a Python file defines `symbol`: a def or class at any depth, or a top-level assignment."""
    pattern = rf"^\s*(def|class)\s+{re.escape(symbol)}\b|^{re.escape(symbol)}\s*[:=]"
    return file.is_file() and re.search(pattern, file.read_text(), re.MULTILINE) is not None


def path_problem(name: str) -> str | None:
    """Why a path-like code span names nothing in the tree, or None if it does (or is not ours to check)."""
    head, _, last = name.rpartition("/")
    if "." in last and not FILE_SUFFIX.search(last) and last.count(".") == 1 and not last.startswith("."):
        module, symbol = last.split(".")  # `engine/tp/kv_shards.gather_layer`: a module's function or class
        file = ROOT / head / f"{module}.py"
        if not file.is_file():
            return f"no such module {head}/{module}.py"
        return None if defines(file, symbol) else f"{head}/{module}.py defines no {symbol}"
    first = name.split("/")[0]
    if first in TOP_LEVEL or first.startswith("*"):
        exists = any(ROOT.glob(name.rstrip("/"))) if "*" in name else (ROOT / name).exists()
    elif first in dir_names() and FILE_SUFFIX.search(name):  # relative to the package the text is about
        exists = any(f == name or f.endswith("/" + name) for f in all_files())
    else:
        return None  # not a repo path (an URL path, another project's file)
    return None if exists else "no such path"


def missing_paths(doc: Path) -> list[str]:
    found = []
    for s in snippets(doc):
        name = s.text.strip()
        if PATH.match(name) and not name.startswith("/") and (problem := path_problem(name)):
            found.append(f"{s.where()}: `{name}`: {problem}")
    return found


def missing_modules(doc: Path) -> list[str]:
    text = doc.read_text()
    found = []
    for m in MODULE.finditer(text):
        module = m.group(1).rstrip(".")
        parts = module.split(".")
        if parts[0] not in TOP_LEVEL:
            continue  # not ours (pytest, grpc_tools.protoc, ...)
        base = ROOT.joinpath(*parts)
        if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
            found.append(f"{_name(doc)}:{_line_of(text, m.start(), 1)}: no module `python -m {module}`")
    return found


@cache
def command_options(command: str) -> frozenset[str]:
    """The option strings of a `pdserve` command's parser, built as `pdserve` builds it."""
    if command == "bench":
        from bench.serving.run import build_parser as bench_parser
        parser = bench_parser()
    else:
        from deploy.cli import build_parser
        argv = [command, "prompt"] if command == "generate" else [command]
        parser = build_parser().parse_args(argv).command_parser
    # argparse keeps a parser's options only in _actions; parsing a doc's flag would need its value too.
    return frozenset(option for action in parser._actions for option in action.option_strings)


def attributed_flags(doc: Path) -> Iterator[tuple[str, str, str]]:
    """(where, command, flag) for each flag the doc gives a `pdserve` command."""
    for s in snippets(doc):
        commands = list(COMMAND.finditer(s.text))
        ends = [m.start() for m in commands[1:]] + [len(s.text)] if commands else []
        for m, end in zip(commands, ends, strict=True):
            segment = s.text[m.end():end]
            for flag in FLAG.findall(segment):
                yield s.where(), m.group(1), flag
    table_command = None
    for number, line in enumerate(doc.read_text().splitlines(), start=1):
        if line.startswith("#"):
            heading = FLAGS_HEADING.match(line)
            table_command = heading.group(1) if heading else None
        elif table_command and line.startswith("|"):
            first_cell = re.split(r"(?<!\\)\|", line)[1]
            for flag in FLAG.findall(first_cell):
                yield f"{_name(doc)}:{number}", table_command, flag


def unknown_flags(doc: Path) -> list[str]:
    return [f"{where}: `pdserve {command}` has no option {flag}"
            for where, command, flag in attributed_flags(doc) if flag not in command_options(command)]


def _ids(docs: tuple[Path, ...]) -> list[str]:
    return [_name(d) for d in docs]


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_backticked_paths_exist(doc: Path) -> None:
    assert not (problems := missing_paths(doc)), "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_python_m_modules_exist(doc: Path) -> None:
    assert not (problems := missing_modules(doc)), "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_pdserve_flags_are_accepted(doc: Path) -> None:
    assert not (problems := unknown_flags(doc)), "\n".join(problems)


def test_the_checks_see_what_they_check() -> None:
    """A check that finds nothing to check passes vacuously: the docs do name paths, modules and flags."""
    assert sum(1 for d in DOCS for s in snippets(d) if PATH.match(s.text.strip())) > 50
    assert any(MODULE.search(d.read_text()) for d in DOCS)
    flags = {(command, flag) for d in DOCS for _, command, flag in attributed_flags(d)}
    assert {("up", "--spec"), ("generate", "--max-tokens"), ("bench", "--rate")} <= flags
    assert "--spec-tree" in command_options("up")


def test_a_wrong_name_is_reported_with_doc_and_line(tmp_path: Path) -> None:
    doc = tmp_path / "wrong.md"
    doc.write_text("# x\n\nSee `engine/no_such.py` and\n`python -m engine.no_such`, "
                   "`engine/scheduler.NoSuch`.\n\n"
                   "```\npdserve up --no-such-flag 1   # --also-not-checked\n```\n")
    assert missing_paths(doc) == [
        f"{doc}:3: `engine/no_such.py`: no such path",
        f"{doc}:4: `engine/scheduler.NoSuch`: engine/scheduler.py defines no NoSuch",
    ]
    assert missing_modules(doc) == [f"{doc}:4: no module `python -m engine.no_such`"]
    assert unknown_flags(doc) == [f"{doc}:7: `pdserve up` has no option --no-such-flag"]
