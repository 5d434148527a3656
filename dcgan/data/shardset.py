"""What ``data.shards`` names: the shard URLs, how many samples each holds, and the set's identity.

``data.shards`` is a folder of tar shards, a brace pattern
(``data/x/shard-{000000..000009}.tar``) or ``pipe:`` / URL shards. The reader plans every
epoch from the per-shard sample counts (``dcgan/data/stream.py``), so they must be known before
any process starts. They come from, in order:

1. ``manifest.json``, written by ``python -m dcgan.shards`` and by
   ``python -m dcgan.shards index FOLDER``, in the folder or beside the pattern's files;
2. the writer's own records: img2dataset's ``NNNNN_stats.json`` (``successes``) beside
   every ``NNNNN.tar``;
3. ``data.samples_per_shard``, a guess for every shard.

Otherwise the error names the index command, which counts the samples of every shard.
Whatever their source, the counts are a plan that the reader checks while it reads.

A sample is a group of tar members with one key (webdataset's convention) that holds an
image member: one of ``IMAGE_EXTENSIONS``, matched on the member's last suffix. Other
members (``.txt``, ``.json``, ``.cls``) ride along; a group with no image member (a
``.json`` alone) is not a sample and is neither counted nor read.

A raw member (``KEY.images.npy``, ``python -m dcgan.shards --format raw``) is a batch of
images, uint8 (n, H, W, C), with their labels in ``KEY.labels.npy`` (int64 (n,)) when the
set has labels: it is n samples, one per image, each counted as a sample everywhere (the
manifest's counts, the reader's plan). ``tar_samples`` expands it into samples that hold
the pixels (``PIXELS``), which decode without PIL; a raw member that does not load
becomes samples that carry the error (``ERROR``), as many as its header says, so the
shard's count stays right and each is skipped as one corrupt sample.

``ShardSet.identity()`` travels with every checkpoint, so a run is not resumed on other
data by accident: the shard names and counts (and their short ``fingerprint``), and for
each local shard its content (``shard_content``): its size in bytes and a digest of its
members' names and sizes, read from the tar headers alone (a memory map touches only the
header blocks: the data is skipped, nothing is decoded). A ``.tar.gz`` shard cannot be
walked without inflating it, so its digest is the gzip trailer's CRC-32 and length of the
whole uncompressed tar instead (8 bytes read). The same images rewritten at another size,
or in another order, change the bytes or the digest; pixels changed within members of the
same sizes (npy and raw members of one shape) are not seen. ``pipe:`` and URL shards are
identified by names and counts only (said once, at INFO). Reading headers costs about
2 us per member (50 ms for a shard of 10k samples); ``manifest.json`` therefore records
each shard's bytes, mtime and digest when ``python -m dcgan.shards`` writes or indexes it
(``shard_content``), and the digest is taken from there while the file's size and mtime
are still the recorded ones (an edit in place changes the mtime; a copy that does not keep
mtimes is read again).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import mmap
import os
import re
import tarfile
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from dcgan.base.checks import ConfigError
from dcgan.config.sections import DataConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Member suffixes read as images, in order of preference when a sample has several (a
# tuple: a set's order would change with each process's string hashing). npy is uint8
# pixels (H, W) or (H, W, C), read with allow_pickle=False; the others go through PIL.
IMAGE_EXTENSIONS = (
    "png", "jpg", "jpeg", "webp", "jfif", "jpe", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm", "tga", "npy",
)  # fmt: skip
# A raw member, and its labels: KEY.images.npy holds uint8 (n, H, W, C), C in (1, 3), the
# channel axis kept for grey; KEY.labels.npy int64 (n,). Both read with allow_pickle=False.
RAW_MEMBER = "images.npy"
RAW_LABELS = "labels.npy"
# Keys of the per-image samples that tar_samples makes of a raw member ("__" keys are not
# tar members, so no shard can hold one): the image as a uint8 (H, W, C) array, or, for
# the images of a raw member that does not load, why.
PIXELS = "__pixels__"
ERROR = "__error__"
_STATS_SUFFIX = "_stats.json"  # img2dataset writes NNNNN_stats.json beside NNNNN.tar


@dataclass(frozen=True)
class ShardSet:
    urls: tuple[str, ...]
    counts: tuple[int, ...]  # samples per shard: the plan the reader checks
    counted_by: str  # where the counts come from, for messages: "manifest.json", "img2dataset's stats", ...
    fix: str  # what gives true counts, as a phrase: the index command for local shards
    image_size: int | None = None  # square size of every image, when known
    channels: int | None = None  # 1 or 3, when known
    # shard file name -> (bytes, mtime_ns, digest) as the manifest recorded them (shard_content)
    recorded: Mapping[str, tuple[int, int, str]] | None = field(default=None, compare=False, repr=False)
    image_sizes: Mapping[str, int] | None = field(default=None, compare=False, repr=False)  # "WxH" -> images
    # The class names the samples' labels index (the manifest's "classes"), when it lists them.
    classes: tuple[str, ...] | None = field(default=None, compare=False)

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(shard_name(url) for url in self.urls)

    def identity(self) -> dict[str, Any]:
        """Shard names, counts and their fingerprint, and each shard's content ([bytes,
        digest], None for a remote one) and theirs: saved with every checkpoint."""
        names, counts = list(self.names), list(self.counts)
        digest = hashlib.sha256(json.dumps([names, counts]).encode()).hexdigest()[:16]
        content = contents(self.urls, self.recorded or {})
        local = [c for c in content if c is not None]
        content_digest = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16] if local else None
        return {
            "fingerprint": digest, "samples": self.total, "shards": names, "counts": counts,
            "content": content, "content_fingerprint": content_digest,
        }  # fmt: skip


def shard_name(url: str) -> str:
    """A shard's name without its folder or bucket: the same data moved elsewhere keeps it."""
    found = re.findall(r"[^/\s'\"]+\.(?:tar\.gz|tar|tgz)\b", url)
    return found[-1] if found else url


def describe_change(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between two ``ShardSet.identity()`` values, in one line (None: the
    same). Content is compared for the shards whose content both record: a checkpoint
    written before identities held content (``"content"`` absent) is compared by names
    and counts alone, and so is a shard that is remote then or now."""
    parts = _count_changes(saved, now) if saved["fingerprint"] != now["fingerprint"] else []
    parts += content_changes(saved, now)
    return "; ".join(parts) if parts else None


def content_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``NAME: content changed (bytes A -> B)`` for every shard held then and now whose
    recorded content differs (the first few, and how many more)."""
    if not saved.get("content") or not now.get("content"):
        return []
    if saved["shards"] == now["shards"]:  # by position: names may repeat across folders
        pairs = list(zip(now["shards"], saved["content"], now["content"]))
    else:
        before = dict(zip(saved["shards"], saved["content"]))
        pairs = [(n, before.get(n), c) for n, c in zip(now["shards"], now["content"]) if n in before]
    changed = []
    for name, then, nowc in pairs:
        if then is None or nowc is None or list(then) == list(nowc):
            continue
        if then[0] != nowc[0]:
            changed.append(f"{name}: content changed (bytes {then[0]} -> {nowc[0]})")
        elif name.endswith((".tar.gz", ".tgz")):
            changed.append(f"{name}: content changed (the same {nowc[0]} bytes, another CRC-32 of the tar inside)")
        else:
            changed.append(f"{name}: content changed (the same {nowc[0]} bytes, members of other names or sizes)")
    if not changed:
        return []
    return [some_of(changed) + (f" ({len(changed)} of {len(pairs)} shards)" if len(changed) > 1 else "")]


def _count_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs in the shard names and counts, whose fingerprints differ."""
    before, after = dict(zip(saved["shards"], saved["counts"])), dict(zip(now["shards"], now["counts"]))
    parts = [
        f"{len(before)} shards / {saved['samples']} samples then, {len(after)} / {now['samples']} now "
        f"(fingerprint {saved['fingerprint']} -> {now['fingerprint']})"
    ]
    for label, names in (
        ("added", [n for n in after if n not in before]),
        ("removed", [n for n in before if n not in after]),
    ):
        if names:
            parts.append(f"{label} {some_of(names)}")
    changed = [f"{n} {before[n]} -> {after[n]}" for n in after if n in before and before[n] != after[n]]
    if changed:
        parts.append(f"counts changed: {some_of(changed)}")
    if len(parts) == 1:
        parts.append("same shards and counts in another order")
    return parts


def some_of(items: list[str], shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


# --------------------------------------------------------------------------- the shards' content


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def contents(urls: tuple[str, ...], recorded: Mapping[str, tuple[int, int, str]]) -> list[list | None]:
    """[bytes, digest] of every local shard (None for a remote one): the digest as
    ``recorded`` (the manifest) holds it while the file's size and mtime are the recorded
    ones, else read from the shard (``shard_digest``, remembered per size and mtime)."""
    remote = [url for url in urls if is_remote(url)]
    if remote:
        say_once(
            f"data.shards: {len(remote)} of {len(urls)} shard(s) are pipe: or URL shards: checkpoints record their "
            "names and counts, not their content (bytes, members), so a resume cannot tell if they were rewritten"
        )
    started, misses = time.perf_counter(), _file_digest.cache_info().misses
    content: list[list | None] = []
    for url in urls:
        if is_remote(url):
            content.append(None)
            continue
        try:
            stat = os.stat(url)
        except OSError as e:  # the reader says so when it gets there; identity names what it saw
            content.append([-1, f"unreadable: {type(e).__name__}"])
            continue
        known = recorded.get(Path(url).name)
        if known is not None and (known[0], known[1]) == (stat.st_size, stat.st_mtime_ns):
            content.append([stat.st_size, known[2]])
            continue
        content.append([stat.st_size, _file_digest(url, stat.st_size, stat.st_mtime_ns)])
    seconds, read = time.perf_counter() - started, _file_digest.cache_info().misses - misses
    if seconds > 2:
        say_once(
            f"data identity: read the tar headers of {read} shard(s) in {seconds:.1f}s; manifest.json records them "
            f"when `{index_command('FOLDER')}` writes it, and they are then not read again"
        )
    return content


_said: set[str] = set()


def say_once(line: str, logger: logging.Logger = log) -> None:
    """``line`` at INFO, the first time this process says it (identity() is asked for
    several times per start)."""
    if line not in _said:
        _said.add(line)
        logger.info("%s", line)


@lru_cache(maxsize=1 << 16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """``shard_digest(path)``, once per process for a file of this size and mtime."""
    return shard_digest(path)


def shard_record(path: str | Path) -> dict[str, Any]:
    """What ``manifest.json`` records of a shard's content (``shard_content``): its bytes,
    mtime (ns) and digest, the digest read now."""
    stat = os.stat(path)
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "digest": shard_digest(str(path))}


def shard_digest(path: str) -> str:
    """16 hex digits that change when a shard's members change name or size: the SHA-256
    of its regular members' names and sizes, read from the tar headers alone (a
    ``.tar.gz``: of its gzip trailer, the CRC-32 and length of the tar inside)."""
    with open(path, "rb") as f:
        if path.endswith((".tar.gz", ".tgz")):
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8))
            return hashlib.sha256(b"gzip trailer\0" + f.read()).hexdigest()[:16]
        if os.fstat(f.fileno()).st_size == 0:
            return hashlib.sha256(b"").hexdigest()[:16]
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return hashlib.sha256(b"\n".join(tar_header_names(mm))).hexdigest()[:16]


def tar_header_names(buf: Any) -> list[bytes]:
    """``name\0size`` of every regular member of a tar held in ``buf`` (bytes or a memory
    map), from its headers: ustar names with their prefix, GNU long names and PAX path and
    size records; the data between headers is never touched. Where the headers stop making
    sense (not a tar, cut short) the list ends with a line saying at which byte."""
    found: list[bytes] = []
    end, offset = len(buf), 0
    long_name: bytes | None = None
    pax: dict[bytes, bytes] = {}
    while offset + 512 <= end:
        if not buf[offset]:  # the end-of-archive block (or padding)
            return found
        try:
            size = _octal(buf[offset + 124 : offset + 136])
        except ValueError:
            break
        kind = buf[offset + 156]
        data_size = int(pax.get(b"size", size))
        if kind in (ord("L"), ord("x")):  # a GNU long name, PAX records: for the next header
            data = bytes(buf[offset + 512 : offset + 512 + size])
            if kind == ord("L"):
                long_name = data.rstrip(b"\0")
            else:
                pax = dict(re.findall(rb"\d+ ([^=\n]+)=([^\n]*)\n", data))
            offset += 512 + ((size + 511) & ~511)
            continue
        if kind in (ord("0"), 0, ord("7")):
            name = long_name or pax.get(b"path")
            if name is None:
                name = bytes(buf[offset : offset + 100]).rstrip(b"\0")
                if buf[offset + 257 : offset + 263] == b"ustar\0":  # POSIX: a prefix (GNU keeps times there)
                    prefix = bytes(buf[offset + 345 : offset + 500]).rstrip(b"\0")
                    name = prefix + b"/" + name if prefix else name
            found.append(b"%s\0%d" % (name, data_size))
        long_name, pax = None, {}
        offset += 512 + ((data_size + 511) & ~511)
    found.append(b"headers end at byte %d of %d" % (offset, end))
    return found


def _octal(field: bytes) -> int:
    """A tar header's number: octal digits, or base-256 when the first byte's top bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = bytes(field).split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


# --------------------------------------------------------------------------- resolving data.shards


def resolve_shards(cfg: DataConfig) -> ShardSet:
    """Turn ``data.shards`` into shard URLs and counts; ConfigError names what is wrong."""
    spec = cfg.shards.strip()
    if not spec:
        raise ConfigError("data.shards: not set (a folder of .tar shards, a brace pattern, or pipe: URLs)")
    if spec.startswith("pipe:") or "://" in spec:
        return _remote(spec, cfg)
    path = Path(spec)
    if "{" not in spec and not path.exists():
        raise ConfigError(f"data.shards: {spec} does not exist")
    if path.is_dir():
        return _folder(path, cfg)
    if path.name == MANIFEST:
        return _from_manifest(path)
    urls = wds.shardlists.expand_urls(spec)
    for url in urls:
        if not Path(url).is_file():
            raise ConfigError(f"data.shards: shard {url} does not exist")
    folders = {str(Path(u).parent) for u in urls}
    folder = folders.pop() if len(folders) == 1 else "FOLDER"
    beside = Path(urls[0]).parent / MANIFEST
    if beside.exists():
        listed = _from_manifest(beside)
        by_name = dict(zip(listed.names, listed.counts))
        if all(Path(u).name in by_name for u in urls):
            counts = tuple(by_name[Path(u).name] for u in urls)
            return ShardSet(
                tuple(urls), counts, str(beside), listed.fix, listed.image_size, listed.channels, listed.recorded,
                listed.image_sizes,
            )  # fmt: skip
    return _counted(urls, cfg, spec, folder)


def index_command(folder: str | Path) -> str:
    return f"python -m dcgan.shards index {folder}"


def fix_phrase(folder: str | Path) -> str:
    return f"`{index_command(folder)}` writes the true counts"


def _folder(folder: Path, cfg: DataConfig) -> ShardSet:
    tars = tar_files(folder)
    if (folder / MANIFEST).exists():
        shard_set = _from_manifest(folder / MANIFEST)
        unlisted = sorted(set(p.name for p in tars) - set(shard_set.names))
        if unlisted:
            log.warning(
                "%s: %d shard(s) not in %s are not read (%s); `%s` lists every shard",
                folder, len(unlisted), MANIFEST, some_of(unlisted), index_command(folder),
            )  # fmt: skip
        return shard_set
    if not tars:
        raise ConfigError(f"data.shards: {folder} holds no {MANIFEST} and no shards ({', '.join(TAR_SUFFIXES)})")
    return _counted([str(p) for p in tars], cfg, str(folder), folder)


def tar_files(folder: Path) -> list[Path]:
    """The shards in ``folder`` (not its sub-folders), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(TAR_SUFFIXES))


def _counted(urls: list[str], cfg: DataConfig, spec: str, folder: str | Path) -> ShardSet:
    """Counts for local shards with no manifest: the writer's records, else the setting."""
    counts, why_not = img2dataset_counts(urls)
    fix = fix_phrase(folder)
    if counts is not None:
        return ShardSet(tuple(urls), counts, "img2dataset's *_stats.json", fix)
    if cfg.samples_per_shard > 0:
        return ShardSet(tuple(urls), (cfg.samples_per_shard,) * len(urls), "data.samples_per_shard", fix)
    raise ConfigError(
        f"data.shards: {spec}: the samples in each shard are unknown ({why_not}); count them once with "
        f"`{index_command(folder)}`, which writes manifest.json"
    )


def _remote(spec: str, cfg: DataConfig) -> ShardSet:
    urls = wds.shardlists.expand_urls(spec)
    fix = "set data.samples_per_shard to the true count (or index a local copy: python -m dcgan.shards index)"
    if cfg.samples_per_shard <= 0:
        raise ConfigError(
            f"data.shards: {spec!r} names remote shards with no manifest; set data.samples_per_shard (samples in "
            "each shard) so every rank can plan the same number of steps"
        )
    return ShardSet(tuple(urls), (cfg.samples_per_shard,) * len(urls), "data.samples_per_shard", fix)


def _from_manifest(path: Path) -> ShardSet:
    try:
        manifest = json.loads(path.read_text())
        names, counts = manifest["shards"], manifest["shard_samples"]
        if not isinstance(names, list) or not isinstance(counts, list):
            raise ValueError("'shards' and 'shard_samples' must be lists")
        if len(names) != len(counts):
            raise ValueError("'shards' and 'shard_samples' differ in length")
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            raise ValueError("'shard_samples' must be counts (integers >= 0)")
        if not all(isinstance(n, str) for n in names):
            raise ValueError("'shards' must be shard file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"data.shards: {path} is not a valid manifest: {e!r}; `{index_command(path.parent)}` rewrites it"
        ) from None
    urls = tuple(str(path.parent / name) for name in names)
    for url in urls:
        if not Path(url).exists():
            raise ConfigError(f"data.shards: shard {url} (listed in {path}) does not exist")
    if not urls or sum(counts) == 0:
        raise ConfigError(f"data.shards: {path} lists no samples")
    fix = fix_phrase(path.parent)
    return ShardSet(
        urls, tuple(counts), str(path), fix, manifest.get("image_size"), manifest.get("channels"),
        recorded_content(manifest), recorded_sizes(manifest), recorded_classes(manifest),
    )  # fmt: skip


def recorded_classes(manifest: dict[str, Any]) -> tuple[str, ...] | None:
    """The manifest's class names, when it lists some."""
    classes = manifest.get("classes")
    return tuple(map(str, classes)) if isinstance(classes, list) and classes else None


def recorded_content(manifest: dict[str, Any]) -> dict[str, tuple[int, int, str]]:
    """Shard name -> (bytes, mtime_ns, digest) of the manifest's ``shard_content``; what
    does not read as that is left out (its shards' headers are read instead)."""
    records = manifest.get("shard_content")
    if not isinstance(records, list) or len(records) != len(manifest["shards"]):
        return {}
    found = {}
    for name, record in zip(manifest["shards"], records):
        try:
            found[name] = (int(record["bytes"]), int(record["mtime_ns"]), str(record["digest"]))
        except (TypeError, KeyError, ValueError):
            continue
    return found


def recorded_sizes(manifest: dict[str, Any]) -> dict[str, int] | None:
    """The manifest's ``image_sizes`` ("WxH" -> images), when it has them."""
    sizes = manifest.get("image_sizes")
    if isinstance(sizes, dict) and all(isinstance(k, str) and isinstance(n, int) for k, n in sizes.items()):
        return sizes
    return None


def img2dataset_counts(urls: list[str]) -> tuple[tuple[int, ...] | None, str]:
    """Every shard's ``successes`` from img2dataset's ``NNNNN_stats.json`` beside it, or
    (None, why not): a shard without its record (img2dataset writes it when the shard is
    complete) makes the records unusable for the whole set."""
    counts = []
    for url in urls:
        tar = Path(url)
        stats = tar.with_name(tar.name.split(".")[0] + _STATS_SUFFIX)
        try:
            counts.append(int(json.loads(stats.read_text())["successes"]))
        except FileNotFoundError:
            return None, f"no manifest.json, and {tar.name} has no {stats.name} beside it"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return None, f"{stats} is unreadable: {e!r}"
    return tuple(counts), ""


# --------------------------------------------------------------------------- reading samples


def image_member(sample: dict[str, Any]) -> str | None:
    """The key of ``sample``'s image member: PIXELS, a raw member (RAW_MEMBER), else its
    last suffix in IMAGE_EXTENSIONS; None when it has none (or is an ERROR sample)."""
    if PIXELS in sample:
        return PIXELS
    if RAW_MEMBER in sample:  # before the scan below, which would take it for one image's npy
        return RAW_MEMBER
    for ext in IMAGE_EXTENSIONS:  # the usual case, a plain "png" / "jpg" member: no scan
        if ext in sample:
            return ext
    found = {}
    for key in sample:
        if not key.startswith("__"):
            found.setdefault(key.rsplit(".", 1)[-1], key)
    return next((found[ext] for ext in IMAGE_EXTENSIONS if ext in found), None)


def tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard, in order: groups of members with one key that hold an
    image, and a raw member's images one by one (the one place raw members are expanded,
    so everything downstream counts images)."""
    with contextlib.closing(wds.gopen(url)) as stream:
        for sample in tar_groups(stream, url):
            member = image_member(sample)
            if member == RAW_MEMBER:
                yield from raw_samples(sample, url)
            elif member is not None:
                yield sample


def tar_groups(stream: Any, url: str) -> Iterator[dict[str, Any]]:
    """webdataset's groups of the members with one key, of one tar stream (the reader,
    the cache and ``dcgan.shards index`` all read shards through here). A shard cut short
    (a copy or a download that stopped) gives every whole group, then the group whose
    member the data stopped in, with what there is of that member (it fails to decode, so
    its images count as corrupt, and no others), then raises the read error. A shard cut
    between members, or in a tar header, raises too: it lacks the end-of-archive block."""
    failure: list[Exception] = []
    yield from wds.tariterators.group_by_keys(tar_members(stream, url, failure))
    if failure:
        raise failure[0]


def tar_members(stream: Any, url: str, failure: list[Exception]) -> Iterator[dict[str, Any]]:
    """The regular files of a tar stream as webdataset's ``{"fname", "data", "__url__"}``
    (its ``tar_file_expander``, reading 1 MiB at a time: tarfile's 10 KiB default made
    reading a 3 MB raw member a third of the cost of its images, bench/data.py). A read
    error ends it, after the member it hit (what of it arrived), into ``failure``."""
    # A local file is read member by member where it lies (one read each); a pipe or a
    # URL is streamed.
    seekable = getattr(stream, "seekable", lambda: False)()
    try:
        with tarfile.open(
            fileobj=stream, mode="r:*" if seekable else "r|*", bufsize=_READ_SIZE, tarinfo=_NotedEnd
        ) as tar:
            for info in tar:
                if info.isreg() and not info.name.startswith("__"):
                    data = _member_data(tar, info)
                    yield {"fname": info.name, "data": data, "__url__": url}
                    if len(data) < info.size:
                        raise tarfile.ReadError(f"unexpected end of data in {info.name}")
                tar.members = []  # a stream's members would otherwise pile up over the whole shard
            end = getattr(tar, _END, None)
            if not isinstance(end, tarfile.EOFHeaderError):
                raise tarfile.ReadError(f"cut short or damaged at byte {tar.offset}: no end-of-archive block ({end})")
    except Exception as e:  # truncated, not a tar, unreadable
        failure.append(e)


class _NotedEnd(tarfile.TarInfo):
    """tarfile's TarInfo, noting on the TarFile why its last header read failed. tarfile
    ends an archive quietly at a header that is cut short, missing or garbled just as at
    the end-of-archive block, so a shard cut between members (or in a header) would read
    as a whole, shorter one: the index would write the shorter count as true, and the
    reader would blame the manifest. Only the end-of-archive block (EOFHeaderError) is
    a whole shard's end."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except Exception as e:
            setattr(tar, _END, e)
            raise


_END = "dcgan_end"  # the attribute _NotedEnd sets


def _member_data(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    """A member's bytes, or those of them in the shard when it was cut short (fewer than
    ``info.size``; none when even they cannot be read): enough, for a raw member, for its
    header, which says how many images were lost. Read from the archive's own file object,
    as extractfile does, but without its check, which raises and drops what arrived: so a
    pipe gives the bytes a local file does. (A cut gzipped shard's reader raises and drops
    them itself: none, so the cut member counts as one corrupt image, as with no header.)"""
    if info.issparse():  # GNU sparse files: only tarfile knows where their pieces lie (not cut-aware)
        return tar.extractfile(info).read()
    try:
        tar.fileobj.seek(info.offset_data)  # a stream is already there: a seek forward by nothing
        return tar.fileobj.read(info.size)
    except (EOFError, OSError, tarfile.TarError, zlib.error):  # gzip's way of saying cut short
        return b""


_READ_SIZE = 1 << 20


def raw_samples(group: dict[str, Any], url: str) -> Iterator[dict[str, Any]]:
    """One sample per image of a raw member; ERROR samples when it does not load."""
    key = group["__key__"]
    try:
        images = load_raw(group[RAW_MEMBER])
        labels = load_raw_labels(group[RAW_LABELS], len(images)) if RAW_LABELS in group else None
    except Exception as e:  # truncated, damaged, pickled: every image of the member is one corrupt sample
        error = f"raw member {key}.{RAW_MEMBER} in {url} does not load: {type(e).__name__}: {e}"
        for i in range(raw_count(group[RAW_MEMBER])):
            yield {"__key__": f"{key}/{i}", "__url__": url, ERROR: error}
        return
    for i, image in enumerate(images):
        sample = {"__key__": f"{key}/{i}", "__url__": url, PIXELS: image}
        if labels is not None:
            sample["cls"] = int(labels[i])
        yield sample


def load_raw(data: bytes) -> np.ndarray:
    """A raw member's images, uint8 (n, H, W, C) with C in (1, 3); never unpickles."""
    shape, dtype, offset, fortran = npy_header(data)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
        raise ValueError(f"raw images must be uint8 (n,H,W,C) with C in 1, 3, in C order; got {dtype} {shape}")
    # A view of the member's bytes (no copy; np.load would make one): pixels are only ever
    # copied into the batch they go to.
    return np.frombuffer(data, np.uint8, count=math.prod(shape), offset=offset).reshape(shape)


def load_raw_labels(data: bytes, n: int) -> np.ndarray:
    labels = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu" or labels.shape != (n,):
        what = f"{labels.dtype} {labels.shape}" if isinstance(labels, np.ndarray) else type(labels).__name__
        raise ValueError(f"{RAW_LABELS} must be integers ({n},) like its images; got {what}")
    return labels


def npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int, bool]:
    """(shape, dtype, data offset, Fortran order) from an npy file's header, without reading its data."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
    shape, fortran, dtype = read(f)
    return shape, dtype, f.tell(), fortran


def raw_count(data: bytes) -> int:
    """Images in a raw member, from its header alone (the data may be damaged): 1 when
    even the header does not read, so an unreadable member still counts as a sample. Its
    true count is then written nowhere that arrived (its tar header gives its bytes, not
    its images' size), and 1 is what the reader, the cache and the index all count for
    it; the planned positions after it are empty, as for any shard cut short."""
    try:
        shape = npy_header(data)[0]
    except Exception:  # not an npy header at all
        return 1
    return int(shape[0]) if shape else 1


def open_image(data: bytes | np.ndarray, member: str) -> Image.Image:
    """The image of a member's bytes (``npy``: uint8 pixels; anything else: PIL, lazily),
    or of a raw sample's PIXELS array."""
    if member == PIXELS:
        return Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data)
    if member.rsplit(".", 1)[-1] != "npy":
        return Image.open(io.BytesIO(data))
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"npy image must be uint8 (H,W) or (H,W,C) with C in 1, 3, 4; got {array.dtype} {array.shape}")
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)


# PIL modes with one channel of pixels (an alpha channel aside).
GREY_MODES = ("1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def convert_image(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as 8-bit grey (``channels`` 1) or RGB (3), whatever its mode: grey, RGBA,
    palette, CMYK or 16-bit. Alpha is dropped, as torchvision's ImageFolder loader does."""
    if image.mode.startswith("I;16"):  # PIL's convert("L") would clip these at 255 instead of scaling
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) * 255 + 32767) // 65535).convert("L")
    return image.convert("L" if channels == 1 else "RGB")


def first_image_size(shards: ShardSet) -> tuple[int, int] | None:
    """(width, height) of the set's images: the manifest's square size, or its one size
    (``image_sizes``), else the first image of a local set's first shard. None when
    unknown (remote shards, nothing readable) and when the manifest counts several sizes:
    no one size is true of the set then."""
    if shards.image_size is not None:
        return shards.image_size, shards.image_size
    if shards.image_sizes:
        if len(shards.image_sizes) > 1:
            return None
        (only,) = shards.image_sizes
        with contextlib.suppress(ValueError):
            width, height = (int(n) for n in only.split("x"))
            return width, height
    url = shards.urls[0]
    seen = None if url.startswith("pipe:") or "://" in url else peek_image(url)
    return None if seen is None else seen[:2]


def peek_image(url: str) -> tuple[int, int, str] | None:
    """(width, height, PIL mode) of a shard's first image, or None when it has none that opens."""
    try:
        for sample in tar_samples(url):
            member = image_member(sample)
            with open_image(sample[member], member) as image:
                return image.width, image.height, image.mode
    except Exception:  # unreadable: the reader will say so, with the shard's name
        return None
    return None
