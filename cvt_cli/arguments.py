"""Argument types and option groups shared by the `cvt` commands."""

import argparse


def positive_float(text: str) -> float:
    """argparse type: a number greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number of 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def quiet_options() -> argparse.ArgumentParser:
    """`--quiet`, for every command (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parent


def check_options() -> argparse.ArgumentParser:
    """`--atol` and `--image`, for the commands that cross-check (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--atol", type=positive_float, default=None,
                        help="tolerance: each output passes when max|diff| <= ATOL * max(1, max|reference|); default "
                             "1e-5 (float32), 1e-2 (--dtype float16), 5e-2 (--dtype bfloat16)")
    parent.add_argument("--image", metavar="PATH", default=None,
                        help="run the check on this image (ImageNet preprocessing at the config's image_size) instead "
                             "of the seeded random batch")
    return parent
