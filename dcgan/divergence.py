"""Divergence: a run whose losses, gradients or weights turn NaN or infinite is stopped,
not trained on.

``DivergenceGuard.check()`` runs at each log step on every rank: it reads the interval's
summed step statistics and one finiteness flag for the nets' weights in the host sync that
log step does anyway (none is added per step), and the ranks agree on the outcome in one
small all-reduce. Non-finite weights end the run at once (Adam turns one NaN gradient
into NaN weights for good); non-finite losses or gradient norms end it after
``train.divergence_patience`` such intervals in a row. Under fp16 only the weights count:
the grad scaler skips overflowing steps (infinite gradient norms) by design.

The checkpointer checks every tensor it is about to write as well
(``checkpoint.nonfinite_tensors``), so no checkpoint ever holds a non-finite value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dcgan.distributed import DistInfo


class DivergenceGuard:
    def __init__(self, stat_names: tuple[str, ...], patience: int, fp16: bool):
        self.stat_names, self.patience, self.fp16 = stat_names, patience, fp16
        self.bad_intervals = 0  # log intervals in a row with non-finite statistics

    def check(
        self, stats_sum: torch.Tensor, nets: list[nn.Module], info: DistInfo, steps: tuple[int, int]
    ) -> str | None:
        """Collective, at every log step: why the run has diverged (None: it has not).
        ``stats_sum``: the interval's summed step statistics; ``steps``: its first and last step."""
        flags = torch.cat([torch.isfinite(stats_sum), _finite_flag(nets).view(1)]).cpu()  # the one host sync
        stats_ok = flags[:-1].tolist()
        bad_stats = [name for name, ok in zip(self.stat_names, stats_ok) if not ok]
        mine = torch.tensor([0.0 if self.fp16 or not bad_stats else 1.0, 0.0 if flags[-1] else 1.0])
        if info.distributed:  # losses differ between ranks: all must know when one of them saw a NaN
            dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=info.control_group)
        stats_bad, weights_bad = bool(mine[0]), bool(mine[1])
        self.bad_intervals = self.bad_intervals + 1 if stats_bad else 0
        span = f"steps {steps[0]}-{steps[1]}"
        if weights_bad:
            losses = f" (and non-finite {', '.join(bad_stats)})" if bad_stats else ""
            return f"the weights hold NaN or infinite values after {span}{losses}"
        if self.bad_intervals >= self.patience:
            which = ", ".join(bad_stats) if bad_stats else "statistics on another rank"
            return (
                f"non-finite {which} in {self.bad_intervals} log interval(s) in a row "
                f"(train.divergence_patience={self.patience}), the last {span}"
            )
        return None


def finite_weights(nets: list[nn.Module]) -> bool:
    """Whether every weight of ``nets`` is finite (one host sync; the same on every rank)."""
    return bool(_finite_flag(nets))


def _finite_flag(nets: list[nn.Module]) -> torch.Tensor:
    return torch.stack([torch.isfinite(p).all() for net in nets for p in net.parameters()]).all()
