"""python -m dcgan.generate --checkpoint PATH: images from a trained generator.

  python -m dcgan.generate --checkpoint runs/fashion-mnist/checkpoints/best.pt -n 64 --grid
  python -m dcgan.generate --checkpoint runs/fashion-mnist -n 1000 --out fakes/        # PNG files
  python -m dcgan.generate --checkpoint runs/fashion-mnist --interpolate 10 --strips 8  # latent walks

PATH is a checkpoint file (step_*.pt or best.pt) or a run folder (its best.pt when it
has one, else its newest valid checkpoint), loaded by ``dcgan.load_generator``. Runs on
the CPU by default, whatever device wrote the checkpoint (loaded with
``map_location="cpu"`` and ``weights_only=True``). The EMA generator is used when the run
kept one (``--weights raw`` for G), in eval mode. ``--seed`` fixes the latents: the same
seed and checkpoint give the same images on any machine (``G.sample(n, seed=...)`` in
Python gives this command's PNGs).

Output (default ``<run folder>/generated/<checkpoint name>/``): ``000000.png`` ... or,
with ``--grid``, ``grid.png``; with ``--interpolate K``, ``interpolation.png``: ``--strips``
rows of K images each, walking the latent sphere (slerp) from one random code to another.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch

from dcgan.base.checks import ConfigError
from dcgan.base.exits import EXIT_CONFIG, EXIT_OK
from dcgan.base.images import save_grid, save_png, to_uint8, to_uint8_grid
from dcgan.base.logs import setup_logging
from dcgan.base.progress import progress
from dcgan.checkpoint import files as checkpoint
from dcgan.checkpoint.inference import OLD_WEIGHTS, WEIGHTS, load_generator, weights_option
from dcgan.models.networks import sample_latent
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgan.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    parser.add_argument("-n", "--num", type=int, default=64, help="images to generate (default 64)")
    parser.add_argument("--grid", action="store_true", help="one grid.png instead of one PNG per image")
    parser.add_argument("--nrow", type=int, default=0, help="images per grid row (default: about sqrt(n))")
    parser.add_argument("--interpolate", type=int, default=0, metavar="K", help="also a latent walk of K steps")
    parser.add_argument("--strips", type=int, default=4, help="rows of the latent walk (default 4)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the latents: the same seed gives the same images (default 0)"
    )
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
    setup_logging(0)
    for name in ("num", "batch_size", "strips"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.interpolate == 1 or args.interpolate < 0:
        parser.error("--interpolate needs at least 2 steps")
    try:
        device = distributed.choose_device(args.device, asked="--device cuda")
    except distributed.DeviceError as e:
        parser.error(str(e))
    try:
        generator = load_generator(args.checkpoint, weights_option(args.weights), device)
    except (checkpoint.CheckpointError, ConfigError) as e:
        print(f"dcgan.generate: {e}", file=sys.stderr)
        return EXIT_CONFIG
    path, nz = generator.path, generator.nz
    out = Path(args.out) if args.out else path.parent.parent / "generated" / path.stem
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)

    latents = sample_latent(args.num, nz, generator=gen)
    images = []
    with torch.no_grad():
        for i in progress(range(0, args.num, args.batch_size), math.ceil(args.num / args.batch_size), "generating"):
            images.append(generator(latents[i : i + args.batch_size].to(device)).cpu())
    images = torch.cat(images)
    if args.grid:
        nrow = args.nrow or max(1, round(math.sqrt(args.num)))
        save_grid(to_uint8_grid(images, nrow=nrow), out / "grid.png")
        log.info("wrote %s (%d images, step %d of %s)", out / "grid.png", args.num, generator.step, path)
    else:
        pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
        for i, image in enumerate(pixels):
            save_png(image, out / f"{i:06d}.png")
        log.info("wrote %d PNGs to %s (step %d of %s)", args.num, out, generator.step, path)
    if args.interpolate:
        ends = sample_latent(2 * args.strips, nz, generator=gen).flatten(1)
        walk = slerp(ends[: args.strips], ends[args.strips :], torch.linspace(0, 1, args.interpolate))
        with torch.no_grad():
            strip = generator(walk.reshape(-1, nz, 1, 1).to(device)).cpu()
        save_grid(to_uint8_grid(strip, nrow=args.interpolate), out / "interpolation.png")
        log.info("wrote %s (%d walks of %d steps)", out / "interpolation.png", args.strips, args.interpolate)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
