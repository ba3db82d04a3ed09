"""`cvt demo`: a seeded random checkpoint of a preset converted to every format, with the cross-check."""

from __future__ import annotations

from conversion import pipeline

from .arguments import positive_float, quiet_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", parents=[quiet_options()], help="convert a random checkpoint to every format and check it",
        description="Make a seeded random checkpoint of a preset with our PyTorch model, convert it to every format "
                    "and print the cross-check.")
    parser.add_argument("--preset", default="cvt-13", metavar="PRESET_OR_JSON",
                        help="preset name or config.json (default cvt-13)")
    parser.add_argument("--out", default=None, metavar="DIR", help="keep the converted checkpoint in DIR")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --out DIR that is empty or that cvt wrote (its .cvt-manifest.json lists "
                             "every file in it, unchanged)")
    parser.add_argument("--atol", type=positive_float, default=None, help="tolerance (default 1e-5)")
    parser.set_defaults(run=run)


def run(args) -> int:
    pipeline.demo(args.preset, out=args.out, force=args.force, atol=args.atol, echo=print)
    return 0
