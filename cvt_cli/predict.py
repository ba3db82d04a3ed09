"""`cvt predict IMAGE... --model DIR [--framework torch|keras] [--top-k K] [--json]`: the top-k labels of each image,
from a checkpoint folder with a classifier, preprocessed as its preprocessor_config.json says.

Plain output is for people: the folder, then each image with its ranked labels and probabilities. `--json` is for
programs: stdout holds only JSON Lines, one object per image in the order given,

    {"image": "cat.jpg", "predictions": [{"label": "tabby", "id": 281, "score": 0.93}, ...]}

(the keys of transformers' image-classification pipeline, plus the class id); the notes go to stderr, and only
when the command succeeds, so that an error is the one line there."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from conversion.errors import ConversionError, one_line

from .arguments import positive_int
from .train import FRAMEWORKS


def register(subparsers) -> None:
    """Add `predict` to the `cvt` command's sub-parsers."""
    parser = subparsers.add_parser(
        "predict", help="classify images with a trained checkpoint",
        description="Print the top-k labels and probabilities of each image, preprocessed as the checkpoint's "
                    "preprocessor_config.json says. With --json, stdout holds one JSON object per image and line, "
                    "{\"image\": ..., \"predictions\": [{\"label\": ..., \"id\": ..., \"score\": ...}, ...]}, and "
                    "the notes go to stderr.")
    add_predict_arguments(parser)
    parser.set_defaults(run=run)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="classifier checkpoint folder: config.json (with id2label), weights (model.safetensors, "
                             "pytorch_model.bin, tf_model.h5, model.keras or model.weights.h5) and "
                             "preprocessor_config.json (without it: the released checkpoints' preprocessing at the "
                             "config's image_size, with a note)")
    parser.add_argument("--framework", choices=FRAMEWORKS, default=None,
                        help="framework to run (default: torch when its weights and PyTorch are available)")
    parser.add_argument("--top-k", type=positive_int, default=5, metavar="K",
                        help="labels to show per image, most probable first (default 5)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON Lines, one object per image, for programs (notes go to stderr)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def run(args) -> int:
    if args.json:
        notes: List[str] = []  # held back until the end, so that an error stays the one line on stderr
        results = predict(args, echo=notes.append, show=False)
        for note in notes:
            print(note, file=sys.stderr)
        for result in results:
            print(json.dumps(_json_safe(result)))
    else:
        predict(args)
    return 0


def _json_safe(result: Dict[str, Any]) -> Dict[str, Any]:
    """A result with non-finite scores (a broken checkpoint's NaN logits) as null: JSON has no NaN."""
    return {**result, "predictions": [{**entry, "score": entry["score"] if math.isfinite(entry["score"]) else None}
                                      for entry in result["predictions"]]}


def _load_for_prediction(directory: str, framework: Optional[str]):
    """(framework, model, config) for `cvt predict`."""
    from cvt_core.checkpoint import CONFIG_NAME, pretrained_weights_file

    from conversion.formats import formats_in_directory, read_config_file, read_target

    if not os.path.isdir(directory):
        raise ConversionError(directory, "no such checkpoint folder")
    config = read_config_file(os.path.join(directory, CONFIG_NAME))
    pretrained = pretrained_weights_file(directory) is not None  # both models' from_pretrained can load it
    if framework is None:
        framework = "torch" if pretrained and _importable("torch") else "keras"
    if framework == "torch":
        if not pretrained:
            raise ConversionError(directory, "holds no weights PyTorch can load (model.safetensors, pytorch_model.bin, "
                                             "tf_model.h5); use --framework keras or convert it with "
                                             "`cvt convert DIR OUT --to torch`")
        _refuse_without_classifier(directory, config, pretrained_weights_file(directory))
        from cvt_torch import CvtForImageClassification

        return "torch", CvtForImageClassification.from_pretrained(directory), config
    from conversion.models import import_keras_models

    _, _, TFCvtForImageClassification = import_keras_models()
    if pretrained:
        _refuse_without_classifier(directory, config, pretrained_weights_file(directory))
        return "keras", TFCvtForImageClassification.from_pretrained(directory), config
    found = formats_in_directory(directory)
    if not found:
        raise ConversionError(directory, "holds no weights (model.safetensors, pytorch_model.bin, tf_model.h5, "
                                         "model.weights.h5, model.keras)")
    label, path = found[-1] if found[-1][1].endswith(".keras") else found[0]
    if not path.endswith(".keras"):
        _refuse_without_classifier(directory, config, path)
        return "keras", read_target(label, path, config, True)[1], config
    model = read_target(label, path, config, True)[1]  # a .keras file says itself what it holds; nothing is made up
    _refuse_without_classifier(directory, model.config, None if model.with_head else path)
    return "keras", model, config


def _refuse_without_classifier(directory: str, config, weights: Optional[str]) -> None:
    """Stop `cvt predict` before a checkpoint without a classifier gets a random head (or, with num_labels=0, the
    pooled features) whose top-k would mean nothing. `weights` is the file the model is read from; None: it is known
    to hold no head."""
    reason = None
    if config.num_labels == 0:
        reason = "num_labels=0 in its config.json"
    elif weights is None or not _weights_have_classifier(weights, config):
        reason = f"{os.path.basename(weights) if weights else 'its model'} holds a bare CvtModel, no classifier weights"
    if reason:
        raise ConversionError(None, f"{directory} has no classifier ({reason}); predict needs an image-classification "
                                    f"checkpoint")


def _weights_have_classifier(path: str, config) -> bool:
    """Whether a weights file holds the classification head, from its tensor names only (no model is built)."""
    from cvt_core.checkpoint import KERAS_WEIGHTS_NAME, TF_WEIGHTS_NAME
    from cvt_core.weights import BACKBONE_PREFIX

    from conversion.formats import open_torch_weights
    from conversion.hf_tf_h5 import read_tf_h5
    from conversion.keras_native import weights_file_has_head

    name = os.path.basename(path)
    if name == KERAS_WEIGHTS_NAME:
        try:
            return weights_file_has_head(path)
        except OSError:
            return True  # unreadable: let the loader report it in its own words
    if name == TF_WEIGHTS_NAME:
        state = read_tf_h5(path, config)
        try:
            return state.with_head
        finally:
            state.close()
    tensors = open_torch_weights(path)
    try:
        # transformers' rule, as from_pretrained applies it: a classifier's backbone weights carry the `cvt.` prefix
        return any(key.startswith(BACKBONE_PREFIX) for key in tensors.shapes)
    finally:
        tensors.close()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def predict(args, echo: Callable[[str], None] = print, show: bool = True) -> List[Dict[str, Any]]:
    """The work of `cvt predict`: for each image `{"image": path, "predictions": [{"label", "id", "score"}, ...]}`,
    the top-k most probable first, returned. `echo` receives the notes and, with `show`, the ranked table."""
    from cvt_core.image_processing import PREPROCESSOR_CONFIG_NAME, CvtImageProcessor

    directory = args.model
    framework, model, config = _load_for_prediction(directory, args.framework)
    if os.path.isfile(os.path.join(directory, PREPROCESSOR_CONFIG_NAME)):
        try:
            processor = CvtImageProcessor.from_pretrained(directory)
        except ValueError as exc:  # strict JSON, types and bounds: one line that names the file
            raise ConversionError(None, one_line(str(exc))) from None
    else:
        processor = CvtImageProcessor.for_config(config)
        echo(f"note: {directory} has no {PREPROCESSOR_CONFIG_NAME}; using the released checkpoints' preprocessing "
             f"at {processor.size['shortest_edge']}")
    try:
        pixels = processor(list(args.images))["pixel_values"]
    except FileNotFoundError as exc:
        raise ConversionError(None, one_line(str(exc))) from None
    except ValueError as exc:  # ImageLoadError (unreadable, not a regular file, too large), a URL: names the file
        raise ConversionError(None, one_line(str(exc))) from None
    if framework == "torch":
        from cvt_torch.optimize import optimize_for_inference
        from cvt_torch.training import predict_logits as torch_logits

        logits = torch_logits(optimize_for_inference(model), pixels)
    else:
        from cvt_tf.training import predict_logits as keras_logits

        logits = keras_logits(model, pixels)
    probabilities = _softmax(logits)
    k = min(args.top_k, probabilities.shape[1])
    results = []
    width = max(len(config.id2label.get(i, str(i))) for i in range(probabilities.shape[1]))
    echo(f"{directory} ({framework}, {config.num_labels} classes)")
    for path, row in zip(args.images, probabilities):
        top = np.argsort(-row, kind="stable")[:k]
        entries = [{"label": config.id2label.get(int(i), str(int(i))), "id": int(i), "score": float(row[i])}
                   for i in top]
        results.append({"image": path, "predictions": entries})
        if show:
            echo(path)
            for rank, entry in enumerate(entries, 1):
                echo(f"  {rank}. {entry['label']:<{width}}  {entry['score']:.4f}")
    return results

