"""Argument types and option groups shared by the `cvt` commands."""

import argparse

from conversion.crosscheck import DEFAULT_ATOL


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


def _short(number: float) -> str:
    """A tolerance as the help texts write it: 1e-5, 5e-2, 2.5e-3."""
    mantissa, exponent = f"{number:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def quiet_options() -> argparse.ArgumentParser:
    """`--quiet`, for every command (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parent


def check_options(dtype_option: bool = True) -> argparse.ArgumentParser:
    """`--atol` and `--image`, for the commands that cross-check (a parent parser). `dtype_option`: the command has
    `--dtype`, whose choice sets the default tolerance; without it the default is float32's."""
    if dtype_option:
        default = ", ".join(f"{_short(atol)} ({dtype})" if dtype == "float32" else f"{_short(atol)} (--dtype {dtype})"
                            for dtype, atol in DEFAULT_ATOL.items())
    else:
        default = f"{_short(DEFAULT_ATOL['float32'])}, whatever dtype the weights are stored in"
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--atol", type=positive_float, default=None,
                        help="tolerance: each output passes when max|diff| <= ATOL * max(1, max|reference|); default "
                             + default)
    parent.add_argument("--image", metavar="PATH", default=None,
                        help="run the check on this image (ImageNet preprocessing at the config's image_size) instead "
                             "of the seeded random batch")
    return parent
