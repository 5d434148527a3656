"""python -m dcgan.shards SOURCE OUT_DIR: images -> webdataset tar shards + manifest.json;
python -m dcgan.shards index FOLDER: a manifest.json for shards another tool wrote.

SOURCE is one of
  * a folder of images, searched recursively, any format PIL reads; the first level of
    sub-folders names the classes (sorted, as torchvision's ImageFolder does). With class
    folders, an image beside them (at the top level) has no class: it is refused (exit 2,
    naming it) rather than written with no label. Each sample's key keeps where it came
    from: ``<write index>-<its path under SOURCE, each run of other characters than
    letters, digits, _ and - as _>`` (the last 60 characters), so a sample the reader
    reports as corrupt names its image;
  * MNIST-family IDX files, gzipped or not: one ``*-images-idx3-ubyte[.gz]`` file, or a
    folder holding several (all are written, e.g. train + t10k = 70k for Fashion-MNIST),
    with labels from the matching ``*-labels-idx1-ubyte[.gz]`` beside each;
  * a ``.npy`` array or ``.npz`` archive of N images (N,H,W), (N,H,W,C) or (N,C,H,W),
    uint8, or float in [0, 1] or [-1, 1]; labels from an ``y``/``labels`` array if present.

Each sample is ``<key>.<png|jpg|npy>`` plus ``<key>.cls`` (the label, when there is one),
written with webdataset's ShardWriter to ``OUT_DIR/shard-NNNNNN.tar``. The source order
is shuffled first (``--seed``) so every shard holds a mix of classes. ``--size S``
resizes the shorter side to S and centre-crops S x S, as the seeds' transforms do, so
training decodes small images and never resizes. Without it, images of several sizes
are written as they are: the manifest's ``image_size`` is then null and ``image_sizes``
counts each size, and a line says that training resizes and crops each one. Unreadable
images are named, counted and skipped. ``manifest.json`` is written last: a folder
without one is unfinished. It records each shard's content (``shard_content``: bytes,
mtime and the digest of its members' names and sizes, dcgan/data/shardset.py), which the
checkpoints' data identity then takes without reading the shards again.

``--format raw`` stores ``--per-member`` images (256) per tar sample instead, for sets
read from disk at speed: ``<key>.images.npy``, uint8 (n, H, W, C), and, when the source
has labels, ``<key>.labels.npy``, int64 (n,); they decode with no PIL and no tar header
per image. Counts (``--per-shard``, the manifest's) stay in images: a shard holds whole
members, ``--per-shard`` rounded down to a multiple of the member size, and the manifest
adds ``images_per_member``. A member holds images of one size (without ``--size``, a
new one starts where the size changes).

``index FOLDER`` reads every shard in FOLDER (img2dataset's, webdataset's ShardWriter's,
plain tar's), in parallel, and writes ``FOLDER/manifest.json`` with the samples of each
shard, the image size and channels found in the data and each shard's content (fields of
an existing manifest that it does not count, such as ``classes``, are kept); a raw member's images are counted
from its npy header, without loading it. Training then plans with true counts; see
dcgan/data/shardset.py for what counts as a sample.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import math
import multiprocessing
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import webdataset as wds
from PIL import Image

from dcgan.base.fileio import write_atomic
from dcgan.base.progress import progress
from dcgan.data.shardset import (
    GREY_MODES,
    MANIFEST,
    RAW_LABELS,
    RAW_MEMBER,
    convert_image,
    image_member,
    index_command,
    npy_header,
    open_image,
    raw_count,
    shard_record,
    some_of,
    tar_files,
    tar_groups,
)

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"


class SourceError(ValueError):
    """SOURCE cannot be read as any supported kind; the message names the path."""


# --------------------------------------------------------------------------- sources


@dataclass
class Item:
    """One image to write: either a file to open or pixels already in memory."""

    name: str  # shown in error messages: a path, or "<file>[index]"
    label: int  # -1: no label
    path: str | None = None
    pixels: np.ndarray | None = None  # uint8, (H, W) or (H, W, C)
    source: str = ""  # a file's path under the source folder, kept in its sample's key


@dataclass
class Source:
    kind: str  # "folder" | "idx" | "array"
    items: list[Item]
    classes: list[str]
    channels: int  # native channels; --channels may override


def open_source(path: Path) -> Source:
    if path.is_dir():
        idx_files = sorted(p for p in path.iterdir() if _is_idx_images(p))
        return _idx_source(idx_files) if idx_files else _folder_source(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.suffix in (".npy", ".npz"):
        return _array_source(path)
    if _is_idx_images(path):
        return _idx_source([path])
    raise SourceError(f"{path}: not a folder, an IDX images file or a .npy/.npz array")


def _is_idx_images(path: Path) -> bool:
    return path.is_file() and re.search(r"idx3-ubyte(\.gz)?$", path.name) is not None


def _folder_source(root: Path) -> Source:
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise SourceError(f"{root}: no image files found (looked recursively for {len(extensions)} PIL formats)")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    loose = [str(p.relative_to(root)) for p in files if len(p.relative_to(root).parts) == 1]
    if classes and loose:
        raise SourceError(
            f"{root}: {len(loose)} image(s) lie beside the class folders, in none of them ({some_of(loose)}), so they "
            f"have no class; move them into a class folder ({some_of(classes)}) or out of {root}"
        )
    class_index = {c: i for i, c in enumerate(classes)}
    items = []
    for p in files:
        parts = p.relative_to(root).parts
        label = class_index[parts[0]] if len(parts) > 1 else -1
        items.append(Item(name=str(p), label=label, path=str(p), source="/".join(parts)))
    return Source("folder", items, classes, channels=3)


def sample_key(index: int, source: str) -> str:
    """A sample's tar key: its write index (unique, in write order), then where it came
    from, as far as a key can say it (no dots: webdataset splits the key at the first; no
    slashes; 70 characters at most, so a member's name fits a plain ustar header)."""
    if not source:
        return f"{index:09d}"
    return f"{index:09d}-{re.sub(r'[^A-Za-z0-9_-]+', '_', source)[-60:]}"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (http://yann.lecun.com/exdb/mnist/ format), gzipped or not, as an array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise SourceError(f"{path}: cannot read IDX file: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SourceError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SourceError(f"{path}: holds {body.size} bytes of data, header says {dims} (truncated?)")
    return body.reshape(dims)


def _idx_source(image_files: list[Path]) -> Source:
    items: list[Item] = []
    for images_path in image_files:
        images = read_idx(images_path)
        if images.ndim != 3:
            raise SourceError(f"{images_path}: expected N x H x W images, got shape {images.shape}")
        labels_path = images_path.with_name(images_path.name.replace("images-idx3", "labels-idx1"))
        labels = read_idx(labels_path) if labels_path.exists() else None
        if labels is not None and labels.shape != (len(images),):
            raise SourceError(f"{labels_path}: {labels.shape[0]} labels for {len(images)} images")
        for i, img in enumerate(images):
            label = int(labels[i]) if labels is not None else -1
            items.append(Item(name=f"{images_path}[{i}]", label=label, pixels=img))
    has_labels = any(it.label >= 0 for it in items)
    classes = [str(c) for c in range(max(it.label for it in items) + 1)] if has_labels else []
    return Source("idx", items, classes, channels=1)


def _array_source(path: Path) -> Source:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: cannot read array file: {e}") from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        arrays = {k: loaded[k] for k in loaded.files}
        image_key = next((k for k in ("x", "images", "X", "arr_0") if k in arrays), None)
        if image_key is None:
            image_key = next((k for k, a in arrays.items() if a.ndim >= 3), None)
        if image_key is None:
            raise SourceError(f"{path}: no image array (keys: {', '.join(arrays)})")
        images = arrays[image_key]
        label_key = next((k for k in ("y", "labels", "label", "targets") if k in arrays), None)
        labels = arrays[label_key] if label_key else None
    else:
        images = loaded
    images = _to_uint8_hwc(images, path)
    if labels is not None and labels.shape != (len(images),):
        raise SourceError(f"{path}: {labels.shape} labels for {len(images)} images")
    items = [
        Item(name=f"{path}[{i}]", label=int(labels[i]) if labels is not None else -1, pixels=img)
        for i, img in enumerate(images)
    ]
    classes = [str(c) for c in range(int(labels.max()) + 1)] if labels is not None else []
    channels = 1 if images.ndim == 3 else images.shape[-1]
    return Source("array", items, classes, channels)


def _to_uint8_hwc(images: np.ndarray, path: Path) -> np.ndarray:
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise SourceError(f"{path}: expected images (N,H,W), (N,H,W,C) or (N,C,H,W), got {images.shape}")
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        lo, hi = float(images.min()), float(images.max())
        if lo >= 0 and hi <= 1:
            return np.round(images * 255).astype(np.uint8)
        if lo >= -1 and hi <= 1:
            return np.round((images + 1) * 127.5).astype(np.uint8)
        raise SourceError(f"{path}: float images must lie in [0, 1] or [-1, 1], found [{lo}, {hi}]")
    if np.issubdtype(images.dtype, np.integer) and images.min() >= 0 and images.max() <= 255:
        return images.astype(np.uint8)
    raise SourceError(f"{path}: unsupported pixel type {images.dtype}")


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodeOptions:
    size: int | None
    channels: int
    image_format: str  # png | jpg | npy | raw


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) + CenterCrop(size) on a PIL image, as the seeds apply them."""
    w, h = img.size
    if min(w, h) != size:
        w, h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        img = img.resize((w, h), Image.BILINEAR)
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class Encoded(NamedTuple):
    data: bytes | np.ndarray | None  # raw: the uint8 (H, W, C) pixels; None: the image could not be read
    size: tuple[int, int] | None  # (height, width) of what was encoded
    error: str


def encode_item(item: Item, opts: EncodeOptions) -> Encoded:
    """The item's encoded bytes and size, or the reason it cannot be read."""
    try:
        if item.path is not None:
            with Image.open(item.path) as opened:
                img = convert_image(opened, opts.channels)
        else:
            img = convert_image(Image.fromarray(item.pixels), opts.channels)
        if opts.size is not None:
            img = resize_center_crop(img, opts.size)
        if opts.image_format == "raw":  # pixels kept: write_shards stacks them into members
            return Encoded(np.asarray(img).reshape(img.height, img.width, opts.channels), (img.height, img.width), "")
        buf = io.BytesIO()
        if opts.image_format == "npy":
            np.save(buf, np.asarray(img), allow_pickle=False)
        elif opts.image_format == "jpg":
            img.save(buf, format="JPEG", quality=95)
        else:
            img.save(buf, format="PNG")
        return Encoded(buf.getvalue(), (img.height, img.width), "")
    except Exception as e:  # PIL raises many types for bad files; all mean "skip this one"
        return Encoded(None, None, f"{type(e).__name__}: {e}")


def _encode_star(args: tuple[Item, EncodeOptions]) -> Encoded:
    return encode_item(*args)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- writing


def write_shards(
    source: Source,
    out_dir: Path,
    *,
    opts: EncodeOptions,
    per_shard: int,
    per_member: int = 256,
    max_shard_bytes: float,
    shuffle: bool,
    seed: int,
    workers: int,
    source_name: str,
) -> dict[str, Any]:
    """Write ``source`` as shards into ``out_dir`` and return the manifest (also on disk).
    ``per_shard`` counts images; with raw members, a shard holds whole members."""
    order = np.arange(len(source.items))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(source.items))
    items = [source.items[i] for i in order]

    jobs = ((it, opts) for it in items)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    encoded = pool.imap(_encode_star, jobs, chunksize=64) if pool else map(_encode_star, jobs)
    raw = opts.image_format == "raw"
    # ShardWriter counts tar samples: with raw members, per_shard // member_size of them (a
    # member never straddles two shards); at most --per-shard images per member, too.
    member_size = min(per_member, per_shard) if raw else 1
    try:
        counts, skipped, written, sizes = write_tars(
            items, encoded, out_dir, opts, member_size=member_size, per_shard=per_shard, max_shard_bytes=max_shard_bytes
        )
    finally:
        if pool:
            pool.close()
            pool.join()
    # ShardWriter opens its first tar before any write; drop it if nothing went in.
    for tar in out_dir.glob("shard-*.tar"):
        if tar.name not in counts:
            tar.unlink()
    if written == 0:
        raise SourceError(f"{source_name}: none of the {len(items)} images could be read")

    image_size = square_size(sizes)
    shards = sorted(counts)
    manifest = {
        "format_version": 1,
        "shards": shards,
        "shard_samples": [counts[n] for n in shards],
        "samples": written,
        "image_size": image_size,
        "image_sizes": {f"{w}x{h}": n for (h, w), n in sizes.most_common(10)},
        "channels": opts.channels,
        "image_format": opts.image_format,
        **({"images_per_member": member_size} if raw else {}),
        "classes": source.classes,
        "source": source_name,
        "source_kind": source.kind,
        "shuffled_with_seed": seed if shuffle else None,
        "skipped": len(skipped),
        "skipped_items": skipped[:1000],
        "shard_content": [shard_record(out_dir / name) for name in shards],
    }
    write_atomic(out_dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest


class Written(NamedTuple):
    """What ``write_tars`` wrote."""

    counts: dict[str, int]  # shard file name -> images
    skipped: list[dict[str, str]]  # {"name", "error"} of each image that could not be read
    written: int  # images
    sizes: Counter  # (height, width) -> images


def write_tars(
    items: list[Item],
    encoded: Iterator[Encoded],
    out_dir: Path,
    opts: EncodeOptions,
    *,
    member_size: int,
    per_shard: int,
    max_shard_bytes: float,
) -> Written:
    """The encoded ``items`` into tar shards in ``out_dir``: one sample per image, or with
    raw members ``member_size`` images of one size per member. Unreadable ones are skipped."""
    counts: dict[str, int] = {}
    skipped: list[dict[str, str]] = []
    written = 0
    sizes: Counter = Counter()  # (height, width) -> images
    raw = opts.image_format == "raw"
    labelled = any(it.label >= 0 for it in items)
    pending: list[tuple[np.ndarray, int]] = []  # raw: the images (and labels) of the member being filled
    first = 0  # raw: the write index of its first image, which keys the member
    # A fixed integer mtime: webdataset stamps each member with time.time(), a float,
    # which makes tarfile add a PAX header block to every member; parsing those was
    # half the cost of reading a sample (bench/data.py). Same input, same bytes, too.
    with wds.ShardWriter(
        str(out_dir / SHARD_PATTERN),
        maxcount=per_shard // member_size,
        maxsize=max_shard_bytes,
        verbose=0,
        mtime=0,
    ) as sink:

        def put(sample: dict[str, Any], images: int) -> None:
            sink.write(sample)
            name = os.path.basename(sink.fname)
            counts[name] = counts.get(name, 0) + images

        for item, (data, size, error) in progress(zip(items, encoded), len(items), "shards", "img", log):
            if data is None:
                skipped.append({"name": item.name, "error": error})
                log.warning("skipped unreadable image %s (%s)", item.name, error)
                continue
            if not raw:
                sample = {"__key__": sample_key(written, item.source), opts.image_format: data}
                if item.label >= 0:
                    sample["cls"] = str(item.label).encode()
                put(sample, 1)
            else:
                if pending and pending[0][0].shape != data.shape:  # a member stacks images of one size
                    put(raw_member(first, pending, labelled), len(pending))
                    pending = []
                first = first if pending else written
                pending.append((data, item.label))
                if len(pending) == member_size:
                    put(raw_member(first, pending, labelled), len(pending))
                    pending = []
            written += 1
            sizes[size] += 1
        if pending:
            put(raw_member(first, pending, labelled), len(pending))
    return Written(counts, skipped, written, sizes)


def square_size(sizes: Counter) -> int | None:
    """The set's image size, when every image has it (always so with --size) and it is
    square; else None, said in one warning (training then resizes each image)."""
    (only,) = sizes if len(sizes) == 1 else (None,)
    if only and only[0] == only[1]:
        return only[0]
    log.warning(
        "the images are %s (%s): manifest.json records no image_size, and training resizes the shorter side of "
        "each to model.image_size and centre-crops it, which slows reading about 3x; --size S writes them at "
        "S x S once",
        f"of {len(sizes)} sizes" if len(sizes) > 1 else "not square",
        ", ".join(f"{w}x{h}: {n}" for (h, w), n in sizes.most_common(5)) + (", ..." if len(sizes) > 5 else ""),
    )
    return None


def raw_member(first: int, pending: list[tuple[np.ndarray, int]], labelled: bool) -> dict[str, Any]:
    """A tar sample of stacked images, keyed by the write index of the first (the keys of a
    set stay unique and in write order); their labels too when the set has labels."""
    sample: dict[str, Any] = {"__key__": f"{first:09d}", RAW_MEMBER: npy_bytes(np.stack([p for p, _ in pending]))}
    if labelled:
        sample[RAW_LABELS] = npy_bytes(np.array([label for _, label in pending], np.int64))
    return sample


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    old = list(out_dir.glob("shard-*.tar")) + list(out_dir.glob(MANIFEST))
    if old and not overwrite:
        raise SourceError(f"{out_dir}: already holds shards or a manifest; pass --overwrite to replace them")
    for p in old:
        p.unlink()


# --------------------------------------------------------------------------- indexing other writers' shards


@dataclass
class ShardCount:
    """What ``count_shard`` found in one shard."""

    name: str
    samples: int = 0  # images: groups with an image member, and each image of a raw member
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    grey: int = 0  # images with one channel of pixels
    unopenable: int = 0  # images that do not open (counted: the reader skips them as corrupt)
    not_samples: int = 0  # groups with no image member (not counted, never read)
    suffixes: set[str] = field(default_factory=set)  # the members of those groups
    error: str = ""  # why the shard could not be read to its end
    content: dict[str, Any] = field(default_factory=dict)  # its bytes, mtime and digest (shard_record)


def count_shard(path: str) -> ShardCount:
    """Count the samples of one shard and note each image's size and channels (from the
    image header: nothing is decoded)."""
    found = ShardCount(Path(path).name)
    with contextlib.suppress(OSError):  # unreadable: the error below says so, and identity reads it again
        found.content = shard_record(path)
    try:
        with contextlib.closing(wds.gopen(path)) as stream:
            for group in tar_groups(stream, path):
                member = image_member(group)
                if member is None:
                    found.not_samples += 1
                    found.suffixes.update(k for k in group if not k.startswith("__"))
                    continue
                if member == RAW_MEMBER:
                    count_raw_member(found, group)
                    continue
                found.samples += 1
                try:
                    with open_image(group[member], member) as image:
                        found.sizes[image.size] += 1
                        found.grey += image.mode in GREY_MODES
                except Exception:  # PIL raises many types; all mean "this image will not decode"
                    found.unopenable += 1
    except Exception as e:  # truncated, not a tar, unreadable: the samples before the damage count
        found.error = f"{type(e).__name__}: {e}"
    return found


def count_raw_member(found: ShardCount, group: dict[str, Any]) -> None:
    """A raw member's images, size and channels, from the npy headers of its images and
    labels: the data is not loaded (only its length checked), so counting stays fast."""
    n = raw_count(group[RAW_MEMBER])  # what the reader yields for it, whether or not it loads
    found.samples += n
    try:
        shape, dtype = _npy_shape(group[RAW_MEMBER])
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
            raise ValueError(f"raw images must be uint8 (n,H,W,C) with C in 1, 3; got {dtype} {shape}")
        if RAW_LABELS in group:
            label_shape, label_dtype = _npy_shape(group[RAW_LABELS])
            if label_dtype.kind not in "iu" or label_shape != (n,):
                raise ValueError(f"labels must be integers ({n},); got {label_dtype} {label_shape}")
    except Exception:  # unreadable or wrong: the reader skips each of its images as corrupt
        found.unopenable += n
        return
    found.sizes[(shape[2], shape[1])] += n
    found.grey += n if shape[-1] == 1 else 0


def _npy_shape(data: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """An npy member's shape and dtype from its header; ValueError when its data is cut short."""
    shape, dtype, offset, fortran = npy_header(data)
    if fortran:  # the reader takes C order only
        raise ValueError(f"{dtype} {shape} in Fortran order")
    if len(data) < offset + math.prod(shape) * dtype.itemsize:
        raise ValueError(f"truncated: {len(data) - offset} bytes of data for {dtype} {shape}")
    return shape, dtype


def index_manifest(folder: Path, found: list[ShardCount], old: dict[str, Any]) -> dict[str, Any]:
    """The manifest of counted shards; fields of ``old`` that counting does not give are kept."""
    sizes = sum((f.sizes for f in found), Counter())
    (only,) = sizes if len(sizes) == 1 else (None,)
    opened = sum(sizes.values())
    return {
        **old,
        "format_version": 1,
        "shards": [f.name for f in found],
        "shard_samples": [f.samples for f in found],
        "samples": sum(f.samples for f in found),
        "image_size": only[0] if only and only[0] == only[1] else None,
        "channels": 1 if opened and sum(f.grey for f in found) == opened else 3,
        "image_sizes": {f"{w}x{h}": n for (w, h), n in sizes.most_common(10)},
        "indexed_by": index_command(folder),
        "shard_content": [f.content or None for f in found],
    }


def index_folder(folder: Path, workers: int) -> dict[str, Any]:
    """Count every shard in ``folder`` and write its manifest.json; returns the manifest."""
    if not folder.is_dir():
        raise SourceError(f"{folder}: not a folder")
    tars = tar_files(folder)
    if not tars:
        raise SourceError(f"{folder}: no shards (.tar, .tar.gz, .tgz) in it")
    paths = [str(t) for t in tars]
    pool = multiprocessing.get_context("fork").Pool(min(workers, len(paths))) if workers > 1 else None
    try:
        counted = pool.imap(count_shard, paths) if pool else map(count_shard, paths)
        found = list(progress(counted, len(paths), "counting samples", "shards", log))
    finally:
        if pool:
            pool.close()
            pool.join()
    if not any(f.samples for f in found):
        seen = sorted(set().union(*(f.suffixes for f in found)))
        raise SourceError(
            f"{folder}: no shard holds an image member ({', '.join(s.rsplit('.', 1)[-1] for s in seen[:10]) or 'none'} "
            "found; images are read from members ending in png, jpg, jpeg, webp, npy and the other formats of "
            "dcgan/data/shardset.py)"
        )
    old_path = folder / MANIFEST
    old = read_old_manifest(old_path)
    manifest = index_manifest(folder, found, old)
    write_atomic(old_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    _report_index(found, old)
    return manifest


def read_old_manifest(path: Path) -> dict[str, Any]:
    """The manifest ``index`` replaces ({} when there is none). One that is not a JSON
    object (cut short, written by hand) is what index is run to repair: it is renamed to
    ``manifest.json.unreadable`` (kept for its other fields) with a warning."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
        why = None if isinstance(old, dict) else f"a JSON {type(old).__name__}, not an object"
    except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        why = f"not readable as JSON ({str(e).splitlines()[0][:120]})"
    if why is None:
        return old
    aside = path.with_name(path.name + ".unreadable")
    path.replace(aside)
    log.warning("%s: %s; moved to %s, and a new manifest is written from the counts", path, why, aside.name)
    return {}


def old_counts(old: dict[str, Any]) -> dict[str, int]:
    """Shard name -> count, of the manifest ``index`` replaces, to report what changed. A
    manifest object whose counts are not names and counts (written by hand, by another
    tool) is what index is run to repair: its counts are replaced without a comparison
    (its other fields are kept), with a warning rather than a traceback."""
    names, counts = old.get("shards", []), old.get("shard_samples", [])
    if (
        isinstance(names, list)
        and isinstance(counts, list)
        and len(names) == len(counts)
        and all(isinstance(n, str) for n in names)
        and all(isinstance(c, int) for c in counts)
    ):
        return dict(zip(names, counts))
    log.warning("%s: its old 'shards' and 'shard_samples' are not lists of names and counts; replaced", MANIFEST)
    return {}


def _report_index(found: list[ShardCount], old: dict[str, Any]) -> None:
    """Warnings for what training will skip, and the counts that changed."""
    for f in found:
        if f.error:
            log.warning(
                "%s: unreadable after %d samples (%s); training reads those %d", f.name, f.samples, f.error, f.samples
            )
        if f.unopenable:
            log.warning("%s: %d image(s) do not open; training skips them as corrupt", f.name, f.unopenable)
        if f.not_samples:
            log.warning(
                "%s: %d group(s) with no image member (%s) are not samples: not counted, never read",
                f.name, f.not_samples, ", ".join(sorted(f.suffixes)[:5]),
            )  # fmt: skip
    before = old_counts(old)
    changed = [f"{f.name} {before[f.name]} -> {f.samples}" for f in found if before.get(f.name, f.samples) != f.samples]
    if changed:
        log.warning("manifest.json counts corrected for %d shard(s): %s", len(changed), "; ".join(changed[:10]))
