"""The scripts' command lines: every --help shows the default of each option that has one (not None, not
False); minterleave/cli.py turns errors into one line; the README's "Errors" matrix names tests that exist.

Each script's parser is caught as it is about to parse (nothing runs), then each option's help text is
formatted as --help prints it and must contain the default.
"""

import argparse
import ast
import os
import re
import runpy

import pytest

from minterleave import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {  # script -> (file or module, function that builds and parses the arguments)
    "sample.py": ("sample.py", "main"),
    "serve.py": ("serve.py", "main"),
    "bench.py": ("bench.py", "main"),
    "eval.py": ("eval.py", "main"),
    "train.py": ("train.py", "main"),
    "weights/download.py": ("weights/download.py", "main"),
    "bench_attention": ("minterleave.kernels.bench_attention", "main"),
    "tune_attention": ("minterleave.kernels.tune_attention", "main"),
}


class Parsing(Exception):
    pass


def parser_of(script, monkeypatch):
    where, fn = SCRIPTS[script]
    if where.endswith(".py"):
        scope = runpy.run_path(os.path.join(ROOT, where))  # not as __main__: defines, runs nothing
    else:
        scope = runpy.run_module(where)
    seen = []

    def catch(self, args=None, namespace=None):
        seen.append(self)
        raise Parsing

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(Parsing):
        scope[fn]([])
    return seen[0]


def shown(parser, action):
    """The option's lines of --help, whitespace removed (argparse wraps long help text anywhere)."""
    formatter = parser._get_formatter()
    formatter.add_argument(action)
    return "".join(formatter.format_help().split())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    parser = parser_of(script, monkeypatch)
    missing = []
    for action in parser._actions:
        default = action.default
        if isinstance(action, argparse._HelpAction) or default is None or default is False or default == [] \
                or default == argparse.SUPPRESS:
            continue
        if "".join(str(default).split()) not in shown(parser, action):
            missing.append(f"{'/'.join(action.option_strings) or action.dest} (default {default!r})")
    assert not missing, f"{script} --help does not show the default of {missing}"


# ---------------------------------------------------------------- minterleave/cli.py: what a script does with an error

def failing(exc):
    def main(argv):
        raise exc
    return main


@pytest.mark.parametrize("exc, status, line", [
    (FileNotFoundError("image file not found: a.png"), 1, "s.py: error: image file not found: a.png"),
    (FileNotFoundError(2, "No such file or directory", "a.png"), 1, "s.py: error: No such file or directory: a.png"),
    (OSError(28, "No space left on device"), 1, "s.py: error: No space left on device"),
    (ValueError("first\nsecond"), 1, "s.py: error: first; second"),  # a foreign multi-line message: one line
    (FloatingPointError("step 3: the loss is nan"), 1, "s.py: error: step 3: the loss is nan"),  # train.py's stop
    (KeyboardInterrupt(), 130, "s.py: interrupted"),
])
def test_run_turns_errors_into_one_line(capsys, exc, status, line):
    assert cli.run(failing(exc), [], prog="s.py") == status
    assert capsys.readouterr().err.strip() == line


def test_run_returns_mains_status_and_keeps_tracebacks_for_bugs_and_debug(capsys):
    assert cli.run(lambda argv: 0, [], prog="s.py") == 0
    with pytest.raises(RuntimeError):  # not bad input: a bug, with its traceback
        cli.run(failing(RuntimeError("bug")), [], prog="s.py")
    with pytest.raises(ValueError):
        cli.run(failing(ValueError("bad")), ["--debug"], prog="s.py")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kind, good, bad", [
    (cli.positive_int, {"1": 1, "64": 64}, ["0", "-1", "1.5", "x"]),
    (cli.non_negative_float, {"0": 0.0, "0.7": 0.7}, ["-0.1", "nan", "x"]),
    (cli.probability, {"1": 1.0, "0.9": 0.9}, ["0", "1.01", "nan", "-1"]),
    (cli.utf8_text, {"café": "café"}, ["caf\udcff"]),
])
def test_argument_types(kind, good, bad):
    for text, value in good.items():
        assert kind(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)


def test_usage_error_is_one_line_and_a_hint(capsys):
    p = cli.ArgumentParser(prog="s.py")
    p.add_argument("--n", type=cli.positive_int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["s.py: error: argument --n: expected a positive integer, got 0",
                                                    "(see s.py --help)"]


def test_readme_errors_table_names_tests_that_exist():
    """Every row of the README's "Errors" matrix names a test, and every test it names exists."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("\n## Errors")[1].split("\n## ")[0]
    named = re.findall(r"(test_\w+\.py)::(test_\w+)", section)
    assert len(named) >= 40, "the Errors section lists the bad-input matrix, each row with its test"
    missing = []
    for file, test in sorted(set(named)):
        path = os.path.join(ROOT, "tests", file)
        defined = {n.name for n in ast.parse(open(path, encoding="utf-8").read()).body
                   if isinstance(n, ast.FunctionDef)} if os.path.isfile(path) else set()
        if test not in defined:
            missing.append(f"{file}::{test}")
    assert not missing, f"README's Errors table names tests that do not exist: {missing}"
    matrix = section.split("\n| input |")[1].split("\n\n")[0].splitlines()[2:]  # the rows below the header
    untested = [row.split("|")[1].strip() for row in matrix if "::" not in row]
    assert not untested, f"rows of README's Errors matrix without a test: {untested}"
