"""python -m dcgan.generate --checkpoint PATH: images from a trained generator.

  python -m dcgan.generate --checkpoint runs/fashion-mnist/checkpoints/best.pt -n 64 --grid
  python -m dcgan.generate --checkpoint runs/fashion-mnist -n 1000 --out fakes/        # PNG files
  python -m dcgan.generate --checkpoint runs/fashion-mnist --seeds 0-99                # seed0000.png ...
  python -m dcgan.generate --checkpoint runs/fashion-mnist --seeds 3,7,11 --grid --truncation 0.7
  python -m dcgan.generate --checkpoint runs/fashion-mnist --interpolate 10 --strips 8  # latent walks

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
from dcgan.checkpoint.inference import OLD_WEIGHTS, WEIGHTS, load_generator, weights_option
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
    parser.add_argument("--grid", action="store_true", help="one grid.png instead of one PNG per image")
    parser.add_argument("--nrow", type=int, default=0, help="images per grid row (default: about sqrt(n))")
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
    args.num = 64 if args.num is None else args.num
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
def render(generator: nn.Module, batches: Iterable[torch.Tensor], total: int, device: torch.device):
    """G's images in [-1, 1] on the CPU, a batch of latents at a time (with progress)."""
    for z in progress(batches, total, "generating"):
        yield generator(z.to(device)).cpu()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(0)
    try:
        generator = load_generator(args.checkpoint, weights_option(args.weights), args.device)
    except (checkpoint.CheckpointError, ConfigError) as e:
        print(f"dcgan.generate: {e}", file=sys.stderr)
        return EXIT_CONFIG
    path, nz, psi, size = generator.path, generator.nz, args.truncation, args.batch_size
    out = Path(args.out) if args.out else path.parent.parent / "generated" / path.stem
    out.mkdir(parents=True, exist_ok=True)
    if args.seeds is not None:  # each seed's latent from its own generator, a batch of seeds at a time
        batches = (seed_latents(args.seeds[i : i + size], nz, psi) for i in range(0, args.num, size))
        names = [f"seed{s:04d}.png" for s in args.seeds]
    else:  # all -n latents from one generator, then the walk's ends from where it stopped
        gen = torch.Generator().manual_seed(args.seed)
        latents = draw(args.num, nz, gen, psi)
        batches = (latents[i : i + size] for i in range(0, args.num, size))
        names = [f"{i:06d}.png" for i in range(args.num)]
    images = render(generator, batches, math.ceil(args.num / size), args.device)
    if args.grid:
        nrow = args.nrow or max(1, round(math.sqrt(args.num)))
        save_grid(to_uint8_grid(torch.cat(list(images)), nrow=nrow), out / "grid.png")
        log.info("wrote %s (%d images, step %d of %s)", out / "grid.png", args.num, generator.step, path)
    else:
        written = iter(names)
        for batch in images:  # written as they come: memory stays one batch
            for image in to_uint8(batch).permute(0, 2, 3, 1).numpy():
                save_png(image, out / next(written))
        log.info("wrote %d PNGs to %s (step %d of %s)", args.num, out, generator.step, path)
    if args.interpolate:
        if args.seeds is not None:  # one walk from each seed to the next
            ends = seed_latents(args.seeds, nz, psi).flatten(1)
            start, stop = ends[:-1], ends[1:]
        else:
            ends = draw(2 * args.strips, nz, gen, psi).flatten(1)
            start, stop = ends[: args.strips], ends[args.strips :]
        walk = slerp(start, stop, torch.linspace(0, 1, args.interpolate))
        with torch.no_grad():
            strip = generator(walk.reshape(-1, nz, 1, 1).to(args.device)).cpu()
        save_grid(to_uint8_grid(strip, nrow=args.interpolate), out / "interpolation.png")
        log.info("wrote %s (%d walks of %d steps)", out / "interpolation.png", len(start), args.interpolate)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
