"""Programs the distributed tests run in fresh processes (`python tests/distributed_workers.py MODE OUT_DIR`).

Every mode trains the same tiny CvT (`tiny_config`) for one SGD step on the same global batch (`global_batch`),
starting from the same weights, and writes the resulting weights in PyTorch naming to OUT_DIR as .npz:

- `torch-ddp`: one rank of a `torchrun` job (2 gloo processes); each rank steps on its half of the batch, with
  synchronised BatchNorm (`sync.npz`) and without (`local.npz`); rank 0 writes.
- `keras-mirrored`: splits the CPU into 2 logical devices, then steps once without distribution
  (`single.npz`, also `initial.npz`), and twice under MirroredStrategy: with synchronised BatchNorm, trained
  transformers' style on the model's own loss with the labels inside the inputs (`mirrored-sync.npz`), and
  without synchronisation, on a compiled loss (`mirrored-local.npz`).
- `keras-multi-worker`: one worker of a 2-process MultiWorkerMirroredStrategy cluster (TF_CONFIG set by the test),
  starting from `initial.npz`, synchronised BatchNorm; worker 0 writes `multi-worker.npz`.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GLOBAL_BATCH = 8
LEARNING_RATE = 0.5


def tiny_config():
    from cvt_core.config import CvtConfig

    return CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 2], num_labels=3, image_size=32,
                     drop_path_rate=[0.0, 0.0, 0.0])


def global_batch():
    rng = np.random.default_rng(7)
    pixels = rng.standard_normal((GLOBAL_BATCH, 3, 32, 32)).astype(np.float32)
    # channels with a different offset per sample, so per-replica BatchNorm statistics clearly differ
    pixels += np.linspace(-2, 2, GLOBAL_BATCH, dtype=np.float32)[:, None, None, None]
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int64)
    return pixels, labels


# ------------------------------------------------------------------------------------------------ PyTorch
def torch_ddp(out_dir: str) -> None:
    import torch

    from cvt_torch import CvtForImageClassification
    from cvt_torch import training as tt

    torch.set_num_threads(1)
    context = tt.init_distributed(timeout_s=120)
    assert context.world_size == 2, context
    pixels, labels = global_batch()
    share = GLOBAL_BATCH // context.world_size
    mine = slice(context.rank * share, (context.rank + 1) * share)
    results = {}
    for variant, sync in (("sync", True), ("local", False)):
        torch.manual_seed(0)
        model = CvtForImageClassification(tiny_config())
        runner = tt.prepare_model(model, context, sync_batchnorm=sync)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        tt.train_step(runner, optimizer, pixels[mine], labels[mine])
        results[variant] = {k: v.detach().numpy().copy() for k, v in tt.unwrap(runner).state_dict().items()}
    if context.is_main:
        for variant, state in results.items():
            np.savez(os.path.join(out_dir, f"{variant}.npz"), **state)
    tt.shutdown_distributed()


# ------------------------------------------------------------------------------------------------ Keras
def _keras_step(strategy, initial, sync: bool, own_loss: bool = False):
    import keras

    from cvt_tf import TFCvtForImageClassification
    from cvt_tf.training import synchronize_batch_norm
    from training_helpers import keras_state_arrays

    pixels, labels = global_batch()
    with strategy.scope():
        model = TFCvtForImageClassification(tiny_config(), data_format="channels_first")
        model.build_with_dummy_input()
        if initial is not None:
            weights = model.canonical_weights()
            from cvt_core.weights import weight_table

            for entry in weight_table(model.config, True):
                name = entry.torch_name(True)
                if entry.has_keras_twin:
                    weights[name].assign(entry.to_keras(initial[name]))
        if sync:
            synchronize_batch_norm(model)
        if own_loss:  # transformers' style: no compiled loss, labels inside the inputs
            model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
        else:
            model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = keras_state_arrays(model)
    inputs, targets = ({"pixel_values": pixels, "labels": labels}, None) if own_loss else (pixels, labels)
    model.fit(inputs, targets, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return before, keras_state_arrays(model)


def keras_mirrored(out_dir: str) -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from cvt_tf.training import make_strategy, split_cpu

    devices = split_cpu(2)
    import keras

    keras.utils.set_random_seed(0)
    initial, single = _keras_step(make_strategy("default"), None, sync=False)
    np.savez(os.path.join(out_dir, "initial.npz"), **initial)
    np.savez(os.path.join(out_dir, "single.npz"), **single)
    mirrored = make_strategy("mirrored", devices)
    assert mirrored.num_replicas_in_sync == 2
    for variant, sync in (("mirrored-sync", True), ("mirrored-local", False)):
        _, state = _keras_step(mirrored, initial, sync, own_loss=sync)
        np.savez(os.path.join(out_dir, f"{variant}.npz"), **state)


def keras_multi_worker(out_dir: str) -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from cvt_tf.training import is_chief, make_strategy

    strategy = make_strategy("multi-worker")
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
    with np.load(os.path.join(out_dir, "initial.npz")) as data:
        initial = {k: data[k] for k in data.files}
    _, state = _keras_step(strategy, initial, sync=True)
    if is_chief():
        np.savez(os.path.join(out_dir, "multi-worker.npz"), **state)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    {"torch-ddp": torch_ddp, "keras-mirrored": keras_mirrored, "keras-multi-worker": keras_multi_worker}[mode](out)
