"""The docs agree with the code and with the files they cite: every `minigpt ...` command shown in
README.md and docs/*.md is one the command line accepts, and every figure the README quotes next to
a file it cites is in that file."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from minigpt_core.cli.app import build_parser, main
from training_utils import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# -- commands ------------------------------------------------------------------------------------------
def _doc_commands() -> list[tuple[str, str]]:
    """(page, arguments after `minigpt`) of every minigpt command in the pages' code blocks: a line that
    starts with `minigpt` (or `.venv/bin/minigpt`, `$ minigpt`), or runs it after `&&` or as `-m minigpt`."""
    found = []
    for page in PAGES:
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M):
            for line in re.sub(r"\\\n", " ", block).splitlines():  # continued lines are one command
                m = re.search(r"(?:^|&&\s*|\s-m\s+|^\$\s+)(?:\S*/)?minigpt\s+(.*)", line.strip())
                if m:
                    found.append((page.name, m.group(1)))
    return found


def _subcommand(argv: list[str]) -> str:
    args = list(argv)
    while args and args[0] == "--plugin":  # the one option accepted before the command
        args = args[2:]
    return args[0]


COMMANDS = _doc_commands()
SUBCOMMANDS = sorted({_subcommand(shlex.split(c, comments=True)) for _, c in COMMANDS})


def test_the_docs_show_commands():
    assert len(COMMANDS) > 50 and {"train", "sample", "ablate", "check", "new-plugin"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_documented_subcommand_has_help_naming_files_that_exist(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0, f"minigpt {name} --help: {out}"
    assert f"usage: minigpt {name}" in out
    # A file the help gives as an example must be one we ship (it once named experiments/ablations/norms.toml).
    for path in re.findall(r"\b((?:experiments|docs|benchmarks)/[\w./-]+\.(?:toml|md|py))", out):
        assert (ROOT / path).is_file(), f"minigpt {name} --help names {path}, which does not exist"


def test_every_documented_command_line_parses():
    """Options, their values' types and choices as written; nothing runs. A synopsis line (`[--out DIR]`,
    `(--text ... | --file FILE)`) is checked option by option against its command's options."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    problems = []
    for page, command in COMMANDS:
        argv = shlex.split(command, comments=True)
        if re.search(r"\[--|\(--| \| ", command):  # a synopsis
            known = {s for a in subparsers[_subcommand(argv)]._actions for s in a.option_strings}
            problems += [f"{page}: minigpt {command}: {o} is not an option"
                         for o in re.findall(r"--[\w-]+", command) if o not in known]
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(argv)
        except SystemExit:
            problems.append(f"{page}: minigpt {command}: {err.getvalue().strip().splitlines()[-1]}")
    assert not problems, "\n".join(problems)


# -- figures -------------------------------------------------------------------------------------------
# Durations, ratios, percentages, numbers with thousands commas and decimals; a plain integer ("800
# steps", "2 CPU cores") is not a quoted figure.
FIGURE = re.compile(r"\d+(?:\.\d+)?\s(?:minutes|s)\b|\d+(?:\.\d+)?x\b|[+-]?\d+(?:\.\d+)?\s?%|\d{1,3}(?:,\d{3})+|\d+\.\d+")
LINK = re.compile(r"\]\(([^)#\s]+)\)")
TICKED = re.compile(r"`([\w./-]+\.(?:md|toml|py|txt|jsonl|tsv))`")


def _cited_files(line: str) -> list[Path]:
    files = []
    for name in LINK.findall(line) + TICKED.findall(line):
        # a path from the repository root, or an experiment file by its name (`classify.toml`)
        for path in (ROOT / name, *sorted((ROOT / "experiments").rglob(Path(name).name))):
            if path.is_file() and path.suffix not in (".png", ".html"):
                files.append(path)
                break
    return files


def _squeeze(text: str) -> str:
    """Spacing aside: '3.3 M' is '3.3M', '84.0 %' is '84.0%'."""
    return re.sub(r"(\d)\s+(?=[%A-Za-z])", r"\1", text)


def _quoted_figures() -> list[tuple[int, str, list[Path]]]:
    lines, in_code, out = (ROOT / "README.md").read_text(encoding="utf-8").splitlines(), False, []
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_code = not in_code
        if in_code or line.startswith("```"):
            continue
        files = _cited_files(line)
        out += [(number, figure, files) for figure in FIGURE.findall(line)] if files else []
    return out


def test_every_figure_the_readme_quotes_is_in_the_file_it_cites():
    """The convention: a line of the README's prose, or a row of one of its tables, that names a file (a
    markdown link to it, or its path in backticks: `experiments/quickstart.toml`; an experiment file
    may be named alone, `classify.toml`) cites that file for every figure on the same line. A figure is
    a duration ("6 minutes", "33 s"), a ratio ("1.10x"), a percentage ("83.2%"), a number with
    thousands commas or a decimal point; each must appear in one of the line's cited files as a whole
    number (spaces before a unit or % ignored). Quote a measurement next to the file that records it,
    or record it in the file you cite (an experiment file's header comment says what it measured)."""
    quoted = _quoted_figures()
    assert len(quoted) >= 8  # the fine-tuning table, the quickstart, int8
    missing = []
    for number, figure, files in quoted:
        want = re.compile(r"(?<![\d.,])" + re.escape(_squeeze(figure)) + r"(?![\d])")
        if not any(want.search(_squeeze(f.read_text(encoding="utf-8"))) for f in files):
            missing.append(f"README.md:{number}: {figure} is in none of {[str(f.relative_to(ROOT)) for f in files]}")
    assert not missing, "\n".join(missing)


def test_the_figure_check_catches_a_figure_its_file_does_not_hold(tmp_path):
    """The check itself: a changed figure in a cited file is found (classify_lora.toml once said 84.0%)."""
    lora = (ROOT / "experiments/finetune/classify_lora.toml").read_text(encoding="utf-8")
    assert re.search(r"(?<![\d.,])83\.2%", _squeeze(lora))
    assert not re.search(r"(?<![\d.,])84\.0%", _squeeze(lora))
    row = "| `classify_lora.toml` (`peft.lora` rank 16, 15% train) | 67 s | 83.2% test accuracy |"
    assert FIGURE.findall(row) == ["15%", "67 s", "83.2%"]
    assert [f.name for f in _cited_files(row)] == ["classify_lora.toml"]


# -- set-up ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_installs_minigpt_without_the_test_tools(tmp_path):
    """`make run` on a fresh machine (a venv that does not exist yet), as `make -n` plans it: minigpt
    itself, not the dev extra (transformers, selenium, PEFT, ...) that only the tests need."""
    def plan(target):
        proc = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                              text=True, check=True)
        return [line for line in proc.stdout.splitlines() if "pip install" in line and "torch==" not in line]

    assert plan("run") == [f"{tmp_path / 'venv'}/bin/python -m pip install -q -e ."]
    assert any('".[dev]"' in line for line in plan("test"))
