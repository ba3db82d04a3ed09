"""`cvt attention IMAGE --model DIR [--out PNG] [--stage S ...] [--layer L] [--framework torch|keras]`: a PNG of
the image beside the attention of one layer per stage (conversion.attention)."""

from __future__ import annotations

import os

from conversion import attention

from .arguments import quiet_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "attention", parents=[quiet_options()], help="draw a checkpoint's attention maps on an image",
        description="Write a PNG: the image as the model sees it (preprocessed as the checkpoint's "
                    "preprocessor_config.json says, else as the released checkpoints) and, per chosen stage, one "
                    "layer's attention averaged over heads and upsampled onto it: in a stage with a cls token the "
                    "cls token's attention over the grid, elsewhere the mean attention each grid position receives.")
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="checkpoint folder (config.json and model.safetensors, pytorch_model.bin or tf_model.h5)")
    parser.add_argument("--out", default="attention.png", metavar="PNG", help="the picture to write "
                        "(default attention.png; never the image, the model folder or a file in it; an existing file "
                        "is replaced only with --force, and only when it is a picture cvt wrote)")
    parser.add_argument("--stage", type=int, nargs="+", default=None, metavar="S",
                        help="stage number(s) from 1, as in the backbone's stage names (default: every stage)")
    parser.add_argument("--layer", type=int, default=-1, metavar="L",
                        help="the layer within each stage, from 0; negative from its end (default -1, the last)")
    parser.add_argument("--framework", choices=attention.FRAMEWORKS, default=None,
                        help="framework to run (default: torch when PyTorch is installed)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --out file that cvt attention wrote (its PNG carries a cvt-written "
                             "record matching its content); any other file is refused")
    parser.set_defaults(run=run)


def run(args) -> int:
    from conversion.atomic import check_file_destination

    # never the image, the model folder or anything in it; an existing file only with --force, and only a
    # picture cvt wrote (checked again just before the rename)
    sources = [args.image, args.model]
    check_file_destination(args.out, args.force, sources)
    image, maps = attention.attention_maps(args.image, args.model, args.stage, args.layer, args.framework)
    title = f"{os.path.basename(args.image)}, {os.path.basename(os.path.normpath(args.model))}"
    attention.draw_attention(image, maps, args.out, title=title, force=args.force, sources=sources)
    for item in maps:
        print(f"stage {item.stage}, layer {item.layer}: {item.kind} over a {item.grid.shape[0]}x{item.grid.shape[1]} "
              f"key grid (max {item.grid.max():.3f})")
    print(f"wrote {args.out}")
    return 0
