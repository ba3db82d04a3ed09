"""Analytic multiply-accumulate count of one image through CvT, from the config and the shape rules alone.

Pure integer arithmetic on `CvtConfig` and `stage_geometry` (no framework import), so the benchmarks can turn
measured images/s into GFLOP/s for either framework, and a test can hold both to the same figure.
"""

from __future__ import annotations

from typing import Dict

from .config import CvtConfig
from .shapes import stage_geometry

MAC_KINDS = ("embedding", "qkv_conv", "qkv_linear", "attention", "out_proj", "mlp", "head")
MATMUL_KINDS = ("qkv_linear", "attention", "out_proj", "mlp", "head")  # the rest are convolutions


def cvt_macs(config: CvtConfig, height: int = 224, width: int = 224, cls_only: bool = False) -> Dict[str, int]:
    """Multiply-accumulates of one `height` x `width` image through CvT, by kind of operation, plus "total".

    Counts every matmul and convolution (conv token embeddings, depthwise q/k/v convolutions, q/k/v projections,
    attention scores and context, output projection, MLP, classifier); normalisations, activations, pooling and
    the softmax are not counted. CvT-13 at 224 gives 4.57 GMAC, the paper's figure.

    `cls_only`: the work a classifier that reads only the final cls token executes when the last block of a final
    stage with a cls token runs for that token alone (the PyTorch models' inference path): that block's query
    convolution, query projection, attention, output projection and MLP then see one token."""
    macs = dict.fromkeys(MAC_KINDS, 0)
    in_channels = config.num_channels
    geometries = stage_geometry(config, height, width)
    for geo in geometries:
        s = geo.stage
        dim, patch = config.embed_dim[s], config.patch_sizes[s]
        macs["embedding"] += geo.height * geo.width * dim * in_channels * patch * patch
        keys, kernel = geo.num_key_tokens, config.kernel_qkv[s]
        with_convolutions = config.qkv_projection_method[s] == "dw_bn"
        # the depthwise convolutions see the grid only; the cls token bypasses them
        conv_kv = geo.key_height * geo.key_width * dim * kernel * kernel

        def block(queries: int, query_grid: int, tokens: int) -> Dict[str, int]:
            """One block whose attention has `queries` queries (`query_grid` of them from the grid) and whose MLP
            sees `tokens` tokens."""
            return {
                "qkv_conv": (query_grid * dim * kernel * kernel + 2 * conv_kv) if with_convolutions else 0,
                "qkv_linear": queries * dim * dim + 2 * keys * dim * dim,
                "attention": 2 * queries * keys * dim,
                "out_proj": queries * dim * dim,
                "mlp": 2 * tokens * dim * config.mlp_hidden_dim(s),
            }

        blocks = [block(geo.num_query_tokens, geo.query_height * geo.query_width, geo.num_tokens)] * config.depth[s]
        if cls_only and geo is geometries[-1] and geo.with_cls_token and blocks:
            blocks[-1] = block(1, 0, 1)  # the cls token alone queries; it skips the query convolution
        for per_block in blocks:
            for kind, value in per_block.items():
                macs[kind] += value
        in_channels = dim
    macs["head"] = config.hidden_size * max(config.num_labels, 0)
    macs["total"] = sum(macs.values())
    return macs
