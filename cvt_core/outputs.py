"""Output containers shared by the PyTorch and Keras models, named as transformers names them.

Like transformers' `ModelOutput`: attribute access, key access, integer/slice access over the fields that are
set (None fields are skipped), and `to_tuple()`. The tuple order is transformers', with `attentions` last.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, Tuple


class ModelOutput(OrderedDict):
    _fields: Tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        if len(args) == 1 and not kwargs and isinstance(args[0], (Mapping, Iterator)):
            # Rebuilt from (name, value) pairs, as tf.function and copy do with a returned mapping.
            args, kwargs = (), dict(args[0])
        if len(args) > len(self._fields):
            raise TypeError(f"{type(self).__name__} takes at most {len(self._fields)} positional values")
        values = dict(zip(self._fields, args))
        for key in kwargs:
            if key not in self._fields:
                raise TypeError(f"{type(self).__name__} has no field {key!r}; fields: {list(self._fields)}")
            if key in values:
                raise TypeError(f"{type(self).__name__} got {key!r} twice")
        values.update(kwargs)
        for name in self._fields:
            self._store(name, values.get(name))

    def _store(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if value is not None:
            OrderedDict.__setitem__(self, name, value)
        elif name in self:
            OrderedDict.__delitem__(self, name)
        # keep the order of _fields whatever the order of assignment
        for field in self._fields:
            if field in self:
                self.move_to_end(field)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._fields:
            self._store(name, value)
        else:
            object.__setattr__(self, name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._fields:
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        self._store(key, value)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return OrderedDict.__getitem__(self, key)

    def __reduce__(self):
        return (type(self), (), None, None, iter(self.items()))

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(self[k] for k in self.keys())

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={_describe(v)}" for k, v in self.items())
        return f"{type(self).__name__}({inner})"


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"<{type(value).__name__} shape={tuple(shape)}>"
    if isinstance(value, tuple):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return repr(value)


class CvtModelOutput(ModelOutput):
    """`last_hidden_state` (B, C_last, H, W); `cls_token_value` (B, 1, C_last) or None when the last stage has no
    cls token; `hidden_states`: one (B, C_s, H_s, W_s) tensor per stage; `attentions`: one
    (B, heads, query_tokens, key_tokens) tensor per layer, all stages in order."""

    _fields = ("last_hidden_state", "cls_token_value", "hidden_states", "attentions")


class CvtBackboneOutput(ModelOutput):
    """transformers' `BackboneOutput`: `feature_maps`, one (B, C_s, H_s, W_s) map per chosen stage (NHWC in Keras
    with `data_format="channels_last"`); Keras also gives `pyramid_outputs`, the same maps keyed "P<log2 stride>"
    as keras-hub's pyramid backbones key them; `hidden_states` / `attentions` as in `CvtModelOutput`."""

    _fields = ("feature_maps", "pyramid_outputs", "hidden_states", "attentions")


class CvtImageClassifierOutput(ModelOutput):
    """`loss` (when labels are given), `logits` (B, num_labels), and `hidden_states` / `attentions` as above."""

    _fields = ("loss", "logits", "hidden_states", "attentions")
