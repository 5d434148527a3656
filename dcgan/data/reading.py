"""One shard's samples as every reader takes them, and what reading it met, as values.

The shard reader (``dcgan.data.stream.ShardStream``), the cache's decoding workers
(``dcgan.data.cache.PieceReader``) and evaluation's ``read_images`` all read a shard
through ``read_shard``: a run of its positions, an unreadable rest skipped, and how far
the read got (``ReadCounts``). Each sample is decoded through ``decode_or_corrupt``,
which turns a sample that does not decode into the one line that names it. What each
reader logs, and when reading gives up, is its own.

Decoding never unpickles: images through PIL and ``.npy`` with ``allow_pickle=False``;
other members (``.pth``, ``.pickle``, ``.json``) are never decoded.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from dcgan.data.shardset import ERROR, PIXELS, convert_image, image_member, open_image, tar_samples


@dataclass(frozen=True)
class ReadCounts:
    """How the read of one shard ended."""

    read: int  # samples read from the shard's start: all it holds when the read went to its end
    error: Exception | None = None  # why the rest could not be read (missing, truncated, not a tar)


def read_shard(
    url: str, start: int = 0, stop: int | None = None, look_past: int | None = None
) -> Iterator[dict | ReadCounts]:
    """The samples at positions ``start + 1`` .. ``stop`` of shard ``url`` (to its end
    when ``stop`` is None), and one ``ReadCounts`` once the read is over. Past ``stop`` it
    reads on ``look_past`` samples (None: to the end), only to count them. The sample at
    ``stop`` is handed on after the ``ReadCounts``: whoever takes a run to its last sample
    has learnt how the shard ended. An unreadable shard ends the read, never the caller."""
    position, held, error = 0, None, None
    samples = tar_samples(url)
    try:
        for position, sample in enumerate(samples, 1):
            if stop is not None and position > stop:  # past the run: count what is looked at
                position += sum(1 for _ in itertools.islice(samples, None if look_past is None else look_past - 1))
                break
            if position <= start:
                continue
            if position == stop:
                held = sample
                if look_past == 0:
                    break
            else:
                yield sample
    except Exception as e:  # missing, truncated or not a tar: skip the rest of it
        error = e
    finally:
        samples.close()
    yield ReadCounts(position, error)
    if held is not None:
        yield held


# --------------------------------------------------------------------------- decoding


class Corrupt(NamedTuple):
    """A sample that does not decode."""

    line: str  # "sample KEY in SHARD: ErrorType: message", for the log
    error: Exception


def decode_or_corrupt(sample: dict, channels: int, image_size: int) -> tuple[np.ndarray, int] | Corrupt:
    """A sample's ``(uint8 (S, S, C) pixels, label)``, or what made it corrupt."""
    try:
        return decode_sample(sample, channels, image_size), sample_label(sample)
    except Exception as e:  # any decoder failure means: this sample is corrupt
        return Corrupt(f"sample {sample['__key__']} in {sample['__url__']}: {type(e).__name__}: {plain_error(e)}", e)


def decode_sample(sample: dict, channels: int, image_size: int) -> np.ndarray:
    """uint8 (S, S, C) pixels from a webdataset sample dict; raises on anything unreadable.
    Kept in numpy and channels-last until a batch is stacked (``stack_images``): per image,
    a torch op costs more than copying raw pixels."""
    if ERROR in sample:  # one image of a raw member that does not load; the message names it and its shard
        raise ValueError(sample[ERROR])
    member = image_member(sample)
    if member is None:
        raise ValueError(f"no image member (has {sorted(k for k in sample if not k.startswith('__'))})")
    pixels = sample[member] if member == PIXELS else None
    if pixels is None or pixels.shape[-1] != channels:  # raw pixels of the model's channels skip PIL
        with open_image(sample[member], member) as image:
            pixels = np.array(convert_image(image, channels))
    pixels = pixels.reshape(pixels.shape[0], pixels.shape[1], channels)
    if pixels.shape[:2] != (image_size, image_size):
        chw = torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # raw pixels are a read-only view
        pixels = TF.center_crop(TF.resize(chw, image_size, antialias=True), image_size).permute(1, 2, 0).numpy()
    return pixels


def plain_error(error: Exception) -> str:
    """An error's message without the in-memory file PIL names ("<_io.BytesIO object at 0x...>")."""
    return re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))


def sample_label(sample: dict) -> int:
    try:
        return int(sample["cls"])
    except (KeyError, ValueError):
        return -1
