"""The output containers (`cvt_core.outputs`) as nodes of Keras' structure utilities, as `cvt_torch.outputs` makes
them pytree nodes for PyTorch."""

from __future__ import annotations

from cvt_core.outputs import CvtBackboneOutput, CvtImageClassifierOutput, CvtModelOutput

from .backend import JAX


def register_outputs_with_keras_tree() -> None:
    """Make the output containers nodes of `keras.tree` (optree), not leaves, so Keras' `predict`, `fit` and
    structure utilities see the tensors inside. Registered in Keras' optree namespace only; under JAX also as JAX
    pytrees, which is what lets them cross `jax.jit` and `jax.grad` (Keras' compiled train and predict steps)."""
    import optree

    def flatten(output):
        keys = tuple(output.keys())
        return tuple(output[k] for k in keys), keys, keys

    for output_type in (CvtModelOutput, CvtImageClassifierOutput, CvtBackboneOutput):
        def unflatten(keys, children, output_type=output_type):
            return output_type(**dict(zip(keys, children)))

        try:
            optree.register_pytree_node(output_type, flatten, unflatten, namespace="keras")
        except ValueError:
            pass  # already registered (module re-imported)
        if JAX:
            import jax

            try:
                jax.tree_util.register_pytree_node(output_type, lambda output: flatten(output)[:2], unflatten)
            except ValueError:
                pass
