"""Random small CvT configs for the tests that must hold on any config, not only the listed ones."""

from __future__ import annotations

import random


def generated_config(seed: int) -> dict:
    """A random small config: 1-3 stages of random depth, cls tokens on random stages, every projection method,
    either activation, 0, 1 or several labels."""
    rng = random.Random(seed)
    stages = rng.randint(1, 3)

    def per_stage(draw):
        return [draw() for _ in range(stages)]

    heads = per_stage(lambda: rng.choice([1, 2, 3]))
    patch = per_stage(lambda: rng.choice([3, 5, 7]))
    return dict(
        embed_dim=[h * rng.choice([8, 16]) for h in heads], num_heads=heads, depth=per_stage(lambda: rng.randint(1, 3)),
        patch_sizes=patch, patch_stride=per_stage(lambda: rng.choice([2, 3, 4])), patch_padding=[p // 2 for p in patch],
        mlp_ratio=per_stage(lambda: rng.choice([1.5, 2.0, 4.0])), qkv_bias=per_stage(lambda: rng.random() < 0.5),
        cls_token=per_stage(lambda: rng.random() < 0.4),
        qkv_projection_method=per_stage(lambda: rng.choice(["dw_bn", "dw_bn", "avg", "linear"])),
        kernel_qkv=[3] * stages, padding_kv=[1] * stages, stride_kv=per_stage(lambda: rng.choice([1, 2])),
        padding_q=[1] * stages, stride_q=[1] * stages, attention_drop_rate=per_stage(lambda: rng.choice([0.0, 0.1])),
        drop_rate=per_stage(lambda: rng.choice([0.0, 0.1])), drop_path_rate=per_stage(lambda: rng.choice([0.0, 0.1])),
        hidden_act=rng.choice(["gelu", "quick_gelu"]), num_labels=rng.choice([0, 1, 5]))
