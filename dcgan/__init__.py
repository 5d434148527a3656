"""DCGAN training at cluster scale (README.md). From Python::

    from dcgan import load_generator
    G = load_generator("runs/fashion-mnist")   # a run folder or a checkpoint file
    images = G.sample(16, seed=0)               # uint8 (16, C, H, W)

Importing ``dcgan`` is cheap: ``load_generator`` and ``Generator`` (``dcgan/checkpoint/inference.py``)
load torch on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dcgan.checkpoint.inference import Generator, load_generator

__all__ = ["Generator", "load_generator"]


def __getattr__(name: str):
    if name in __all__:
        from dcgan.checkpoint import inference as generator

        return getattr(generator, name)
    raise AttributeError(f"module 'dcgan' has no attribute {name!r}")
