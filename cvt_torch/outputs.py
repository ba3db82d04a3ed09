"""How the PyTorch models hand back their outputs: the output containers as pytree nodes (for torch.export and
torch.compile), the forward arguments under torch.fx, and the container, tuple or plain dict a forward returns."""

from __future__ import annotations

import torch

from cvt_core.outputs import CvtBackboneOutput, CvtImageClassifierOutput, CvtModelOutput


def _register_outputs_as_pytrees() -> None:
    """Make the output containers pytree nodes (their set fields are the children), so torch.export and
    torch.compile's graph outputs can hold them: `torch.export.export(model, (pixel_values,))` works as called."""
    from torch.utils import _pytree

    for output_type in (CvtModelOutput, CvtImageClassifierOutput, CvtBackboneOutput):
        def flatten(output):
            keys = tuple(output.keys())
            return [output[k] for k in keys], keys

        def unflatten(children, keys, output_type=output_type):
            return output_type(**dict(zip(keys, children)))

        try:
            _pytree.register_pytree_node(output_type, flatten, unflatten,
                                         serialized_type_name=f"{output_type.__module__}.{output_type.__name__}")
        except ValueError:
            pass  # already registered (module re-imported)


_register_outputs_as_pytrees()


def option(value, default):
    """A forward argument's value: `default` where it is None, or a symbol of torch.fx.symbolic_trace (which passes
    every argument as one), so the graph that `torch.fx.symbolic_trace(model)` records is the call with
    `pixel_values` alone."""
    return default if value is None or isinstance(value, torch.fx.Proxy) else value


def returned(outputs, return_dict: bool):
    """What a model's forward returns: the output container, or its tuple with `return_dict=False`. Under
    torch.jit.trace the container is returned as a plain dict of its set fields: the tracer records only tensors,
    tuples, lists and plain dicts."""
    if not return_dict:
        return outputs.to_tuple()
    return dict(outputs) if torch.jit.is_tracing() else outputs
