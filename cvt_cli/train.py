"""`cvt train`: train or fine-tune a CvT in either framework, move it to the other one and prove there that it
predicts the same.

    cvt train [--data DIR] [--framework torch|keras] [--init CHECKPOINT | --config PRESET_OR_JSON] [--epochs N] ...

`cvt train` without `--data` trains on the handwritten digits that ship inside scikit-learn (1797 8x8 grey images,
10 classes), upscaled to 32x32, with the small architecture `TINY_ARCHITECTURE`. A run directory (default
`runs/<timestamp>/`) receives:

    checkpoint/            config.json (with id2label), model.safetensors, preprocessor_config.json
                           (+ model.keras when trained with Keras): transformers' layout, loadable by both frameworks
    converted-<other>/     the same model written by `cvt convert` in the other framework's format, cross-checked
    training_curve.png     loss and accuracy per epoch
    report.json            settings, history, timings, validation accuracy in both frameworks, top-1 agreement
    .cvt-manifest.json     what the run wrote (each file's size and sha256; checkpoint/ and converted-<other>/
                           hold their own), so that `--force` replaces an earlier run and nothing else

and the last line printed is `validation accuracy: torch 0.98xx, keras 0.98xx; top-1 agreement 100.00% ...`.

Distributed: under `torchrun --nproc_per_node N` (e.g. `torchrun --nproc_per_node 2 -m cvt_cli train ...`)
the PyTorch run uses DistributedDataParallel, `--sync-batchnorm` synchronising BatchNorm; with Keras,
`--strategy mirrored` (all local devices, or `--cpu-replicas N` logical CPU devices) or `--strategy multi-worker`
(TF_CONFIG). `--batch-size` is always the global batch.

The training itself is `cvt_torch.training.fit` / `cvt_tf.training.fit`; this module parses, prepares the data,
calls `fit`, then saves, converts, evaluates and reports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from conversion.errors import ConversionError, CrossCheckFailed, one_line
from cvt_core.training import FitResult
from cvt_core.weights import count_parameters

from .arguments import fraction, non_negative_int, positive_float, positive_int
from .plot import plot_history

# The architecture `cvt train` builds when neither --init nor --config is given: CvT-13's three-stage layout with
# its patch sizes and strides (7/4, 3/2, 3/2), narrower and shallower for small images. At 32x32 the stages see
# 8x8, 4x4 and 2x2 token grids; 0.57 M parameters with 10 classes.
TINY_ARCHITECTURE: Dict[str, Any] = dict(
    embed_dim=[32, 64, 128], num_heads=[1, 2, 4], depth=[1, 1, 2], patch_sizes=[7, 3, 3], patch_stride=[4, 2, 2],
    patch_padding=[2, 1, 1], drop_path_rate=[0.0, 0.0, 0.1])
DEFAULT_IMAGE_SIZE = 32
FRAMEWORKS = ("torch", "keras")
OTHER = {"torch": "keras", "keras": "torch"}
CHECKPOINT_DIR = "checkpoint"
REPORT_NAME = "report.json"
PLOT_NAME = "training_curve.png"


# ============================================================================================================ arguments
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", default=None,
                      help="image folder with one subfolder per class (default: scikit-learn's handwritten digits)")
    data.add_argument("--val-fraction", type=fraction, default=0.2, metavar="F",
                      help="share of each class held out for validation (default 0.2)")
    data.add_argument("--image-size", type=positive_int, default=None, metavar="N",
                      help=f"training resolution (default {DEFAULT_IMAGE_SIZE}; with --init, the checkpoint's "
                           f"preprocessing)")
    data.add_argument("--augment-shift", type=non_negative_int, default=None, metavar="PIXELS",
                      help="random translation of training images by up to PIXELS (default image size / 16)")
    data.add_argument("--flip", action="store_true", help="random horizontal flips (not for digits or text)")

    model = parser.add_argument_group("model")
    model.add_argument("--framework", choices=FRAMEWORKS, default="torch",
                       help="framework to train with (default torch); the result is evaluated in both")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--init", metavar="CHECKPOINT", default=None,
                        help="fine-tune from this checkpoint folder (transformers layout); the classifier is "
                             "re-initialised when the number of classes differs")
    source.add_argument("--config", metavar="PRESET_OR_JSON", default=None,
                        help="architecture to train from scratch: a preset (cvt-13, cvt-21, cvt-w24) or a "
                             "config.json (default: a small 3-stage CvT for small images, see docs/training.md)")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, default=15, help="passes over the training set (default 15)")
    train.add_argument("--batch-size", type=positive_int, default=64,
                       help="global batch size, shared by all processes / replicas (default 64)")
    train.add_argument("--lr", type=positive_float, default=None,
                       help="peak learning rate of AdamW (default 2e-3 from scratch, 1e-4 with --init)")
    train.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    train.add_argument("--warmup-epochs", type=float, default=1.0,
                       help="linear warm-up before the cosine decay (default 1 epoch)")
    train.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and shuffling")
    train.add_argument("--bf16", action="store_true",
                       help="bfloat16 mixed precision (torch.autocast / Keras mixed_bfloat16); weights stay float32")
    train.add_argument("--compile", action="store_true", help="torch.compile the model (PyTorch only)")
    train.add_argument("--fast-kernels", action="store_true",
                       help="PyTorch only: train through cvt_torch.optimize.optimize_for_training, float32 matmuls "
                            "forward and backward on oneDNN on the CPU (same gradients to float32 rounding; faster "
                            "where oneDNN's GEMM outruns PyTorch's BLAS, as on AVX-512 CPUs)")
    train.add_argument("--threads", type=non_negative_int, default=None,
                       help="CPU threads per process (default: 1 for models under 5 M parameters, such as the default "
                            "one, which run fastest single-threaded, else the framework's choice; 0 = the framework's "
                            "choice)")

    distributed = parser.add_argument_group("distributed")
    distributed.add_argument("--sync-batchnorm", action="store_true",
                             help="BatchNorm statistics over the global batch (SyncBatchNorm / synchronized Keras BN)")
    distributed.add_argument("--strategy", choices=("default", "mirrored", "multi-worker"), default="default",
                             help="Keras tf.distribute strategy (PyTorch: launch with torchrun instead)")
    distributed.add_argument("--cpu-replicas", type=positive_int, default=None, metavar="N",
                             help="with --strategy mirrored: split the CPU into N logical devices, one replica each")

    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", default=None, help="run directory (default runs/<timestamp>)")
    output.add_argument("--force", action="store_true",
                        help="replace an existing --out directory that holds an earlier run, unchanged (its "
                             ".cvt-manifest.json lists every file in it; anything else is refused); an empty one "
                             "is used without --force")
    output.add_argument("--no-convert", action="store_true",
                        help="skip the conversion to the other framework and its evaluation")
    output.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    """Add `train` to the `cvt` command's sub-parsers."""
    parser = subparsers.add_parser(
        "train", help="train or fine-tune a CvT on an image folder (default: digits) and check it in both frameworks",
        description="Train (or fine-tune with --init) a CvT classifier on an image folder, one subfolder per class "
                    "(default: scikit-learn's handwritten digits), in PyTorch or Keras; save it in transformers' "
                    "layout with its preprocessing, convert it to the other framework and evaluate it there.")
    add_train_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    train(args)
    return 0


# ============================================================================================================= training
@dataclass
class PreparedData:
    dataset: Any
    processor: Any
    train_pixels: np.ndarray
    train_labels: np.ndarray
    val_pixels: np.ndarray
    val_labels: np.ndarray


@dataclass
class TrainResult:
    """What `train` returns (and writes into report.json)."""

    run_dir: Optional[str]
    report: Dict[str, Any] = field(default_factory=dict)


def _say(echo: Callable[[str], None], is_main: bool) -> Callable[[str], None]:
    return echo if is_main else (lambda _message: None)


def _default_run_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def _run_sources(args) -> List[str]:
    """The paths a run reads, which its --out must not be, hold or lie inside."""
    return [path for path in (args.data, args.init, args.config) if path and os.path.exists(path)]


def _showing_final(echo: Callable[[str], None], tmp: str, final: str) -> Callable[[str], None]:
    """`echo` with the temporary run folder's path printed as the final one."""
    return lambda text: echo(str(text).replace(tmp, final))


def _load_dataset(args):
    from .data import load_digits_dataset, load_image_folder

    return load_image_folder(args.data) if args.data else load_digits_dataset()


def _init_config(directory: str):
    from cvt_core.config import CvtConfig

    try:
        return CvtConfig.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as exc:
        raise ConversionError(directory, f"--init: cannot read its config.json ({one_line(str(exc))})") from None


def _resolve_config(args, dataset, image_size: int):
    """The CvtConfig of the model to train, with the dataset's labels."""
    from cvt_core.config import CvtConfig

    labels = dict(id2label=dataset.id2label, label2id={name: i for i, name in dataset.id2label.items()})
    if args.init:
        return _init_config(args.init).copy(image_size=image_size, **labels)
    if args.config:
        from conversion.formats import load_config_arg

        base, _ = load_config_arg(args.config)
        return base.copy(image_size=image_size, **labels)
    return CvtConfig(**TINY_ARCHITECTURE, image_size=image_size, **labels)


def _make_processor(args):
    from cvt_core.image_processing import PREPROCESSOR_CONFIG_NAME, CvtImageProcessor

    if args.init and os.path.isfile(os.path.join(args.init, PREPROCESSOR_CONFIG_NAME)):
        processor = CvtImageProcessor.from_pretrained(args.init)
        if args.image_size:
            processor = CvtImageProcessor.from_dict(processor.to_dict(), size=args.image_size)
        return processor
    if args.init:
        if args.image_size:
            return CvtImageProcessor.for_resolution(args.image_size)
        return CvtImageProcessor.for_config(_init_config(args.init))
    # From scratch: keep the whole image (resize the short side, centre-crop the square), ImageNet mean/std.
    return CvtImageProcessor(size=args.image_size or DEFAULT_IMAGE_SIZE, crop_pct=1.0)


def _prepare_data(args, echo) -> PreparedData:
    from .data import preprocess, stratified_split

    dataset = _load_dataset(args)
    processor = _make_processor(args)
    train_idx, val_idx = stratified_split(dataset.labels, args.val_fraction, args.seed)
    if len(train_idx) == 0:
        raise ConversionError(args.data, "no training images left after the validation split")
    size = processor.size["shortest_edge"]
    echo(f"data: {dataset.source}: {len(dataset)} images, {dataset.num_classes} classes "
         f"({', '.join(dataset.class_names[:12])}{', ...' if dataset.num_classes > 12 else ''}); "
         f"{len(train_idx)} for training, {len(val_idx)} for validation; preprocessed to {size}x{size}")
    started = time.perf_counter()
    pixels = preprocess(dataset, processor)
    if time.perf_counter() - started > 5:
        echo(f"  preprocessing took {time.perf_counter() - started:.1f} s")
    return PreparedData(dataset, processor, pixels[train_idx], dataset.labels[train_idx], pixels[val_idx],
                        dataset.labels[val_idx])


# ------------------------------------------------------------------------------------------------------------------ fit
def _threads(args, config) -> int:
    if args.threads is not None:
        return args.threads
    # Small models run fastest on one thread per process: their kernels are too short to amortise the
    # synchronisation of a thread pool (7x slower on a loaded 2-core machine).
    return 1 if count_parameters(config, True) < 5_000_000 else 0


def _learning_rate(args) -> float:
    return args.lr if args.lr is not None else (1e-4 if args.init else 2e-3)


def _augmentation(args, image_size: int):
    from cvt_core.batching import Augmentation

    shift = args.augment_shift if args.augment_shift is not None else max(image_size // 16, 0)
    return Augmentation(max_shift=shift, horizontal_flip=bool(args.flip))


def _progress_bar(enabled: bool):
    """A tqdm wrapper for batch iterables on an interactive stderr, or None."""
    from conversion import progress

    if not enabled or not progress.enabled():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None

    def wrap(iterable, desc):
        return tqdm(iterable, desc=desc, leave=False, file=sys.stderr, unit="batch", dynamic_ncols=True)

    return wrap


def _fit_settings(args, config, image_size: int) -> Dict[str, Any]:
    """The keyword arguments of `cvt_torch.training.fit` / `cvt_tf.training.fit` that the options ask for."""
    return dict(epochs=args.epochs, batch_size=args.batch_size, learning_rate=_learning_rate(args),
                weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                augmentation=_augmentation(args, image_size), seed=args.seed, bf16=args.bf16,
                threads=_threads(args, config), sync_batchnorm=args.sync_batchnorm, compile=args.compile,
                strategy=args.strategy, cpu_replicas=args.cpu_replicas, progress=_progress_bar(not args.quiet))


def _fit(args, config, data: PreparedData, echo) -> FitResult:
    """Train in the framework of --framework, from --init's weights or from scratch."""
    if args.framework == "torch":
        from cvt_torch import CvtForImageClassification
        from cvt_torch.optimize import optimize_for_training
        from cvt_torch.training import fit

        def build_model():
            if args.init:
                model = CvtForImageClassification.from_pretrained(args.init, config=config,
                                                                  ignore_mismatched_sizes=True)
            else:
                model = CvtForImageClassification(config)
            return optimize_for_training(model) if args.fast_kernels else model
    else:
        from conversion.models import import_keras_models

        _, _, TFCvtForImageClassification = import_keras_models()
        from cvt_tf.training import fit

        def build_model():
            if args.init:
                return TFCvtForImageClassification.from_pretrained(args.init, config=config,
                                                                   ignore_mismatched_sizes=True)
            model = TFCvtForImageClassification(config, data_format="channels_first")
            model.build_with_dummy_input()
            return model

    return fit(build_model, data.train_pixels, data.train_labels, data.val_pixels, data.val_labels,
               **_fit_settings(args, config, data.processor.size["shortest_edge"]), echo=echo)


def _save_checkpoint(framework: str, model, data: PreparedData, run_dir: str) -> Tuple[str, np.ndarray]:
    """Write the trained model and its preprocessing to the run's checkpoint folder; returns the folder and the
    float32 validation logits of what was saved (the reference for the other framework)."""
    checkpoint = os.path.join(run_dir, CHECKPOINT_DIR)
    model.image_processor = data.processor  # save_pretrained writes it as preprocessor_config.json
    model.save_pretrained(checkpoint)
    if framework == "torch":
        from cvt_torch.training import predict_logits

        return checkpoint, predict_logits(model, data.val_pixels)
    from cvt_tf import TFCvtForImageClassification
    from cvt_tf.training import predict_logits

    # Evaluate (and save as model.keras) a float32 copy, built outside any strategy: the numbers are those of the
    # saved checkpoint, and no other worker has to take part.
    saved = TFCvtForImageClassification.from_pretrained(checkpoint)
    saved.save(os.path.join(checkpoint, "model.keras"))
    return checkpoint, predict_logits(saved, data.val_pixels)


# ------------------------------------------------------------------------------------------------------ other framework
def _logits_in(framework: str, directory: str, pixels: np.ndarray) -> np.ndarray:
    """Validation logits of the converted model, loaded from `directory` by the other framework."""
    if framework == "torch":
        from cvt_torch import CvtForImageClassification
        from cvt_torch.training import predict_logits

        return predict_logits(CvtForImageClassification.from_pretrained(directory), pixels)
    from conversion.keras_native import KERAS_MODEL_NAME, load_keras_model_file
    from cvt_tf.training import predict_logits

    return predict_logits(load_keras_model_file(os.path.join(directory, KERAS_MODEL_NAME)), pixels)


def _convert_and_evaluate(framework: str, checkpoint: str, run_dir: str, data: PreparedData,
                          reference_logits: np.ndarray, echo) -> Dict[str, Any]:
    from conversion.pipeline import convert

    other = OTHER[framework]
    destination = os.path.join(run_dir, f"converted-{other}")
    echo(f"converting to {other} with `cvt convert` ...")

    def indented(text: str) -> None:
        echo(textwrap.indent(text, "  "))

    started = time.perf_counter()
    if framework == "keras":  # the Keras-written model is the source, PyTorch weights the target
        report = convert(os.path.join(checkpoint, "model.keras"), destination, from_format="keras", to="torch",
                         force=True, echo=indented)
    else:
        report = convert(checkpoint, destination, to="keras", force=True, echo=indented)
    logits = _logits_in(other, destination, data.val_pixels)
    agreement = float(np.mean(logits.argmax(1) == reference_logits.argmax(1))) if len(logits) else 1.0
    return {"framework": other, "directory": destination, "val_logits": logits, "top1_agreement": agreement,
            "max_abs_logit_difference": float(np.max(np.abs(logits - reference_logits))) if len(logits) else 0.0,
            "cross_check_worst_difference": report.check.worst if report.check else None,
            "seconds": time.perf_counter() - started}


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> Optional[float]:
    return float(np.mean(logits.argmax(1) == labels)) if len(labels) else None


def _format_accuracy(value: Optional[float]) -> str:
    return "n/a (no validation images)" if value is None else f"{value:.4f}"


def _writes_outputs(framework: str) -> bool:
    """Whether this process writes the run directory: rank 0 under torchrun, the chief (or worker 0 without a
    chief) of a Keras multi-worker cluster, and every process that is not part of a distributed run."""
    if framework == "torch":
        return int(os.environ.get("RANK", "0")) == 0
    from cvt_tf.training import is_chief

    try:
        return is_chief()
    except ValueError as exc:
        raise ConversionError("TF_CONFIG", str(exc)) from None


def _check_options(args) -> None:
    if args.compile and args.framework != "torch":
        raise ConversionError(None, "--compile applies to --framework torch only")
    if args.fast_kernels and args.framework != "torch":
        raise ConversionError(None, "--fast-kernels applies to --framework torch only")
    if args.strategy != "default" and args.framework != "keras":
        raise ConversionError(None, "--strategy applies to --framework keras; run PyTorch distributed with torchrun "
                                    "(e.g. torchrun --nproc_per_node 2 -m cvt_cli train ...)")
    if args.cpu_replicas and args.strategy != "mirrored":
        raise ConversionError(None, "--cpu-replicas needs --strategy mirrored")
    if args.init and not os.path.isdir(args.init):
        raise ConversionError(args.init, "no such checkpoint folder for --init")


def train(args, echo: Callable[[str], None] = print) -> TrainResult:
    """The work of `cvt train` (see the module docstring); returns the run directory and the report (empty on the
    processes of a distributed run that do not write).

    The run directory is built under a temporary name beside --out and renamed into place at the end, so a run
    that fails leaves no folder; paths printed and in report.json are the final ones."""
    from conversion.atomic import atomic_directory, check_destination

    started = time.perf_counter()
    _check_options(args)
    writes = _writes_outputs(args.framework)
    say = _say(echo, writes)
    out = args.out if args.out is not None else _default_run_dir()
    destination = dict(force=args.force, sources=_run_sources(args), empty_ok=True)
    if writes:
        check_destination(out, **destination)  # before any work
    data = _prepare_data(args, say)
    image_size = data.processor.size["shortest_edge"]
    config = _resolve_config(args, data.dataset, image_size)
    origin = f"fine-tuned from {args.init}" if args.init else (f"{args.config} from scratch" if args.config
                                                                 else "small CvT from scratch")
    say(f"model: {origin}: embed_dim {config.embed_dim}, depth {config.depth}, heads {config.num_heads}, "
        f"{count_parameters(config, True):,} parameters, {config.num_labels} classes")
    with atomic_directory(out, **destination) if writes else contextlib.nullcontext() as run_dir:
        if run_dir is not None:
            echo, say = _showing_final(echo, run_dir, out), _showing_final(say, run_dir, out)
        result = _fit(args, config, data, echo)
        if not result.is_main or run_dir is None:
            return TrainResult(None, {})
        report = _finish_run(args, run_dir, out, config, origin, data, result, started, say)

    written = [f"{CHECKPOINT_DIR}/"] + ([os.path.basename(report["files"]["converted"]) + "/"]
                                        if report["files"]["converted"] else []) + \
        ([PLOT_NAME] if report["files"]["plot"] else []) + [REPORT_NAME]
    say(f"wrote {out}: {', '.join(written)} ({report['seconds']['total']:.0f} s in all, "
        f"{report['seconds']['training']:.0f} s training)")
    accuracy = report["validation_accuracy"]
    figures = ", ".join(f"{name} {_format_accuracy(accuracy[name])}" for name in FRAMEWORKS if name in accuracy)
    line = f"validation accuracy: {figures}"
    if report["top1_agreement"] is not None:
        line += (f"; top-1 agreement {100 * report['top1_agreement']:.2f}% ({len(data.val_labels)} validation "
                 f"images, largest logit difference {report['max_abs_logit_difference']:.1e})")
    say(line)
    if report["conversion_failed"]:
        say(f"conversion to {OTHER[args.framework]} FAILED: {report['conversion_failed']}; the trained checkpoint "
            f"is kept in {report['files']['checkpoint']}")
        raise CrossCheckFailed(report["conversion_failed"])
    return TrainResult(out, report)


def _finish_run(args, run_dir: str, out: str, config, origin: str, data: PreparedData, result: FitResult,
                started: float, say) -> Dict[str, Any]:
    """Save the checkpoint, convert and evaluate in the other framework, plot and write report.json into `run_dir`
    (the temporary folder); returns the report, whose paths name the final folder `out`."""
    from conversion.atomic import write_manifest

    def final(path: Optional[str]) -> Optional[str]:
        return None if path is None else os.path.join(out, os.path.relpath(path, run_dir))

    image_size = data.processor.size["shortest_edge"]
    framework = args.framework
    checkpoint, reference_logits = _save_checkpoint(framework, result.model, data, run_dir)
    write_manifest(checkpoint)  # checkpoint/ is a folder cvt wrote, replaceable on its own too
    accuracy = {framework: _accuracy(reference_logits, data.val_labels)}
    conversion = None
    conversion_failed = None
    if not args.no_convert:
        try:
            conversion = _convert_and_evaluate(framework, checkpoint, run_dir, data, reference_logits, say)
        except CrossCheckFailed as exc:  # the trained checkpoint is still good: keep the run, report the failure
            conversion_failed = str(exc)
        else:
            accuracy[conversion["framework"]] = _accuracy(conversion["val_logits"], data.val_labels)

    plot_path: Optional[str] = os.path.join(run_dir, PLOT_NAME)
    try:
        plot_history(result.history, plot_path,
                     title=f"CvT on {data.dataset.source} ({framework}, {len(data.train_labels)} training images)")
    except ImportError:
        say("note: matplotlib is not installed, so no training-curve plot was drawn (pip install matplotlib)")
        plot_path = None

    report: Dict[str, Any] = {
        "framework": framework,
        "dataset": {"source": data.dataset.source, "classes": data.dataset.class_names,
                    "images": len(data.dataset), "train_images": int(len(data.train_labels)),
                    "val_images": int(len(data.val_labels)), "class_counts": data.dataset.class_counts()},
        "preprocessing": data.processor.to_dict(),
        "model": {"origin": origin, "parameters": count_parameters(config, True), "config": config.to_dict()},
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": _learning_rate(args),
                     "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs, "seed": args.seed,
                     "augmentation": vars(_augmentation(args, image_size)), "bf16": args.bf16,
                     "compile": args.compile, "fast_kernels": args.fast_kernels,
                     "sync_batchnorm": args.sync_batchnorm, "strategy": args.strategy,
                     "processes_or_replicas": result.world_size, "threads": result.threads},
        "history": result.history,
        "validation_accuracy": accuracy,
        "top1_agreement": conversion["top1_agreement"] if conversion else None,
        "max_abs_logit_difference": conversion["max_abs_logit_difference"] if conversion else None,
        "conversion_failed": conversion_failed,
        "files": {"checkpoint": final(checkpoint),
                  "converted": final(conversion["directory"]) if conversion else None,
                  "plot": final(plot_path), "report": os.path.join(out, REPORT_NAME)},
        "seconds": {"training": result.seconds,
                    "conversion_and_evaluation": conversion["seconds"] if conversion else None,
                    "total": None},
    }
    report["seconds"]["total"] = time.perf_counter() - started
    with open(os.path.join(run_dir, REPORT_NAME), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return report
