"""python -m dcgan.eval: sample quality of a generator, and the features file it is scored with.

  # once per dataset: train the offline feature classifier on the labelled shards
  python -m dcgan.eval train-features --shards data/fashion-mnist   # -> data/fashion-mnist/features.pt
  # FID, KID, precision/recall of a checkpoint (alone or under torchrun, any world size)
  python -m dcgan.eval --checkpoint runs/fashion-mnist/checkpoints/best.pt [--features F | --inception W]

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
from dcgan.quality.evaluator import DEFAULT_FEATURES_NAME, Evaluator, choose_extractor, eval_mode_sampler, log
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
        description="FID, KID and precision/recall (k=3) of a checkpoint's generator. "
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
    dist = distributed.setup(args.device)
    try:
        generator = generator.to(dist.device)
        # FeaturesError: the same file on every rank, so every rank says so (main) and exits alike.
        evaluator = Evaluator.build(choice, ecfg, DataConfig(shards=shards), model, dist)
        scores = evaluator.evaluate(eval_mode_sampler(generator), model.nz)
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
            log.info("%s at step %d: %s", path, sd["step"], format_scores(scores))
            print(json.dumps(report, indent=1))
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        distributed.barrier(dist)
        return EXIT_OK
    finally:
        distributed.teardown()


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
