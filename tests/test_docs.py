"""The README and docs/ say what works: every command shown in a shell code block runs its `--help` and accepts
every long flag the line spells; every relative link points to a file that exists; the README stays short."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import runpy
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest

from gliograde.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_BYTES = 12 * 1024

SHELL_LANGS = {"", "bash", "console", "sh", "shell", "shell-session"}
FENCE = re.compile(
    r"^(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S
)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\((?P<image>[^)\s]+)\)")
# the seeds' scripts and what they run (tests below check they do run it)
SCRIPTS = {
    "scripts/training/train_resnet50_3d.py": "train",
    "scripts/evaluation/evaluate_fold.py": "evaluate",
}
SKIPPED = {"pip", "pip3", "make", "torchrun", "srun", "git", "cd", "export", "tensorboard", "sbatch", "source", "."}


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m["lang"].lower(), m["body"]) for m in FENCE.finditer(text)]


def logical_lines(body: str) -> list[str]:
    """Lines of a shell block with `\\` continuations joined and `$ ` prompts removed."""
    out, pending = [], ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if not pending:
            line = re.sub(r"^\s*[$>] ", "", line)
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((pending + line).strip())
        pending = ""
    if pending:
        out.append(pending.strip())
    return [line for line in out if line]


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at &&, ||, ; and a spaced |), comments dropped, as token lists.

    A `|` inside a word is no pipe here: `[--checkpoint auto|best|best_ema]` is usage notation."""
    try:
        lexer = shlex.shlex(line, posix=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: not a shell line (a log excerpt or a tree)
        return []
    commands, current = [], []
    for tok in tokens:
        if tok in ("&&", "||", ";", "|", "&"):
            commands.append(current)
            current = []
        elif tok.endswith(";"):
            commands.append([*current, tok[:-1]])
            current = []
        else:
            current.append(tok)
    commands.append(current)
    return [c for c in commands if c]


def invocation(tokens: list[str]) -> tuple[str, str | None, list[str]] | None:
    """(kind, target, args) for a gliograde invocation, None for anything else.

    kind is 'cli' (target: the subcommand or None), 'script' (target: the script path) or 'module' (target: a
    gliograde module other than the CLI, run with python -m)."""
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens:
        return None
    head = Path(tokens[0]).name
    if head == "gliograde":
        return "cli", None, tokens[1:]
    if not re.fullmatch(r"python(3(\.\d+)?)?", head) or len(tokens) < 2:
        return None
    if tokens[1] == "-m" and len(tokens) > 2:
        module = tokens[2]
        if module in ("gliograde", "gliograde.cli"):
            return "cli", None, tokens[3:]
        if module.startswith("gliograde."):
            return "module", module, tokens[3:]
        return None
    if tokens[1].startswith("scripts/"):
        return "script", tokens[1], tokens[2:]
    return None


def shell_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(line, tokens) of every command in the shell code blocks of a page."""
    found = []
    for lang, body in code_blocks(path.read_text(encoding="utf-8")):
        if lang not in SHELL_LANGS:
            continue
        for line in logical_lines(body):
            for tokens in split_commands(line):
                found.append((line, tokens))
    return found


def documented_invocations() -> list[tuple[str, str, str, str | None, list[str]]]:
    """(page, line, kind, target, args) of every gliograde invocation shown in a code block."""
    out = []
    for page in PAGES:
        for line, tokens in shell_commands(page):
            inv = invocation(tokens)
            if inv is not None:
                out.append((rel(page), line, *inv))
    return out


def long_flags(args: list[str]) -> list[str]:
    """Every long flag a command line spells, optional ones in [brackets] and `|` alternatives included."""
    flags = []
    for tok in args:
        for part in re.split(r"[\[\]|]", tok):
            m = re.match(r"(--[A-Za-z][\w-]*)", part)
            if m:
                flags.append(m.group(1))
    return flags


@cache
def parser_options() -> tuple[set[str], dict[str, set[str]]]:
    parser = build_parser()
    top = {s for a in parser._actions for s in a.option_strings}
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return top, {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def subcommand(args: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(global flags, subcommand, its arguments) of `gliograde [--debug] COMMAND ...`."""
    for i, tok in enumerate(args):
        if not tok.startswith("-"):
            return args[:i], tok, args[i + 1 :]
    return args, None, []


def run_help(fn) -> str:
    """Call fn (which parses `--help`) and return what it printed; it must exit with status 0."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        fn()
    assert exc.value.code in (0, None), f"--help exited with {exc.value.code}"
    return buf.getvalue()


@cache
def cli_help(command: str | None) -> str:
    return run_help(lambda: main([command, "--help"] if command else ["--help"]))


@cache
def script_help(script: str) -> str:
    path = REPO / script
    assert path.is_file(), f"{script} does not exist"
    saved = sys.argv
    sys.argv = [str(path), "--help"]
    try:
        return run_help(lambda: runpy.run_path(str(path), run_name="__main__"))
    finally:
        sys.argv = saved


@cache
def module_help(module: str) -> str:
    saved = sys.argv
    sys.argv = [module, "--help"]
    try:
        return run_help(lambda: runpy.run_module(module, run_name="__main__", alter_sys=False))
    finally:
        sys.argv = saved


INVOCATIONS = documented_invocations()


def case_id(page: str, line: str) -> str:
    return f"{page}: {' '.join(line.split())[:70]}"


def test_pages_exist_and_show_commands():
    assert README.is_file() and DOCS, "README.md and docs/*.md are the documentation"
    assert len(INVOCATIONS) >= 30, f"only {len(INVOCATIONS)} documented commands found: is the parser broken?"
    kinds = {(kind, target) for _, _, kind, target, _ in INVOCATIONS}
    assert ("script", "scripts/training/train_resnet50_3d.py") in kinds
    assert ("script", "scripts/evaluation/evaluate_fold.py") in kinds


@pytest.mark.parametrize(
    ("page", "line", "kind", "target", "args"),
    INVOCATIONS,
    ids=[case_id(p, line) for p, line, *_ in INVOCATIONS],
)
def test_documented_command_runs_and_takes_its_flags(page, line, kind, target, args):
    top, subs = parser_options()
    flags = long_flags(args)
    if kind == "cli":
        global_flags, command, rest = subcommand(args)
        if command is None:
            cli_help(None)
            unknown = [f for f in flags if f not in top]
        else:
            assert command in subs, f"{page}: `{line}`: gliograde has no command {command!r} ({sorted(subs)})"
            assert cli_help(command).startswith(f"usage: gliograde {command}")
            unknown = [f for f in long_flags(global_flags) if f not in top]
            unknown += [f for f in long_flags(rest) if f not in subs[command]]
    elif kind == "script":
        assert target in SCRIPTS, f"{page}: `{line}`: {target} is not one of the seeds' scripts {sorted(SCRIPTS)}"
        command = SCRIPTS[target]
        assert script_help(target).startswith(f"usage: gliograde {command}"), f"{target} does not run {command}"
        unknown = [f for f in flags if f not in subs[command]]
    else:
        text = module_help(target)
        unknown = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not unknown, f"{page}: `{line}`: flags not accepted: {unknown}"


def test_seed_scripts_run_their_command():
    for script, command in SCRIPTS.items():
        assert script_help(script).startswith(f"usage: gliograde {command}")


def test_python_blocks_run(monkeypatch, tmp_path):
    """Python shown in the docs runs as written (the seeds' `from models.resnet50_3d_fast.model import
    ResNet50_3D` among it), from a folder without pretrained weights: a warning and random initialisation."""
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)
    ran = 0
    for page in PAGES:
        for lang, body in code_blocks(page.read_text(encoding="utf-8")):
            if lang not in ("python", "py"):
                continue
            code = compile(body, rel(page), "exec")
            with contextlib.redirect_stdout(io.StringIO()):
                exec(code, {"__name__": "__docs__"})
            ran += "models.resnet50_3d_fast.model" in body
    assert ran, "no python block imports the seeds' models.resnet50_3d_fast.model"


def test_readme_is_short_and_keeps_the_two_commands():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; at most {README_MAX_BYTES}: move detail to docs/"
    commands = {" ".join(tokens) for _, tokens in shell_commands(README)}
    assert "make demo" in commands and "make test" in commands


def test_readme_lists_every_docs_page():
    linked = set()
    for m in LINK.finditer(README.read_text(encoding="utf-8")):
        target = (m["target"] or m["image"]).split("#")[0]
        if target.startswith("docs/"):
            linked.add(target)
    pages = {rel(p) for p in DOCS}
    assert pages <= linked, f"docs pages missing from the README's table of contents: {sorted(pages - linked)}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M)}


def test_relative_links_point_to_existing_files():
    broken = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for m in LINK.finditer(text):
            target = m["target"] or m["image"]
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{rel(page)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{rel(page)}: {target} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


PLACEHOLDER = re.compile(r"[\[\]]|\.\.\.|=[A-Z]")


def dry_runnable() -> list[tuple[str, str, str, list[str]]]:
    """(page, line, how, args) of the documented `train` / `cv` lines (the seeds' training script included) that
    name concrete values only: no [optional] parts, no PLACEHOLDERS, nothing to resume or read."""
    out = []
    for page, line, kind, target, args in INVOCATIONS:
        if kind == "script" and SCRIPTS.get(target) == "train":
            how = target
        elif kind == "cli" and subcommand(args)[1] in ("train", "cv"):
            how = "cli"
        else:
            continue
        if any(PLACEHOLDER.search(tok) for tok in args) or {"--resume", "--config", "--status"} & set(args):
            continue
        out.append((page, line, how, args))
    return out


DRY = dry_runnable()


@pytest.mark.parametrize(("page", "line", "how", "args"), DRY, ids=[case_id(p, line) for p, line, *_ in DRY])
def test_documented_training_line_resolves(page, line, how, args, tmp_path, monkeypatch, capsys):
    """`--dry-run` resolves and validates the whole configuration without data: the values, not only the flags,
    are accepted as written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GLIOGRADE_DATA", raising=False)
    if how == "cli":
        rc = main([*args, "--dry-run"])
    else:
        monkeypatch.setattr(sys, "argv", [str(REPO / how), *args, "--dry-run"])
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(REPO / how), run_name="__main__")
        rc = exc.value.code
    assert rc in (0, None), f"{page}: `{line}` --dry-run exited {rc}: {capsys.readouterr().err}"
