"""python -m dcgan.generate --checkpoint PATH: images from a trained generator.

  python -m dcgan.generate --checkpoint runs/fashion-mnist/checkpoints/best.pt -n 64 --grid
  python -m dcgan.generate --checkpoint runs/fashion-mnist -n 1000 --out fakes/        # PNG files
  python -m dcgan.generate --checkpoint runs/fashion-mnist --seeds 0-99                # seed0000.png ...
  python -m dcgan.generate --checkpoint runs/fashion-mnist --seeds 3,7,11 --grid --truncation 0.7
  python -m dcgan.generate --checkpoint runs/fashion-mnist --interpolate 10 --strips 8  # latent walks
  python -m dcgan.generate --checkpoint runs/cond -n 16 --class 3                      # a conditional model's class 3
  python -m dcgan.generate --checkpoint runs/cond --class all --grid                   # a row per class

PATH is a checkpoint file (step_*.pt or best.pt) or a run folder (its best.pt when it
has one, else its newest valid checkpoint), loaded by ``dcgan.load_generator``. Runs on
the CPU by default, whatever device wrote the checkpoint (loaded with
``map_location="cpu"`` and ``weights_only=True``). The EMA generator is used when the run
kept one (``--weights raw`` for G), in eval mode. Latents are drawn on the CPU from local
generators (``dcgan/models/latents.py``), so the same arguments and checkpoint give the
same images on any machine, and ``G.sample`` in Python gives this command's PNGs.

Two ways to seed. ``-n N --seed S`` (default 64 images, seed 0): N latents from one
generator seeded with S (``G.sample(N, seed=S)``); image i depends on S and N.
``--seeds LIST`` (``0-99``, ``3,7,11``, ``0-9,20-29``: inclusive ranges and single seeds,
in the order written): one image per seed, its latent drawn from its own generator seeded
with it, so seed s's image is the same whatever the other seeds, their order or
``--batch-size`` (G runs in eval mode, where batch norm uses its running statistics), and
it is ``-n 1 --seed s``'s (``G.sample(seeds=...)``). Only float rounding in the
convolutions changes with the batch: on the CPU by under 1e-7, which can move a pixel by
one level only rarely (not measured on a GPU, where cuDNN picks its algorithm per batch
size). ``--seeds`` does not go with ``-n``, ``--seed`` or ``--strips``.

``--truncation PSI`` (> 0, e.g. 0.5 .. 2): BigGAN's truncation trick. Each coordinate of z
is N(0, 1) truncated to [-PSI, PSI]: it is drawn as without truncation and drawn again,
from the same generator, while outside. Smaller PSI: less variety, more typical images;
leaving it out gives the untruncated latents.

Output (default ``<run folder>/generated/<checkpoint name>/``): ``000000.png`` ..., or
``seed0000.png`` ... with ``--seeds`` (``seed{s:04d}``), or, with ``--grid``, ``grid.png``
(``--seeds``: in seed order). With ``--interpolate K``, ``interpolation.png``: rows of K
images, each walking the latent sphere (slerp) between two codes: ``--strips`` rows between
random codes drawn after the images' (``-n``), or, with ``--seeds``, one row from each seed
to the next (``--seeds 3,7,11``: 3 to 7, 7 to 11). With ``--truncation`` the endpoints are
truncated; the slerp between them may pass slightly outside [-PSI, PSI].

A class-conditional model (``model.conditional``) is given a class with each latent; the
latents are the same whatever the classes. ``--class K`` (0 .. classes-1): every image and
every walk of class K, ``G.sample(..., labels=K)``'s images. ``--class all``: each image
in every class, class k's with the same latents as the others': ``--grid`` makes one row
per class of the ``-n`` images (default 8 with ``--class all``) or the ``--seeds``', so a
column is one latent (no ``--nrow``), the PNGs go into a folder per class (``class0/``
...), and ``interpolation.png`` holds every walk in every class, a class after another.
Without ``--class`` the classes are drawn uniformly at random from the seed (not from
the latents' generator), as ``G.sample`` draws them: ``-n N --seed S``'s from S, each
``--seeds`` seed's from that seed alone; a walk is in one class, random from ``--seed``
(with ``--seeds``, its first seed's). ``--class`` on an unconditional checkpoint, or a
class it does not have: one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from dcgan.base.checks import ConfigError
from dcgan.base.exits import EXIT_CONFIG, EXIT_OK
from dcgan.base.images import save_grid, save_png, to_uint8, to_uint8_grid
from dcgan.base.logs import setup_logging
from dcgan.base.progress import progress
from dcgan.checkpoint import files as checkpoint
from dcgan.checkpoint.inference import OLD_WEIGHTS, WEIGHTS, Generator, load_generator, weights_option
from dcgan.models.latents import check_truncation, draw, parse_seeds, seed_latents
from dcgan.run import distributed

log = logging.getLogger(__name__)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between latent batches a, b (B, nz) at fractions t (K,):
    (B, K, nz). Gaussian latents live near a sphere; a straight line cuts through its
    low-density inside and makes washed-out middles."""
    a_n, b_n = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    omega = torch.acos((a_n * b_n).sum(1).clamp(-1 + 1e-7, 1 - 1e-7))[:, None, None]  # (B, 1, 1)
    t = t[None, :, None]
    sin = torch.sin(omega)
    return (torch.sin((1 - t) * omega) * a[:, None] + torch.sin(t * omega) * b[:, None]) / sin


def seed_list(text: str) -> list[int]:
    """argparse's type for ``--seeds``: ``parse_seeds`` with its one-line errors."""
    try:
        return parse_seeds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def truncation_psi(text: str) -> float:
    """argparse's type for ``--truncation``: a finite number > 0."""
    try:
        return check_truncation(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0 (like 0.7)") from None


def class_choice(text: str) -> int | str:
    """argparse's type for ``--class``: a class index (0, 1, ...) or ``all``."""
    if text == "all":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a class index (0, 1, ...) or all")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked; ``-n``, ``--seed`` and ``--strips`` get their defaults here
    so that giving them with ``--seeds`` can be refused."""
    parser = argparse.ArgumentParser(prog="python -m dcgan.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    parser.add_argument("-n", "--num", type=int, help="images to generate (default 64)")
    parser.add_argument(
        "--seed", type=int, help="seed of the -n latents: the same seed gives the same images (default 0)"
    )
    parser.add_argument(
        "--seeds", type=seed_list, metavar="LIST",
        help="one image per seed, e.g. 0-99, 3,7,11 or 0-9,20-29: seed s always gives the same image (not with -n/--seed)",
    )  # fmt: skip
    parser.add_argument(
        "--truncation", type=truncation_psi, metavar="PSI",
        help="draw each latent coordinate from N(0, 1) truncated to [-PSI, PSI] (default: no truncation)",
    )  # fmt: skip
    parser.add_argument(
        "--class", dest="klass", type=class_choice, metavar="K|all",
        help="a conditional model's class: K for every image and walk, or all: the images in every class, a grid row "
        "or class folder each (default: classes at random from the seed)",
    )  # fmt: skip
    parser.add_argument("--grid", action="store_true", help="one grid.png instead of one PNG per image")
    parser.add_argument("--nrow", type=int, help="images per grid row (default: about sqrt(n); --class all: n)")
    parser.add_argument("--interpolate", type=int, default=0, metavar="K", help="also a latent walk of K steps")
    parser.add_argument("--strips", type=int, help="rows of the latent walk (default 4; with --seeds: seed to seed)")
    parser.add_argument(
        "--weights", choices=(*WEIGHTS, *OLD_WEIGHTS), default="ema",
        help="ema: the EMA generator (default); raw: G itself ('g' is the deprecated spelling of raw)",
    )  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where G runs (default cpu)")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="images per forward pass; lower it if memory runs out (default 256)"
    )
    parser.add_argument("--out", default="", help="output folder (default <run>/generated/<checkpoint>)")
    args = parser.parse_args(argv)
    if args.klass == "all" and args.nrow is not None:
        parser.error("--class all makes one grid row per class, of the -n (or --seeds) images: leave out --nrow")
    if args.seeds is not None:
        given = [
            name
            for name, value in (("-n/--num", args.num), ("--seed", args.seed), ("--strips", args.strips))
            if value is not None
        ]
        if given:
            parser.error(f"--seeds names the images itself: leave out {' and '.join(given)}")
        if args.interpolate and len(args.seeds) < 2:
            parser.error("--interpolate with --seeds walks from seed to seed: give at least 2 seeds")
        args.num = len(args.seeds)
    args.num = (8 if args.klass == "all" else 64) if args.num is None else args.num
    args.nrow = 0 if args.nrow is None else args.nrow
    args.seed = 0 if args.seed is None else args.seed
    args.strips = 4 if args.strips is None else args.strips
    for name in ("num", "batch_size", "strips"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.interpolate == 1 or args.interpolate < 0:
        parser.error("--interpolate needs at least 2 steps")
    try:
        args.device = distributed.choose_device(args.device, asked="--device cuda")
    except distributed.DeviceError as e:
        parser.error(str(e))
    return args


@torch.no_grad()
def render(generator: nn.Module, batches: Iterable[tuple], total: int, device: torch.device):
    """G's images in [-1, 1] on the CPU, a batch of (latents, classes or None) at a time (with progress)."""
    for z, labels in progress(batches, total, "generating"):
        yield generator(z.to(device), None if labels is None else labels.to(device)).cpu()


def class_error(klass: int | str | None, generator: Generator) -> str | None:
    """Why ``--class`` does not fit the checkpoint's model, in one line; None when it does."""
    if klass is None:
        return None
    if not generator.conditional:
        return f"--class: {generator.path} holds an unconditional model (model.conditional=false): it has no classes"
    if klass != "all" and klass >= generator.num_classes:
        return f"--class {klass}: the model has {generator.num_classes} classes, 0..{generator.num_classes - 1}"
    return None


def class_folder(k: int, num_classes: int) -> str:
    """``--class all``'s folder of class k's PNGs: class0 ... class9 (class00 ... with 11 to 100 classes)."""
    return f"class{k:0{len(str(num_classes - 1))}d}"


def write_images(args: argparse.Namespace, generator: Generator, classes: list, out: Path) -> torch.Generator | None:
    """The ``-n`` or ``--seeds`` images, once for each entry of ``classes`` (None: G.labels'
    classes, random from the seed for a conditional G); returns the ``-n`` latents'
    generator, where it stopped: the walks' ends are drawn from there next."""
    nz, psi, size, num = generator.nz, args.truncation, args.batch_size, args.num
    gen = latents = None
    if args.seeds is None:  # all -n latents from one generator
        gen = torch.Generator().manual_seed(args.seed)
        latents = draw(num, nz, gen, psi)

    def batches():  # each batch's latents and classes, class after class
        for k in classes:
            if args.seeds is not None:  # each seed's latent (and random class) from its own generator
                for i in range(0, num, size):
                    part = args.seeds[i : i + size]
                    yield seed_latents(part, nz, psi), generator.labels(seeds=part, labels=k)
            else:
                labels = generator.labels(num, args.seed, labels=k)
                for i in range(0, num, size):
                    yield latents[i : i + size], None if labels is None else labels[i : i + size]

    images = render(generator, batches(), len(classes) * math.ceil(num / size), args.device)
    what = f"step {generator.step} of {generator.path}"
    if args.grid:
        nrow = num if args.klass == "all" else args.nrow or max(1, round(math.sqrt(num)))
        save_grid(to_uint8_grid(torch.cat(list(images)), nrow=nrow), out / "grid.png")
        rows = f", a row of {num} per class" if args.klass == "all" else ""
        log.info("wrote %s (%d images%s, %s)", out / "grid.png", num * len(classes), rows, what)
        return gen
    names = [f"seed{s:04d}.png" for s in args.seeds] if args.seeds is not None else [f"{i:06d}.png" for i in range(num)]
    folders = [class_folder(k, generator.num_classes) for k in classes] if args.klass == "all" else [""]
    for folder in folders:
        (out / folder).mkdir(exist_ok=True)
    written = (out / folder / name for folder in folders for name in names)
    for batch in images:  # written as they come: memory stays one batch
        for image in to_uint8(batch).permute(0, 2, 3, 1).numpy():
            save_png(image, next(written))
    where = f"{out}/{folders[0]} .. {folders[-1]}" if args.klass == "all" else out
    log.info("wrote %d PNGs to %s (%s)", num * len(classes), where, what)
    return gen


def write_walks(args: argparse.Namespace, generator: Generator, classes: list, gen: torch.Generator | None, out: Path):
    """``interpolation.png``: the latent walks, once for each entry of ``classes``, each
    walk within one class (None: a random one from the seed, a walk from seed to seed
    the class of its first seed)."""
    nz, psi = generator.nz, args.truncation
    if args.seeds is not None:  # one walk from each seed to the next
        ends = seed_latents(args.seeds, nz, psi).flatten(1)
        start, stop = ends[:-1], ends[1:]
    else:
        ends = draw(2 * args.strips, nz, gen, psi).flatten(1)
        start, stop = ends[: args.strips], ends[args.strips :]
    walk = slerp(start, stop, torch.linspace(0, 1, args.interpolate)).reshape(-1, nz, 1, 1).to(args.device)
    strips = []
    for k in classes:
        if args.seeds is not None:
            labels = generator.labels(seeds=args.seeds[:-1], labels=k)
        else:
            labels = generator.labels(len(start), args.seed, labels=k)
        labels = None if labels is None else labels.repeat_interleave(args.interpolate).to(args.device)
        with torch.no_grad():
            strips.append(generator(walk, labels).cpu())
    save_grid(to_uint8_grid(torch.cat(strips), nrow=args.interpolate), out / "interpolation.png")
    each = f", in each of {len(classes)} classes" if len(classes) > 1 else ""
    log.info("wrote %s (%d walks of %d steps%s)", out / "interpolation.png", len(start), args.interpolate, each)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(0)
    try:
        generator = load_generator(args.checkpoint, weights_option(args.weights), args.device)
    except (checkpoint.CheckpointError, ConfigError) as e:
        print(f"dcgan.generate: {e}", file=sys.stderr)
        return EXIT_CONFIG
    wrong = class_error(args.klass, generator)
    if wrong is not None:
        print(f"python -m dcgan.generate: error: {wrong}", file=sys.stderr)
        return EXIT_CONFIG
    path = generator.path
    out = Path(args.out) if args.out else path.parent.parent / "generated" / path.stem
    out.mkdir(parents=True, exist_ok=True)
    # The class of each pass over the latents: None for G.labels' (none for an unconditional G).
    classes = {None: [None], "all": list(range(generator.num_classes))}.get(args.klass, [args.klass])
    gen = write_images(args, generator, classes, out)
    if args.interpolate:
        write_walks(args, generator, classes, gen, out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
