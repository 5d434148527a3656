"""python -m dcgan.shards SOURCE OUT_DIR: images -> webdataset tar shards + manifest.json;
python -m dcgan.shards index FOLDER: a manifest.json for shards another tool wrote.

The command only: what it reads, writes and counts is dcgan/data/writing.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from dcgan.base.exits import EXIT_CONFIG, EXIT_OK
from dcgan.data.shardset import (
    MANIFEST,
)
from dcgan.data.writing import EncodeOptions, SourceError, index_folder, log, open_source, prepare_out_dir, write_shards

# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["index"]:
        return index_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m dcgan.shards",
        description="Write the images of SOURCE (a folder, with one sub-folder per class for labels; an IDX file "
        "or folder; .npy or .npz) as webdataset tar shards with a manifest.json in OUT_DIR.",
        epilog="Shards written by another tool (img2dataset, webdataset): python -m dcgan.shards index FOLDER",
    )
    parser.add_argument("source", type=Path, help="image folder, IDX file or folder, .npy or .npz")
    parser.add_argument("out_dir", type=Path, help="folder for shard-NNNNNN.tar and manifest.json")
    parser.add_argument("--size", type=int, help="resize shorter side + centre crop to SIZE x SIZE")
    parser.add_argument(
        "--format", dest="image_format", choices=["png", "jpg", "npy", "raw"], default="png",
        help="raw: --per-member images per tar member as one uint8 .npy, decoded without PIL",
    )  # fmt: skip
    parser.add_argument("--per-member", type=int, default=256, help="images per member with --format raw (256)")
    parser.add_argument("--channels", type=int, choices=[1, 3], help="1 grey, 3 RGB (default: the source's)")
    parser.add_argument("--per-shard", type=int, default=10000, help="images per shard (default 10000)")
    parser.add_argument("--max-shard-bytes", type=float, default=1e9, help="start a new shard past this size")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    parser.add_argument("--seed", type=int, default=0, help="seed of the write-order shuffle")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="encoding processes")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    if args.size is not None and args.size < 1:
        parser.error("--size must be >= 1")
    if args.per_shard < 1:
        parser.error("--per-shard must be >= 1")
    if args.per_member < 1:
        parser.error("--per-member must be >= 1")
    try:
        source = open_source(args.source)
        prepare_out_dir(args.out_dir, args.overwrite)
        opts = EncodeOptions(size=args.size, channels=args.channels or source.channels, image_format=args.image_format)
        manifest = write_shards(
            source,
            args.out_dir,
            opts=opts,
            per_shard=args.per_shard,
            per_member=args.per_member,
            max_shard_bytes=args.max_shard_bytes,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            workers=max(1, args.workers),
            source_name=str(args.source),
        )
    except SourceError as e:
        print(f"dcgan.shards: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    log.info(
        "wrote %d samples in %d shards to %s (%d skipped)",
        manifest["samples"],
        len(manifest["shards"]),
        args.out_dir,
        manifest["skipped"],
    )
    return EXIT_OK


def index_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dcgan.shards index",
        description="Count the samples of every shard in FOLDER (written by any tool: img2dataset, webdataset's "
        "ShardWriter, tar) and write FOLDER/manifest.json with the counts, image size and channels, which "
        "training plans with.",
    )
    parser.add_argument("folder", type=Path, help="folder of .tar shards")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="shards read in parallel")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        manifest = index_folder(args.folder, max(1, args.workers))
    except SourceError as e:
        print(f"dcgan.shards index: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    size = f"{manifest['image_size']}px" if manifest["image_size"] else "sizes " + ", ".join(manifest["image_sizes"])
    log.info(
        "wrote %s: %d samples in %d shards, %s, %d channel(s)",
        args.folder / MANIFEST, manifest["samples"], len(manifest["shards"]), size, manifest["channels"],
    )  # fmt: skip
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
