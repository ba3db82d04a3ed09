"""The `cvt` command line (also `python -m conversion`).

    cvt convert SRC DST [--from auto|hf|hf-tf|keras|original] [--to torch|hf-tf|keras|all] [--config PRESET_OR_JSON]
                        [--dtype keep|float32|float16|bfloat16] [--hidden-act gelu|quick_gelu] [--force]
                        [--atol ATOL] [--image PATH] [--no-check] [--quiet]
    cvt verify DIR [--atol ATOL] [--image PATH] [--quiet]
    cvt demo [--preset cvt-13] [--out DIR] [--force] [--quiet]

Exit status: 0 success; 1 the cross-check found outputs beyond tolerance (nothing is written); 2 a usage or input
error, reported as one line `cvt: error: <file>: <problem>` on stderr; 130 interrupted (Ctrl-C / SIGTERM), with
every temporary file removed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import List, Optional

from cvt_core.checkpoint import CheckpointError
from cvt_core.weights import WeightLoadError

from . import progress
from .arguments import positive_float
from .errors import ConversionError, CrossCheckFailed, describe, one_line

PROG = "cvt"


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as the one-line `cvt: error: ...` with status 2."""

    def error(self, message: str):  # argparse's hook
        raise ConversionError(None, one_line(message) + f" (see `{PROG} {self._sub_name()}--help`)")

    def _sub_name(self) -> str:
        parts = self.prog.split()
        return (parts[1] + " ") if len(parts) > 1 else ""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="CvT checkpoints between transformers PyTorch, transformers TF, Keras 3 "
                                            "and the original microsoft/CvT format, with a cross-check that both "
                                            "frameworks compute the same outputs.")
    sub = parser.add_subparsers(dest="command", metavar="{convert,verify,demo}", parser_class=_Parser)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    check = argparse.ArgumentParser(add_help=False)
    check.add_argument("--atol", type=positive_float, default=None,
                       help="tolerance: each output passes when max|diff| <= ATOL * max(1, max|reference|); default "
                            "1e-5 (float32), 1e-2 (--dtype float16), 5e-2 (--dtype bfloat16)")
    check.add_argument("--image", metavar="PATH", default=None,
                       help="run the check on this image (ImageNet preprocessing at the config's image_size) instead "
                            "of the seeded random batch")

    convert = sub.add_parser("convert", parents=[common, check], help="convert a checkpoint and cross-check it",
                             description="Convert SRC (a checkpoint folder, a single weights file with --config, or a "
                                         "model hub id) into the folder DST, load every written format back, run it "
                                         "beside the source on the same input and compare. DST is written "
                                         "atomically and only when the check passes.")
    convert.add_argument("src", metavar="SRC")
    convert.add_argument("dst", metavar="DST")
    convert.add_argument("--from", dest="from_format", default="auto",
                         choices=["auto", "hf", "hf-tf", "keras", "original"],
                         help="source format (default: detected)")
    convert.add_argument("--to", default="all", metavar="{torch,hf-tf,keras,all}",
                         help="target format(s), comma-separated (default: all)")
    convert.add_argument("--config", default=None, metavar="PRESET_OR_JSON",
                         help="config preset (cvt-13, cvt-21, cvt-w24, optionally -384) or config.json; required for "
                              "original checkpoints and single weights files without a config.json beside them")
    convert.add_argument("--dtype", default="keep", choices=["keep", "float32", "float16", "bfloat16"],
                         help="cast floating-point weights (default: keep the source's)")
    convert.add_argument("--hidden-act", default=None, choices=["gelu", "quick_gelu"],
                         help="override the MLP activation (original checkpoints default to quick_gelu)")
    convert.add_argument("--force", action="store_true",
                         help="replace an existing DST that is empty or holds only checkpoint files (a folder holding "
                              "anything else is refused)")
    convert.add_argument("--no-check", action="store_true", help="skip the cross-check (not recommended)")

    verify = sub.add_parser("verify", parents=[common, check], help="cross-check every format in a folder",
                            description="Load every checkpoint format found in DIR (model.safetensors / "
                                        "pytorch_model.bin, tf_model.h5, model.weights.h5, model.keras), run each "
                                        "on the same input and compare them with the first.")
    verify.add_argument("directory", metavar="DIR")

    demo = sub.add_parser("demo", parents=[common], help="convert a random checkpoint to every format and check it",
                          description="Make a seeded random checkpoint of a preset with our PyTorch model, convert it "
                                      "to every format and print the cross-check.")
    demo.add_argument("--preset", default="cvt-13", metavar="PRESET_OR_JSON",
                      help="preset name or config.json (default cvt-13)")
    demo.add_argument("--out", default=None, metavar="DIR", help="keep the converted checkpoint in DIR")
    demo.add_argument("--force", action="store_true",
                      help="replace an existing --out DIR that is empty or holds only checkpoint files")
    demo.add_argument("--atol", type=positive_float, default=None, help="tolerance (default 1e-5)")

    extra = _extra_commands()
    if extra is not None:  # `cvt train` / `cvt predict` (conversion.train_command), each with args.handler
        extra.register(sub)
        sub.metavar = "{convert,verify,demo,train,predict}"
    return parser


def _extra_commands():
    try:
        from . import train_command
    except ImportError:
        return None
    return train_command if hasattr(train_command, "register") else None


def _run(args) -> int:
    from . import pipeline

    if getattr(args, "handler", None) is not None:  # a registered extra command reports its own errors
        return int(args.handler(args))
    echo = print
    if args.command == "convert":
        pipeline.convert(args.src, args.dst, from_format=args.from_format, to=args.to, config=args.config,
                         dtype=args.dtype, hidden_act=args.hidden_act, force=args.force, atol=args.atol,
                         image=args.image, check=not args.no_check, echo=echo)
    elif args.command == "verify":
        pipeline.verify(args.directory, atol=args.atol, image=args.image, echo=echo)
    elif args.command == "demo":
        pipeline.demo(args.preset, out=args.out, force=args.force, atol=args.atol, echo=echo)
    return 0


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `cvt`; returns the exit status (and is what `python -m conversion` exits with)."""
    parser = build_parser()
    previous = None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        progress.set_enabled(not args.quiet)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread
            previous = None
        return _run(args)
    except ConversionError as exc:
        _error(str(exc))
        return 2
    except CrossCheckFailed:
        return 1
    except KeyboardInterrupt:
        _error("interrupted; nothing was written")
        return 130
    except (OSError, CheckpointError, WeightLoadError) as exc:  # user-caused problems without a more specific message
        _error(str(describe(exc, getattr(exc, "filename", None))))
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        progress.set_enabled(True)


def _error(message: str) -> None:
    sys.stdout.flush()
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)
    sys.stderr.flush()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
