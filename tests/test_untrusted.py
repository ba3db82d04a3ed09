"""cvt_core.untrusted: the one opener of untrusted files and the strict JSON parser every reader uses."""

from __future__ import annotations

import json
import os
import re

import pytest

from cvt_core.errors import CheckpointError
from cvt_core.untrusted import MAX_INTEGER_DIGITS, Limits, open_regular_file, parse_json

REFUSED = {
    "nan literal": (b'{"a": NaN}', "not a number JSON allows"),
    "infinity literal": (b'[Infinity]', "not a number JSON allows"),
    "exponent overflow": (b'{"a": 1e999}', "1e999 is not a finite number"),
    "negative exponent overflow": (b'[-1e400]', "is not a finite number"),
    "huge integer": (b'{"a": ' + b"9" * 5001 + b"}", "an integer of 5001 digits"),
    "integer past the digit bound": (b"[" + b"1" * (MAX_INTEGER_DIGITS + 1) + b"]", "digits is longer than"),
    "duplicate key": (b'{"a": 1, "a": 2}', "appears twice"),
    "deep arrays": (b"[" * 100_000 + b"]" * 100_000, "nested 100000 levels"),
    "deep objects": (b'{"a":' * 70 + b"1" + b"}" * 70, "nested 70 levels"),
    "binary": (b"\xff\xfe\x00\x01", "not UTF-8"),
    "truncated": (b'{"a": [1, 2', "not valid JSON"),
    "long string": (json.dumps(["x" * (Limits.JSON_STRING + 1)]).encode(), "characters is longer than"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_hostile_json_is_one_line_naming_its_source(case):
    data, fragment = REFUSED[case]
    with pytest.raises(CheckpointError) as caught:
        parse_json(data, "some/file.json")
    message = str(caught.value)
    assert message.startswith("some/file.json: ") and fragment in message and "\n" not in message


def test_plain_json_parses_unchanged():
    value = {"a": [1, -2, 3.5, 1e300, True, None, "text"], "b": {"c": 10 ** 40}}
    assert parse_json(json.dumps(value).encode(), "x") == value


def test_the_error_class_is_the_callers():
    with pytest.raises(ValueError) as caught:
        parse_json(b"[1e999]", "cfg", error=ValueError)
    assert type(caught.value) is ValueError


@pytest.mark.parametrize("make, kind", [
    (lambda p: os.mkfifo(p), "a named pipe (FIFO)"),
    (lambda p: os.symlink("/dev/zero", p), "a device"),
    (lambda p: os.mkdir(p), "a folder"),
])
def test_only_regular_files_are_opened_and_a_fifo_does_not_block(tmp_path, make, kind):
    path = tmp_path / "weights"
    make(str(path))
    with pytest.raises(CheckpointError, match=re.escape(kind)):
        open_regular_file(str(path))


@pytest.mark.parametrize("reader", ["config", "preprocessor", "safetensors", "index"])
def test_a_5001_digit_integer_in_any_json_input_is_one_line_naming_the_file(tmp_path, reader):
    """Python stops at 4300 digits with a bare ValueError that names no file: the bound comes first."""
    from cvt_core import CvtConfig, CvtImageProcessor
    from cvt_core.checkpoint import open_checkpoint

    huge = "9" * 5001
    if reader == "config":
        path = tmp_path / "config.json"
        path.write_text('{"num_labels": %s}' % huge)
        call = lambda: CvtConfig.from_pretrained(str(tmp_path))  # noqa: E731
    elif reader == "preprocessor":
        path = tmp_path / "preprocessor_config.json"
        path.write_text('{"crop_pct": %s}' % huge)
        call = lambda: CvtImageProcessor.from_pretrained(str(tmp_path))  # noqa: E731
    elif reader == "safetensors":
        path = tmp_path / "model.safetensors"
        header = ('{"w": {"dtype": "F32", "shape": [%s], "data_offsets": [0, 4]}}' % huge).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
        call = lambda: open_checkpoint(str(path))  # noqa: E731
    else:
        path = tmp_path / "model.safetensors.index.json"
        path.write_text('{"metadata": {"total_size": %s}, "weight_map": {}}' % huge)
        call = lambda: open_checkpoint(str(path))  # noqa: E731
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    assert str(path) in message and "5001 digits" in message and "\n" not in message
