"""python -m dcgan.eval: sample quality of a generator, and the features file it is scored with.

  # once per dataset: train the offline feature classifier on the labelled shards
  python -m dcgan.eval train-features --shards data/fashion-mnist   # -> data/fashion-mnist/features.pt
  # FID, KID, precision/recall of a checkpoint (alone or under torchrun, any world size)
  python -m dcgan.eval --checkpoint runs/fashion-mnist/checkpoints/best.pt [--features F | --inception W]
  # a class-conditional checkpoint: also the intra-class FID, 1000 images of each class
  python -m dcgan.eval --checkpoint runs/cond --per-class 1000

A conditional checkpoint (``model.conditional``) is scored as any other over the mix of
its classes (drawn uniformly from --seed), and also by its intra-class FID: for each class
k, ``--per-class`` images of class k (default --num-samples // classes; the same --seed
latents for every class) against the real images labelled k among the first --num-real of
the shards (--shards, default the checkpoint's data.shards), read with their labels and
their features extracted by the same extractor (a features file holds no labels; with
--inception these are the real set already read). ``intra_fid`` is the mean of the
classes' FIDs; ``intra_class`` in the JSON holds each class's FID, real and generated
counts. A class with under 2 real images there is left out of the mean (FID None,
``skipped``, and a warning): raise --num-real. With few images a class FID is biased
upward: compare intra-class FIDs at the same counts only. ``--per-class 0``: none.

The command only; the evaluator it runs (also every ``eval.every`` steps of training) is
dcgan/quality/evaluator.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dcgan.base.checks import ConfigError
from dcgan.base.exits import EXIT_CONFIG, EXIT_OK
from dcgan.base.logs import setup_logging
from dcgan.checkpoint import files as checkpoint
from dcgan.checkpoint.inference import OLD_WEIGHTS, WEIGHTS, load_trained_state, weights_option
from dcgan.config.loading import build_section
from dcgan.config.sections import DataConfig, EvalConfig
from dcgan.data.shardset import first_image_size, resolve_shards
from dcgan.data.stream import read_images
from dcgan.models.networks import ModelConfig
from dcgan.quality.evaluator import (
    DEFAULT_FEATURES_NAME,
    Evaluator,
    choose_extractor,
    eval_mode_sampler,
    log,
    shard_classes,
)
from dcgan.quality.features import (
    FeaturesError,
    save_classifier,
    train_classifier,
)
from dcgan.quality.scores import format_scores
from dcgan.run import distributed

# --------------------------------------------------------------------------- CLI: score


def score_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dcgan.eval",
        description="FID, KID and precision/recall (k=3) of a checkpoint's generator, and a class-conditional "
        "one's intra-class FID (--per-class). "
        "`python -m dcgan.eval train-features --help` makes the offline features file.",
    )
    parser.add_argument("--checkpoint", required=True, help="a step_*.pt or best.pt, or a run folder (its newest)")
    parser.add_argument("--features", default="", help="classifier features file (default: <shards>/features.pt)")
    parser.add_argument("--inception", default="", help="Inception-v3 FID weights: TorchScript or state dict")
    parser.add_argument("--shards", default="", help="real shards (default: the checkpoint's data.shards)")
    parser.add_argument("--num-samples", type=int, default=10000, help="generated images (default 10000)")
    parser.add_argument("--num-real", type=int, default=10000, help="real images (default 10000)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents")
    parser.add_argument(
        "--per-class", type=int, metavar="N",
        help="a conditional checkpoint's intra-class FID: N generated images of each class (default: --num-samples "
        "// classes; 0: no intra-class FID)",
    )  # fmt: skip
    parser.add_argument(
        "--weights", choices=(*WEIGHTS, *OLD_WEIGHTS), default="ema",
        help="ema: the EMA generator (default); raw: G itself ('g' is the deprecated spelling of raw)",
    )  # fmt: skip
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default="", help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    setup_logging(distributed.read_env().rank)
    args.weights = weights_option(args.weights)
    path = checkpoint.resolve(Path(args.checkpoint))
    sd = load_trained_state(path)
    model = build_section(ModelConfig, sd["config"]["model"], str(path), "model.")
    # Here, before any process group: a generator that does not fit is one line, not a traceback per rank.
    generator = checkpoint.generator_from_state(sd, model, args.weights, path)
    shards = args.shards or sd["config"]["data"]["shards"]
    ecfg = build_section(
        EvalConfig,
        {"features": args.features, "inception": args.inception, "num_samples": args.num_samples,
         "num_real": args.num_real, "batch_size": args.batch_size, "seed": args.seed},
        "command line", "--",
    )  # fmt: skip
    choice = choose_extractor(ecfg, shards, model)
    per_class = intra_class_count(args.per_class, ecfg.num_samples, model, shards, path)
    dist = distributed.setup(args.device)
    try:
        generator = generator.to(dist.device)
        data = DataConfig(shards=shards)
        # FeaturesError: the same file on every rank, so every rank says so (main) and exits alike.
        evaluator = Evaluator.build(choice, ecfg, data, model, dist)
        sample = eval_mode_sampler(generator)
        scores = evaluator.evaluate(sample, model.nz, model.num_classes)  # a conditional G: over the class mix
        intra = intra_class_scores(evaluator, sample, model, data, per_class) if per_class else None
        if dist.is_main:
            report = {
                "checkpoint": str(path),
                "step": sd["step"],
                "weights": args.weights,
                "extractor": f"{choice.kind}:{choice.path}",
                "num_samples": ecfg.num_samples,
                "num_real": len(evaluator.real_features),
                "world_size": dist.world_size,
                **scores,
            }
            if intra is not None:
                report["intra_fid"], report["intra_class"] = intra.pop("intra_fid"), intra
            log.info("%s at step %d: %s", path, sd["step"], format_scores(scores))
            print(json.dumps(report, indent=1))
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        distributed.barrier(dist)
        return EXIT_OK
    finally:
        distributed.teardown()


def intra_class_count(per_class: int | None, num_samples: int, model: ModelConfig, shards: str, path: Path) -> int:
    """Generated images a class for the intra-class FID (``--per-class``), 0 for none: an
    unconditional model has none. ConfigError for a count under 2, or shards whose manifest
    lists another number of classes than the model was trained on."""
    if not model.conditional:
        if per_class:
            raise ConfigError(f"--per-class: {path} holds an unconditional model: it has no intra-class FID")
        return 0
    if per_class is not None and per_class < 0:
        raise ConfigError(f"--per-class: {per_class} is not 0 (no intra-class FID) or a count >= 2")
    count = num_samples // model.num_classes if per_class is None else per_class
    if per_class != 0 and count < 2:
        raise ConfigError(
            f"--per-class: the intra-class FID needs 2 or more images a class, got {count} (--num-samples "
            f"{num_samples} over {model.num_classes} classes); give --per-class N, or --per-class 0 for none"
        )
    listed = shard_classes(shards)
    if count and listed is not None and listed[1] != model.num_classes:
        raise ConfigError(
            f"--shards: {listed[0]} lists {listed[1]} classes; the checkpoint's conditional model has "
            f"{model.num_classes}: its intra-class FID needs the shards it was trained on"
        )
    return count


def intra_class_scores(evaluator: Evaluator, sample, model: ModelConfig, data: DataConfig, per_class: int) -> dict:
    """Collective: a conditional G's intra-class FID (``Evaluator.intra_class_fid``) against
    the real images of each class among the first --num-real of the shards."""
    real = evaluator.labelled_real(data, model)
    labels = real[1]
    if not (labels >= 0).any() or int(labels.max()) >= model.num_classes:  # the same on every rank
        what = "carry no class labels" if not (labels >= 0).any() else f"carry class {int(labels.max())}"
        raise ConfigError(
            f"--shards: the first {len(labels)} images of {data.shards} {what}; the checkpoint's conditional "
            f"model has {model.num_classes} classes (0..{model.num_classes - 1})"
        )
    intra = evaluator.intra_class_fid(sample, model.nz, model.num_classes, per_class, real)
    intra["real_split"] = f"the first {len(labels)} images of {data.shards}, by their class labels"
    if intra["skipped"]:
        log.warning(
            "intra-class FID: classes %s have under 2 real images among the first %d (FID needs 2): left out of "
            "the mean; raise --num-real", intra["skipped"], len(labels),
        )  # fmt: skip
    if intra["intra_fid"] is not None:
        low, high = min(c for c in intra["real"] if c >= 2), max(intra["real"])
        log.info(
            "intra-class FID %.3f: the mean over %d classes of %d generated images each against the class's "
            "%d..%d real images", intra["intra_fid"], model.num_classes - len(intra["skipped"]), per_class, low, high,
        )  # fmt: skip
    return intra


# --------------------------------------------------------------------------- CLI: train-features


def train_features_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dcgan.eval train-features",
        description="Train the offline feature classifier on labelled shards and save it with the "
        "features of a fixed real set: the default extractor of dcgan.eval and eval.every.",
    )
    parser.add_argument("--shards", required=True, help="labelled shards (a folder from dcgan.shards, or a pattern)")
    parser.add_argument("--out", default="", help=f"features file (default: <shards>/{DEFAULT_FEATURES_NAME})")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-real", type=int, default=10000, help="real images whose features are saved")
    parser.add_argument("--channels", type=int, default=0, help="default: the manifest's, else 3")
    parser.add_argument("--image-size", type=int, default=0, help="default: the manifest's, else the first image's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    setup_logging(distributed.read_env().rank)
    try:
        shard_set = resolve_shards(DataConfig(shards=args.shards))
    except ConfigError as e:  # said as the command line's
        raise ConfigError(f"--shards: {str(e).removeprefix('data.shards: ')}") from e
    channels = args.channels or shard_set.channels or 3
    width, height = first_image_size(shard_set) or (0, 0)
    image_size = args.image_size or (width if width == height else 0)
    if not image_size:
        raise ConfigError("--image-size: the shards' size is not known; give it")
    out = Path(args.out) if args.out else Path(args.shards) / DEFAULT_FEATURES_NAME
    try:
        device = distributed.choose_device(args.device, asked="--device cuda")
    except ConfigError as e:  # no CUDA device here
        print(f"dcgan.eval train-features: {e}", file=sys.stderr)
        return EXIT_CONFIG

    images, labels = read_images(shard_set, None, channels, image_size)
    labelled = labels >= 0
    classes = int(labels.max()) + 1 if labelled.any() else 0
    if classes < 2:
        raise ConfigError(
            f"{args.shards}: the samples carry {'no' if classes == 0 else 'one'} class "
            "label(s) (.cls members; dcgan.shards writes them for IDX files with labels, arrays with y, and "
            "folders of class sub-folders); for unlabelled data use eval.inception / --inception"
        )
    if not labelled.all():
        log.warning("%d of %d samples have no label: trained on the others", (~labelled).sum().item(), len(labels))
    t0 = time.perf_counter()
    net, held_out = train_classifier(
        images[labelled],
        labels[labelled],
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
    )
    against = f"held-out accuracy {held_out.accuracy:.4f} on {held_out.images} images, chance {held_out.chance:.3f}"
    if not held_out.clearly_above_chance:  # its features would score noise: not written
        kept = f" ({out} is left as it was)" if out.exists() else ""
        raise ConfigError(
            f"{args.shards}: {against}: not clearly better than chance (needs "
            f"{held_out.bar:.3f}, see dcgan.quality.features.accuracy_bar); {out} not written{kept}. Check that the labels "
            "(.cls) belong to the images, give more labelled images or --epochs, or use eval.inception / --inception"
        )
    real = images[: args.num_real]
    with torch.no_grad():
        real_features = torch.cat([net.features(real[i : i + 500]) for i in range(0, len(real), 500)])
    save_classifier(out, net, real_features, held_out=held_out, shards=args.shards, classes=classes)
    log.info(
        "%s: classifier of %d classes on %d images, %s (needs %.3f), %d real features of %d dims (%.1fs)",
        out, classes, int(labelled.sum()), against, held_out.bar, len(real_features), real_features.shape[1],
        time.perf_counter() - t0,
    )  # fmt: skip
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """The exit code (dcgan/base/exits.py). Bad input, whichever step finds it (the
    environment, the checkpoint, the features file, the shards), ends here: its one line
    and EXIT_CONFIG, before anything is written."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-features"]:
        command, body = "dcgan.eval train-features", lambda: train_features_main(argv[1:])
    else:
        command, body = "dcgan.eval", lambda: score_main(argv)
    try:
        return body()
    except (ConfigError, checkpoint.CheckpointError, FeaturesError) as e:
        print(f"{command}: {e}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
