"""Hand-made pickle opcodes for the pickle reader's tests: values encoded as `torch.save`'s protocol-2 pickles
encode them, with `Op` marking bytes that are already opcodes (a global, a call)."""

from __future__ import annotations

import struct


class Op(bytes):
    """Pickle opcodes already encoded."""


def glob(module: str, name: str) -> Op:
    return Op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")


def enc(value) -> bytes:
    if isinstance(value, Op):
        return bytes(value)
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"\x88" if value else b"\x89"
    if isinstance(value, int):
        if -2 ** 31 <= value < 2 ** 31:
            return b"J" + struct.pack("<i", value)
        size = (value.bit_length() + 8) // 8
        return b"\x8a" + bytes([size]) + value.to_bytes(size, "little", signed=True)
    if isinstance(value, float):
        return b"G" + struct.pack(">d", value)
    if isinstance(value, str):
        raw = value.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw
    if isinstance(value, tuple):
        return b"(" + b"".join(enc(v) for v in value) + b"t"
    if isinstance(value, dict):
        return b"}(" + b"".join(enc(k) + enc(v) for k, v in value.items()) + b"u"
    raise TypeError(value)
