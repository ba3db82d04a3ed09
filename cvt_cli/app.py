"""The `cvt` command (also `python -m cvt_cli`): the one parser and the one mapping from errors to exit codes.

    cvt --version
    cvt convert SRC DST [--from ...] [--to torch|hf-tf|keras|all] [--config PRESET_OR_JSON] [--dtype ...] [--force]
    cvt verify DIR
    cvt export SRC DST [--format onnx|torch-export|saved-model|tflite|all] [--image-size H W] [--opset N] ...
    cvt demo [--preset cvt-13] [--out DIR]
    cvt train [--data DIR] [--framework torch|keras] ...
    cvt predict IMAGE... --model DIR [--top-k K] [--json]
    cvt attention IMAGE --model DIR [--out PNG] [--stage S ...] [--layer L]

Each command is a module of this package with `register(subparsers)`, which sets `args.run(args) -> int`.
Exit status: 0 success; 1 a cross-check found outputs beyond tolerance (nothing is written); 2 a usage or input
error, reported as one line `cvt: error: <file>: <problem>` on stderr; 130 interrupted (Ctrl-C, SIGTERM or
SIGHUP), with every temporary file removed and no destination written unless the line says it was (an interrupt
that arrives while a destination is renamed into place is held back until the rename is done).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from typing import List, Optional

from conversion import progress
from conversion.atomic import (committed_destinations, interrupt_requested, raise_if_interrupted, request_interrupt,
                               running_command)
from conversion.errors import ConversionError, CrossCheckFailed, describe, one_line
from cvt_core.checkpoint import CheckpointError
from cvt_core.shapes import ModelTooLargeError
from cvt_core.weights import WeightLoadError

from . import attention, convert, demo, export, predict, train, verify
from .data import DatasetError

PROG = "cvt"
COMMANDS = (convert, verify, export, demo, train, predict, attention)
DISTRIBUTION = "cvt-dual"
# The frameworks `cvt --version` reports, read from their installed metadata (none is imported)
FRAMEWORK_DISTRIBUTIONS = ("torch", "tensorflow", "keras", "transformers")


def _source_tree_version() -> Optional[str]:
    """The version in the pyproject.toml beside the package, for a source tree that is not installed."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = project and re.search(r"^version\s*=\s*[\"']([^\"']+)[\"']", project.group(1), re.M)
    return found.group(1) if found else None


def version_text() -> str:
    """What `cvt --version` prints: `cvt <version>`, then the installed frameworks' versions."""
    from importlib import metadata

    try:
        own = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        own = _source_tree_version() or "(unknown version: not installed and no pyproject.toml found)"
    found = []
    for name in FRAMEWORK_DISTRIBUTIONS:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    installed = ", ".join(found) if found else "none of " + ", ".join(FRAMEWORK_DISTRIBUTIONS)
    return f"{PROG} {own}\ninstalled: {installed}"


class _Version(argparse.Action):
    """`--version`: print `version_text()` as it is (argparse's own action rewraps it) and exit 0."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit(0)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as the one-line `cvt: error: ...` with status 2."""

    def error(self, message: str):  # argparse's hook
        raise ConversionError(None, one_line(message) + f" (see `{PROG} {self._sub_name()}--help`)")

    def _sub_name(self) -> str:
        parts = self.prog.split()
        return (parts[1] + " ") if len(parts) > 1 else ""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="CvT in PyTorch and Keras 3: checkpoints between transformers PyTorch, "
                                            "transformers TF, Keras 3 and the original microsoft/CvT format with a "
                                            "cross-check that both frameworks compute the same outputs; training and "
                                            "prediction in either framework.")
    parser.add_argument("--version", action=_Version,
                        help=f"print the version of {PROG} and of the frameworks installed beside it, and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser,
                                metavar="{" + ",".join(c.__name__.rsplit(".", 1)[1] for c in COMMANDS) + "}",
                                help="the command to run; `cvt COMMAND --help` lists its arguments")
    for command in COMMANDS:
        command.register(sub)
    return parser


# Signals that stop a command: Ctrl-C, SIGTERM (kill, a scheduler) and SIGHUP (a closed terminal), each unless the
# process was started with it ignored (nohup)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _on_sigterm(signum, frame):
    """The handler of every stop signal: remember the request (so that nothing is renamed into place after it,
    even if the exception is lost in a callback that CPython silences) and raise KeyboardInterrupt."""
    request_interrupt()
    raise KeyboardInterrupt


def _interrupted_message() -> str:
    written = committed_destinations()
    if not written:
        return "interrupted; nothing was written"
    return f"interrupted after {', '.join(written)} was written in full; nothing else was written"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `cvt`; returns the exit status."""
    parser = build_parser()
    previous = {}
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        progress.set_enabled(not args.quiet)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        for signum in STOP_SIGNALS:
            try:
                if signal.getsignal(signum) != signal.SIG_IGN:  # `nohup cvt ...` keeps ignoring SIGHUP
                    previous[signum] = signal.signal(signum, _on_sigterm)
            except ValueError:  # not the main thread
                break
        with running_command(f"{PROG} {args.command}"):
            status = int(args.run(args))
            raise_if_interrupted()  # an interrupt whose exception was lost: still an interrupt
            return status
    except BaseException as exc:
        # A signal's KeyboardInterrupt raised inside a framework (TensorFlow's graph tracing, an import) may come out
        # as another exception: once an interrupt was requested, whatever ends the command is that interrupt.
        if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, Exception) and interrupt_requested()):
            _error(_interrupted_message())
            return 130
        if isinstance(exc, (ConversionError, DatasetError)):
            _error(str(exc))
            return 2
        if isinstance(exc, CrossCheckFailed):
            return 1
        if isinstance(exc, (OSError, CheckpointError, WeightLoadError, ModelTooLargeError)):  # user-caused
            _error(str(describe(exc, getattr(exc, "filename", None))))
            return 2
        if isinstance(exc, MemoryError):
            _error(f"out of memory ({str(exc)[:200] or 'MemoryError'}): the input or the model is larger than this "
                   f"machine can hold; nothing was written")
            return 2
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        progress.set_enabled(True)


def run() -> None:
    """The process entry of `cvt` (the console script and `python -m cvt_cli`): `main()`'s status becomes the exit
    status. An interrupted command ends with `os._exit(130)` once its output is flushed: CPython ends a process by
    SIGINT, whatever the program returned, once a KeyboardInterrupt has passed through C code that runs Python
    source (a flag it sets there and never clears), which our stop signals' KeyboardInterrupt can do inside the
    frameworks."""
    status = main()
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(status)


def _error(message: str) -> None:
    sys.stdout.flush()
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)
    sys.stderr.flush()
