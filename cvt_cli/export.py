"""`cvt export SRC DST --format ...`: a classifier checkpoint as ONNX, torch.export, SavedModel and TFLite
artifacts, each loaded back in its own runtime and checked against the source before DST is written."""

from __future__ import annotations

from conversion import export

from .arguments import positive_float, positive_int, quiet_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", parents=[quiet_options()], help="export a classifier to ONNX, torch.export, SavedModel, TFLite",
        description="Export SRC (any checkpoint `cvt convert` reads) into the folder DST as deployable artifacts: "
                    "model.onnx, model.pt2, saved_model/ and/or model.tflite, beside config.json and "
                    "preprocessor_config.json. Each takes pixel_values (N, C, H, W) float32 and returns logits; the "
                    "batch is dynamic in all, height and width in all but TFLite. Every artifact is loaded in its "
                    "own runtime and run beside the source on seeded inputs (batches of 1 and 3, two image sizes "
                    "where dynamic); DST is written atomically and only when all of them match.")
    parser.add_argument("src", metavar="SRC",
                        help="a classifier checkpoint, as cvt convert reads it: a folder, one weights file or a model "
                             "hub id such as microsoft/cvt-13")
    parser.add_argument("dst", metavar="DST",
                        help="the folder to write the artifacts into (created; an existing one only with --force)")
    parser.add_argument("--format", dest="formats", default="all",
                        metavar="{" + ",".join([*export.FORMATS, "all"]) + "}",
                        help="artifact format(s), comma-separated (default: all)")
    parser.add_argument("--image-size", nargs=2, type=positive_int, metavar=("H", "W"), default=None,
                        help="the checked image size, and TFLite's fixed size (default: the config's image_size, "
                             "else 224)")
    parser.add_argument("--opset", type=positive_int, default=None,
                        help="ONNX opset (default 20; torch.onnx writes this model at 18 and later)")
    parser.add_argument("--dtype", default="float32", choices=list(export.DTYPES),
                        help="compute dtype inside the artifacts; input and logits stay float32 (bfloat16: "
                             "torch-export and saved-model only)")
    parser.add_argument("--from", dest="from_format", default="auto", choices=["auto", "hf", "hf-tf", "keras", "original"],
                        help="source format (default: auto, detected from the file names and contents)")
    parser.add_argument("--config", default=None, metavar="PRESET_OR_JSON",
                        help="config preset or config.json; required for original checkpoints and single weights "
                             "files without a config.json beside them")
    parser.add_argument("--atol", type=positive_float, default=None,
                        help="tolerance: each output passes when max|diff| <= ATOL * max(1, max|source|); default "
                             "1e-4 (float32), 5e-2 (--dtype bfloat16)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing DST that is empty or that cvt wrote (its .cvt-manifest.json lists every "
                             "file in it, unchanged); anything else is refused")
    parser.set_defaults(run=run)


def run(args) -> int:
    export.export(args.src, args.dst, formats=args.formats, image_size=args.image_size, opset=args.opset,
                  dtype=args.dtype, from_format=args.from_format, config=args.config, force=args.force,
                  atol=args.atol, echo=print)
    return 0
