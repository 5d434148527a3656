"""``python tests/faults.py --config ...``: dcgan.train with failures injected, for
tests/e2e/test_failures.py. Runs alone or under torchrun, like ``-m dcgan.train``.

DCGAN_FAULT says which, and where (comma-separated; empty: none):
  step:RANK:STEP          gan_step raises on RANK when it computes step STEP
  stuck:RANK:STEP         gan_step blocks forever on RANK at step STEP, as a rank does that
                          waits in a collective its peers never enter (NCCL waits on)
  checkpoint-write        every checkpoint write fails part-way with ENOSPC (a full disk)
  nan:STEP                D's weights turn NaN in gan_step's call STEP (a run that diverges)
  nan-input:STEP          from gan_step's call STEP on, every real batch is NaN (under fp16 the
                          grad scaler skips every step; batch norm's statistics turn NaN)
  inf-grad:STEP           from gan_step's call STEP on, every gradient is infinite while the
                          forward pass stays finite (under fp16 the grad scaler skips every
                          step, and weights and batch norm's statistics stay finite)
  slow-checkpoint         every checkpoint write takes 60 s (time to press Ctrl-C twice)
  slow-start              start-up blocks for 60 s where the checkpoint is chosen
  run-folder-full:N       the first N appends to metrics.jsonl, and every sample grid, loss
                          plot and summary.json write, fail with ENOSPC
"""

import errno
import os
import sys
import time

import torch

from dcgan import train
from dcgan.checkpoint import files as checkpoint
from dcgan.checkpoint import resume
from dcgan.run.folder import RunFolder
from dcgan.tracking import tracker as tracking
from dcgan.training import step as train_step


def failing_or_stuck(kind: str, args: list[str], rank: int) -> None:
    target_rank, target_step = (int(a) for a in args)
    real_step, calls = train_step.gan_step, [0]

    def failing_step(*a, **kw):
        calls[0] += 1
        if rank == target_rank and calls[0] == target_step:
            if kind == "stuck":
                print(f"faults.py: rank {rank} is stuck at step {target_step}", file=sys.stderr, flush=True)
                while True:
                    time.sleep(1)
            raise RuntimeError(f"injected fault in gan_step at step {target_step}")
        return real_step(*a, **kw)

    train_step.gan_step = failing_step


def full_disk_checkpoint(kind: str, args: list[str], rank: int) -> None:
    real_init = checkpoint._HashingFile.__init__

    class FullDisk:
        """The checkpoint file, on a disk that fills up after 4 KiB."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    checkpoint._HashingFile.__init__ = lambda self, f: real_init(self, FullDisk(f))


def nan_weights(kind: str, args: list[str], rank: int) -> None:
    (target_step,) = (int(a) for a in args)
    real_step, calls = train_step.gan_step, [0]

    def diverging_step(state, *a, **kw):
        stats = real_step(state, *a, **kw)
        calls[0] += 1
        if calls[0] == target_step:
            with torch.no_grad():
                for p in state.discriminator.parameters():
                    p.fill_(float("nan"))
        return stats

    train_step.gan_step = diverging_step


def nan_input(kind: str, args: list[str], rank: int) -> None:
    (first_step,) = (int(a) for a in args)
    real_step, calls = train_step.gan_step, [0]

    def nan_input_step(state, g_train, d_train, reals, *a, **kw):
        calls[0] += 1
        if calls[0] >= first_step:  # a batch or a step's batches (optim.d_steps)
            reals = [torch.full_like(r, float("nan")) for r in ([reals] if torch.is_tensor(reals) else reals)]
        return real_step(state, g_train, d_train, reals, *a, **kw)

    train_step.gan_step = nan_input_step


def inf_gradients(kind: str, args: list[str], rank: int) -> None:
    (first_step,) = (int(a) for a in args)
    real_step, calls = train_step.gan_step, [0]

    def overflowing_step(state, *a, **kw):
        calls[0] += 1
        if calls[0] == first_step:  # hooks stay: every backward from here on overflows
            for net in (state.generator, state.discriminator):
                for p in net.parameters():
                    p.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return real_step(state, *a, **kw)

    train_step.gan_step = overflowing_step


def slow(kind: str, args: list[str], rank: int) -> None:
    module, name = (checkpoint, "_save_hashed") if kind == "slow-checkpoint" else (resume, "choose")
    real = getattr(module, name)

    def slowly(*a, **kw):
        print(f"faults.py: {kind} begins", file=sys.stderr, flush=True)
        time.sleep(60)
        return real(*a, **kw)

    setattr(module, name, slowly)


def run_folder_full(kind: str, args: list[str], rank: int) -> None:
    (failures,) = (int(a) for a in args)
    real_append, calls = tracking.append_text, [0]

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    def append_on_full_disk(*a, **kw):
        calls[0] += 1
        return full() if calls[0] <= failures else real_append(*a, **kw)

    tracking.append_text = append_on_full_disk
    tracking.write_atomic = full
    tracking.save_png = full
    RunFolder.write_summary = full  # summary.json: the run folder writes it for the tracker


# DCGAN_FAULT kind -> what injects it (kind:arg:arg, comma-separated for several)
FAULTS = {
    "step": failing_or_stuck, "stuck": failing_or_stuck, "checkpoint-write": full_disk_checkpoint,
    "nan": nan_weights, "nan-input": nan_input, "inf-grad": inf_gradients,
    "slow-checkpoint": slow, "slow-start": slow, "run-folder-full": run_folder_full,
}  # fmt: skip


def inject(fault: str, rank: int) -> None:
    kind, *args = fault.split(":")
    if kind not in FAULTS:
        raise SystemExit(f"faults.py: unknown DCGAN_FAULT {fault!r}")
    FAULTS[kind](kind, args, rank)


if __name__ == "__main__":
    for fault in filter(None, os.environ.get("DCGAN_FAULT", "").split(",")):
        inject(fault, int(os.environ.get("RANK", "0")))
    sys.exit(train.main())
