"""`cvt verify DIR`: the cross-check of `cvt convert` on every checkpoint format found in a folder."""

from __future__ import annotations

from conversion import pipeline

from .arguments import check_options, quiet_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify", parents=[quiet_options(), check_options(dtype_option=False)],
        help="cross-check every format in a folder",
        description="Load every checkpoint format found in DIR (model.safetensors / pytorch_model.bin, tf_model.h5, "
                    "model.weights.h5, model.keras), run each on the same input and compare them with the first.")
    parser.add_argument("directory", metavar="DIR",
                        help="checkpoint folder: config.json beside one or more weights files, as cvt convert writes")
    parser.set_defaults(run=run)


def run(args) -> int:
    pipeline.verify(args.directory, atol=args.atol, image=args.image, echo=print)
    return 0
