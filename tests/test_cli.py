"""Every command line of the project (issue 30, items 3 and 4; PLAN2 interfaces 4 and 5).

Each CLI (train.py, finetune.py and every tools/*.py that runs as a program) exposes
build_parser(); walking it and its subcommands, every option and positional argument
must say what it means, and no option may use a name the flag table (docs/cli.md)
replaced: one concept, one name, in every tool.

Run: python -m pytest -q tests/test_cli.py
"""
import argparse
import importlib
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "tools"))
               if f.endswith(".py") and "__main__" in open(os.path.join(REPO, "tools", f)).read())
CLIS = ["train", "finetune"] + [f"tools.{t}" for t in TOOLS]

# docs/cli.md: the names the table replaced (no aliases: there are no users yet).
OLD_NAMES = {
    "--root": "--video-root (videos) or --image-root (images)",
    "--src": "--video-root",
    "--dst": "--out",
    "--interval": "--frame-interval",
    "--size": "--crop",
    "--vocab": "--vocab-size",
    "--ann": "--video-list, --train-list / --val-list, or --official-ann",
    "--tokenizer-vocab": "--vocab-size",
    "--allow-batch-change": "nothing: a resume that cannot keep the effective batch is an error naming the flags",
}
VALUE_NAMES = {"--list": "--video-list"}           # a list file; a --list switch (mutate.py) is another concept
FILE_METAVARS = {"PNG", "FILE", "PT", "LIST"}       # --out is always a folder; one file is --out-file
PRESETS = {"paper", "cpu"}                          # --preset is the recipe preset; x264's is --x264-preset
BROKEN_HELP = ("see the docstring", "RECIPES below")    # text that points at nothing --help shows


def parser_of(name: str) -> argparse.ArgumentParser:
    return importlib.import_module(name).build_parser()


def walk(ap: argparse.ArgumentParser, path: str = ""):
    """(command path, action) of every argument of `ap` and of its subcommands, recursively."""
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for cmd, sub in action.choices.items():
                yield from walk(sub, f"{path} {cmd}".strip())
        elif not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS:
            yield path, action


@pytest.mark.parametrize("name", CLIS)
def test_every_argument_says_what_it_means(name):
    ap = parser_of(name)
    bad = []
    for path, action in walk(ap):
        label = f"{path} {'/'.join(action.option_strings) or action.dest}".strip()
        text = re.sub(r"\(default[^)]*\)", "", action.help or "")      # a default alone says nothing
        if not re.search(r"[A-Za-z]{2}", text):
            bad.append(f"{label}: no help text")
        elif any(b in (action.help or "") for b in BROKEN_HELP):
            bad.append(f"{label}: {action.help!r} points at nothing --help shows")
    assert not bad, f"{name}: " + "; ".join(bad)


@pytest.mark.parametrize("name", CLIS)
def test_one_name_per_concept(name):
    """docs/cli.md's table: the replaced names are gone (not aliased), --out is a folder, --preset a recipe."""
    bad = []
    for path, action in walk(parser_of(name)):
        for flag in action.option_strings:
            where = f"{name} {path}".strip()
            if flag in OLD_NAMES:
                bad.append(f"{where} {flag}: use {OLD_NAMES[flag]}")
            if flag in VALUE_NAMES and action.nargs != 0:
                bad.append(f"{where} {flag}: use {VALUE_NAMES[flag]}")
            if flag == "--out" and action.metavar in FILE_METAVARS:
                bad.append(f"{where} --out {action.metavar}: --out is a folder; a file is --out-file")
            if flag == "--preset" and action.choices and not set(action.choices) <= PRESETS:
                bad.append(f"{where} --preset {sorted(action.choices)}: the recipe preset is paper | cpu; "
                           f"a model size is --model")
    assert not bad, "; ".join(bad)


def test_the_table_is_in_the_docs():
    """docs/cli.md gives the table this test enforces, each replaced name with its successor."""
    with open(os.path.join(REPO, "docs", "cli.md")) as f:
        text = f.read()
    for flag in ("--video-root", "--image-root", "--video-list", "--train-list", "--val-list", "--official-ann",
                 "--data", "--frames", "--frame-interval", "--crop", "--short-side", "--model", "--preset",
                 "--x264-preset", "--out", "--out-file", "--vocab-size", "--tokenizer", "--batch-size", "--init",
                 "--seed"):
        assert f"`{flag}`" in text, flag
    for old in OLD_NAMES:
        assert f"`{old}`" in text, old


@pytest.mark.parametrize("env, argv, words", [
    ({"RANK": "0"}, [], "plain `python tools/gpu_check.py`"),               # started under torchrun
    ({"CUDA_VISIBLE_DEVICES": ""}, [], "--cpu-dry-run"),                     # no GPU, no dry run asked for
])
def test_gpu_check_refuses_in_one_line(env, argv, words):
    """Issue 32.1: started the wrong way, the GPU check says how to start it, in one line, and runs nothing."""
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), "--out", "/nonexistent/x", *argv],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    assert not os.path.exists("/nonexistent/x")
