"""Argument types and option groups shared by the `cvt` commands."""

import argparse


def _number(text: str, cast, kind: str):
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None


def _require(ok: bool, rule: str, text: str) -> None:
    if not ok:
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")


def positive_float(text: str) -> float:
    """argparse type: a number greater than zero."""
    value = _number(text, float, "a number")
    _require(value > 0, "positive", text)
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    value = _number(text, int, "an integer")
    _require(value >= 1, "at least 1", text)
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number of 0 or more."""
    value = _number(text, int, "an integer")
    _require(value >= 0, "0 or more", text)
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = _number(text, float, "a number")
    _require(0.0 <= value < 1.0, "in [0, 1)", text)
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
