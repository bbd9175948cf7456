"""What every script does with an error: one line on stderr naming the file or argument, no traceback.

    if __name__ == "__main__":
        sys.exit(cli.run(main))

Usage errors (a bad flag or value) stay argparse's, exit status 2; `ArgumentParser` here prints them as one line
plus a hint instead of the whole usage block. Bad files and data (OSError, ValueError and the library's
ValueError subclasses: ConfigError, WeightsError, DataError, MediaError) and a training run that diverged
(FloatingPointError) end with `<script>: error: <message>`, exit status 1; Ctrl-C with exit status 130.
`--debug` anywhere in the arguments shows the traceback instead. Anything else (a RuntimeError, a TypeError)
is a bug and keeps its traceback.
"""

import argparse
import os
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line and a hint rather than the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n(see {self.prog} --help)\n")


def one_line(message):
    """The library's messages are one line already; a foreign multi-line one is joined rather than cut."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip()) or "(no message)"


def message(e):
    """What the user reads: the library's message, or for a bare OSError its reason and path."""
    if isinstance(e, OSError) and e.strerror:  # "[Errno 2] No such ..." is for programmers
        paths = [str(f) for f in (e.filename, e.filename2) if f is not None]
        return e.strerror + (": " + " -> ".join(paths) if paths else "")
    return one_line(e) if str(e) else type(e).__name__


def run(main, argv=None, prog=None):
    """main(argv) -> exit status, with errors turned into one line on stderr (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or os.path.basename(sys.argv[0])
    if "--debug" in argv:
        return main(argv)
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python sample.py | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")  # so that the exit-time flush of stdout does not fail again
        return 141
    except (OSError, ValueError, FloatingPointError) as e:
        print(f"{prog}: error: {message(e)}", file=sys.stderr)
        return 1


def positive_int(text):
    """argparse type: an integer > 0."""
    return _number(text, int, lambda v: v > 0, "a positive integer")


def non_negative_float(text):
    """argparse type: a number >= 0."""
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def probability(text):
    """argparse type: a number in (0, 1] (nucleus sampling's top-p)."""
    return _number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _number(text, kind, ok, what):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):  # NaN fails every comparison, so it is refused here too
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def utf8_text(text):
    """argparse type: text that is valid UTF-8. Python hands argv bytes that are not UTF-8 over as lone
    surrogates ('\\udcff' for the byte 0xff), which no tokenizer can encode; refuse them here, by position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise argparse.ArgumentTypeError(f"not valid UTF-8 ({byte} at character {e.start})") from None
    return text


def read_text(path, what):
    """A text file's contents, strictly UTF-8; errors name `what` (the flag) and the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise type(e)(f"{what} {path}: {(e.strerror or str(e)).lower()}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
