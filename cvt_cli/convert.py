"""`cvt convert SRC DST`: any checkpoint format to any other, cross-checked before anything is written."""

from __future__ import annotations

from conversion import pipeline

from .arguments import check_options, quiet_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", parents=[quiet_options(), check_options()], help="convert a checkpoint and cross-check it",
        description="Convert SRC (a checkpoint folder, a single weights file or a model hub id) into "
                    "the folder DST, load every written format back, run it beside the source on the same input and "
                    "compare. DST is written atomically and only when the check passes (with --no-check: unchecked).")
    parser.add_argument("src", metavar="SRC",
                        help="the checkpoint to convert: a folder (model.safetensors, pytorch_model.bin, tf_model.h5, "
                             "model.keras, model.weights.h5 or one original *.pth), one such weights file (--config "
                             "when no config.json is beside it) or a model hub id such as microsoft/cvt-13")
    parser.add_argument("dst", metavar="DST",
                        help="the folder to write (created; an existing one only with --force)")
    parser.add_argument("--from", dest="from_format", default="auto", choices=["auto", "hf", "hf-tf", "keras", "original"],
                        help="source format (default: auto, detected from the file names and contents)")
    parser.add_argument("--to", default="all", metavar="{torch,hf-tf,keras,all}",
                        help="target format(s), comma-separated (default: all)")
    parser.add_argument("--config", default=None, metavar="PRESET_OR_JSON",
                        help="config preset (cvt-13, cvt-21, cvt-w24, optionally with -384, -22k or -384-22k) or "
                             "config.json; required for "
                             "original checkpoints and single weights files without a config.json beside them")
    parser.add_argument("--dtype", default="keep", choices=["keep", "float32", "float16", "bfloat16"],
                        help="cast floating-point weights (default: keep the source's)")
    parser.add_argument("--hidden-act", default=None, choices=["gelu", "quick_gelu"],
                        help="override the MLP activation (original checkpoints default to quick_gelu)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing DST that is empty or that cvt wrote (its .cvt-manifest.json lists every "
                             "file in it, unchanged); anything else is refused")
    parser.add_argument("--no-check", action="store_true", help="skip the cross-check (not recommended)")
    parser.set_defaults(run=run)


def run(args) -> int:
    pipeline.convert(args.src, args.dst, from_format=args.from_format, to=args.to, config=args.config,
                     dtype=args.dtype, hidden_act=args.hidden_act, force=args.force, atol=args.atol,
                     image=args.image, check=not args.no_check, echo=print)
    return 0
