"""Every script's --help shows the default of each option that has one (not None, not False).

Each script's parser is caught as it is about to parse (nothing runs), then each option's help text is
formatted as --help prints it and must contain the default.
"""

import argparse
import os
import runpy

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {  # script -> (file or module, function that builds and parses the arguments)
    "sample.py": ("sample.py", "main"),
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
