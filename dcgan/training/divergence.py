"""Divergence: a run whose losses, gradients or weights turn NaN or infinite is stopped,
not trained on.

``DivergenceGuard.check()`` runs at each log step on every rank: it reads the interval's
summed step statistics and one finiteness flag for the nets' weights and buffers (batch
norm's running statistics) in the host sync that log step does anyway (none is added per
step), and the ranks agree on the outcome in one small all-reduce. Non-finite weights or
buffers end the run at once (Adam turns one NaN gradient into NaN weights for good; a NaN
forward pass leaves NaN running statistics even when the update is skipped); non-finite
losses or gradient norms end it after ``train.divergence_patience`` such intervals in a
row. Under fp16 the grad scaler skips overflowing steps by design, so a skipped step is
not divergence; an interval in which every step was skipped is, once
``FP16_SKIPS_IN_A_ROW`` steps in a row were.

The checkpointer checks every tensor it is about to write as well
(``checkpoint.nonfinite_tensors``), so no checkpoint ever holds a non-finite value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dcgan.run.distributed import DistInfo

# The grad scaler halves its scale at each step it skips: this many in a row take its
# initial 2**16 to 1, where the fp16 gradients of a net that trains no longer overflow.
# (Fewer, at the start of a run with a short log interval, are the scaler finding its scale.)
FP16_SKIPS_IN_A_ROW = 16


class DivergenceGuard:
    def __init__(self, stat_names: tuple[str, ...], patience: int, fp16: bool):
        self.stat_names, self.patience, self.fp16 = stat_names, patience, fp16
        self.skip_stats = [stat_names.index("skipped_d"), stat_names.index("skipped_g")]
        self.bad_intervals = 0  # log intervals in a row with non-finite statistics (fp16: all steps skipped)
        self.skipped_in_a_row = 0  # fp16: steps in a row whose D or G update the scaler skipped

    def check(
        self, stats_sum: torch.Tensor, nets: list[nn.Module], info: DistInfo, steps: tuple[int, int]
    ) -> str | None:
        """Collective, at every log step: why the run has diverged (None: it has not).
        ``stats_sum``: the interval's summed step statistics; ``steps``: its first and last step."""
        read = torch.cat([  # the one host sync
            torch.isfinite(stats_sum).float(), _finite_flag(nets).float().view(1), stats_sum[self.skip_stats],
        ]).cpu()  # fmt: skip
        n = len(self.stat_names)
        bad_stats = [name for name, ok in zip(self.stat_names, read[:n].tolist()) if not ok]
        all_skipped = max(read[n + 1 :].tolist()) >= steps[1] - steps[0] + 1
        self.skipped_in_a_row = self.skipped_in_a_row + steps[1] - steps[0] + 1 if all_skipped else 0
        if self.fp16:
            interval_bad = self.skipped_in_a_row >= FP16_SKIPS_IN_A_ROW
        else:
            interval_bad = bool(bad_stats)
        mine = torch.tensor([float(interval_bad), 0.0 if read[n] else 1.0])
        if info.distributed:  # losses differ between ranks: all must know when one of them saw a NaN
            dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=info.control_group)
        stats_bad, weights_bad = bool(mine[0]), bool(mine[1])
        self.bad_intervals = self.bad_intervals + 1 if stats_bad else 0
        span = f"steps {steps[0]}-{steps[1]}"
        if weights_bad:
            losses = f" (and non-finite {', '.join(bad_stats)})" if bad_stats else ""
            return f"the weights or batch-norm statistics hold NaN or infinite values after {span}{losses}"
        if self.bad_intervals >= self.patience and self.fp16:
            return (
                f"the fp16 grad scaler skipped the last {self.skipped_in_a_row} steps in a row (non-finite gradients at "
                f"every step; train.divergence_patience={self.patience}), the last {span}"
            )
        if self.bad_intervals >= self.patience:
            which = ", ".join(bad_stats) if bad_stats else "statistics on another rank"
            return (
                f"non-finite {which} in {self.bad_intervals} log interval(s) in a row "
                f"(train.divergence_patience={self.patience}), the last {span}"
            )
        return None


def finite_weights(nets: list[nn.Module]) -> bool:
    """Whether every weight and floating-point buffer of ``nets`` is finite (one host sync;
    the same on every rank)."""
    return bool(_finite_flag(nets))


def _finite_flag(nets: list[nn.Module]) -> torch.Tensor:
    tensors = [t for net in nets for t in (*net.parameters(), *net.buffers()) if t.is_floating_point()]
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()
