"""The step as the training loop runs it: ``gan_step`` (below), the EMA update
and the step's statistics summed into the log interval, run eagerly or, with
``train.cuda_graph``, captured once as a CUDA graph and replayed.

Why a graph: at DCGAN sizes a step is a few hundred small kernels, and eager PyTorch
takes longer to launch them from Python than the GPU takes to run them. A replay
launches them all in one call. What makes the step capturable (torch's CUDA notes,
"Whole-network capture"):

* no host sync anywhere in it (tests/e2e/test_cuda.py checks with set_sync_debug_mode);
* fixed shapes and addresses: each batch is copied into one input buffer before the
  replay, the statistics are summed into the interval's buffer in place, and the EMA
  decay ramp comes from a step counter on the device (a Python float would be frozen
  at capture);
* Adam with ``capturable=True`` (its step counters on the device), autocast without
  its weight cache (gan_step);
* no DDP: its reducer needs 11 eager iterations on a side stream and NCCL's async error
  handling off to be captured. Instead, with a process group, each net's gradients are
  averaged by one flat all-reduce after its backward (stylegan3's way), a collective a
  graph holds like any kernel, and rank 0's weights are broadcast once at the start;
* the first ``WARMUP_STEPS`` steps run eagerly on a side stream, so that cuDNN's
  autotuning, Adam's lazy state and the allocator settle first. They are real training
  steps; the capture itself runs nothing, so the step it records is run by the first replay.

Eager where a graph cannot hold the step: on the CPU, and under fp16, whose grad scaler
keeps per-step bookkeeping on the host (which optimisers stepped, whether the scale grows)
that a replay would not update.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dcgan.checkpoint.state import TrainState
from dcgan.config.sections import Config
from dcgan.models import losses
from dcgan.models.losses import LossConfig
from dcgan.models.networks import ema_decay, sample_latent, update_ema
from dcgan.run.distributed import DistInfo
from dcgan.training import ada, penalties

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# What gan_step measures each step (averaged over log.every steps): losses, D's mean
# output on real data and on fakes before (d_fake) and after (d_fake_after) the D update
# (for loss.kind=bce the mean probability of "real", for the others the mean raw score),
# the gradient norms (unscaled under fp16), and whether the step's update was skipped
# because a gradient was not finite (fp16's grad scaler does that by design; averaged:
# the fraction of steps skipped). With optim.d_steps > 1, D's values are the mean over
# the step's D updates.
STAT_NAMES = (
    "loss_d_real", "loss_d_fake", "loss_g", "d_real", "d_fake", "d_fake_after", "grad_norm_d", "grad_norm_g",
    "skipped_d", "skipped_g",
)  # fmt: skip
# With a gradient penalty (loss.kind=wgan, loss.r1_gamma): the penalty added to D's loss,
# per step (a lazy R1 term counts with its weight on the steps it is due, 0 on the others).
PENALTY_STAT_NAMES = ("loss_d_penalty",)


def stat_names(cfg: Config) -> tuple[str, ...]:
    """The names of this run's step statistics: STAT_NAMES, then the penalty's and d_augment's when they are on."""
    return (
        STAT_NAMES + (PENALTY_STAT_NAMES if cfg.loss.penalised else ()) + (ada.STAT_NAMES if cfg.d_augment.on else ())
    )


class StepSettings(NamedTuple):
    """How gan_step trains, from the run's config (``StepSettings.of``)."""

    nz: int
    amp_dtype: torch.dtype | None = None
    real_target: float = 1.0  # D's label for real images (below 1: one-sided label smoothing; bce and lsgan)
    loss: LossConfig = LossConfig()

    @classmethod
    def of(cls, cfg: Config) -> StepSettings:
        return cls(cfg.model.nz, AMP_DTYPES[cfg.train.precision], 1.0 - cfg.optim.label_smoothing, cfg.loss)


def gan_step(
    state: TrainState,
    g_train: nn.Module,
    d_train: nn.Module,
    reals: torch.Tensor | Sequence[torch.Tensor],
    how: StepSettings,
    average_grads: Callable[[nn.Module], None] | None = None,
    d_augment: ada.DAugment | None = None,
    r1_due: bool = False,
    labels: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One D update per real batch in ``reals`` (a batch, or optim.d_steps of them), then one
    G update; returns the step's statistics (``stat_names`` without d_augment's) as a tensor
    on the device. No host sync anywhere (the caller reads the statistics only at log steps),
    so the whole step can be captured as a CUDA graph (dcgan/training/step.py).
    ``average_grads``: what averages a net's gradients over the ranks after its backward,
    where DDP does not. ``d_augment``: augments every batch D sees, real and fake, in both
    updates (a fresh draw each time; G's gradient flows through it), and counts D's verdicts
    on real images for ADA. ``r1_due``: this step adds the lazy R1 term (``LossConfig.r1_due``).
    ``labels``: a conditional model's class labels of each real batch; its fakes are made
    of the same classes (the data's class mix), and D judges each image with its class."""
    reals = [reals] if isinstance(reals, torch.Tensor) else list(reals)
    conds = [()] * len(reals) if labels is None else [(y,) for y in labels]
    D = state.discriminator
    augment = d_augment.augment if d_augment is not None else _unchanged
    # No autocast weight cache: a cast cached while a CUDA graph is captured would be freed with it.
    amp = torch.autocast(reals[0].device.type, dtype=how.amp_dtype, enabled=how.amp_dtype is not None,
                         cache_enabled=False)  # fmt: skip
    d_stats = []
    for real, cond in zip(reals, conds):  # G's update judges the last D update's fakes (the others' graphs are freed)
        fake, stats = _d_update(
            state, g_train, d_train, real, cond, how, amp, augment, average_grads, d_augment, r1_due
        )
        d_stats.append(stats)
    d_stats = torch.stack(d_stats).mean(0)

    # G through the frozen D: no D gradients, no D all-reduce (and no stale-gradient mix-up
    # in the next D step). Without DDP, and compiled when D is.
    d_frozen = d_train.module if isinstance(d_train, DDP) else d_train
    state.opt_g.zero_grad(set_to_none=True)
    D.requires_grad_(False)
    with amp:
        out_g = d_frozen(augment(fake), *cond).view(-1).float()
    loss_g = losses.g_loss(how.loss.kind, out_g)
    state.scaler_g.scale(loss_g).backward()
    if average_grads is not None:
        average_grads(state.generator)
    grad_norm_g = gradient_norm(state.generator, state.scaler_g, state.opt_g)
    state.scaler_g.step(state.opt_g)
    state.scaler_g.update()
    D.requires_grad_(True)

    with torch.no_grad():
        loss_d_real, loss_d_fake, d_real, d_fake, grad_norm_d, skipped_d, penalty = d_stats
        stats = [
            loss_d_real, loss_d_fake, loss_g, d_real, d_fake, losses.output_summary(how.loss.kind, out_g),
            grad_norm_d, grad_norm_g, skipped_d, (~torch.isfinite(grad_norm_g)).float(),
        ]  # fmt: skip
        return torch.stack(stats + ([penalty] if how.loss.penalised else []))


class DUpdate(NamedTuple):
    fake: torch.Tensor  # the fakes D judged (with G's graph, for G's update)
    stats: torch.Tensor  # loss_d_real, loss_d_fake, d_real, d_fake, grad_norm_d, skipped_d, penalty


def _d_update(state, g_train, d_train, real, cond, how: StepSettings, amp, augment, average_grads, d_augment, r1_due):
    """One D update: D on real images, then on fakes, plus any gradient penalty due: three
    backward passes, one gradient all-reduce (the last, under DDP). ``cond``: () or the
    batch's (labels,), the extra input of a conditional G and D."""
    D, kind = state.discriminator, how.loss.kind
    state.opt_d.zero_grad(set_to_none=True)
    with d_train.no_sync() if isinstance(d_train, DDP) else contextlib.nullcontext():
        with amp:
            out_real = d_train(augment(real), *cond).view(-1).float()
        loss_d_real = losses.d_real_loss(kind, out_real, how.real_target)
        state.scaler_d.scale(loss_d_real).backward()
        z = sample_latent(real.shape[0], how.nz, real.device)
        with amp:
            fake = g_train(z, *cond)
        penalty = penalties.penalty(D, real, fake, how.loss, r1_due, augment, cond)
        if penalty.requires_grad:  # a penalty was due
            state.scaler_d.scale(penalty).backward()
    if d_augment is not None:
        d_augment.observe(out_real)
    with amp:
        out_fake = d_train(augment(fake.detach()), *cond).view(-1).float()
    loss_d_fake = losses.d_fake_loss(kind, out_fake)
    state.scaler_d.scale(loss_d_fake).backward()
    if average_grads is not None:
        average_grads(D)
    grad_norm_d = gradient_norm(D, state.scaler_d, state.opt_d)
    state.scaler_d.step(state.opt_d)
    state.scaler_d.update()
    with torch.no_grad():
        stats = torch.stack([
            loss_d_real, loss_d_fake, losses.output_summary(kind, out_real), losses.output_summary(kind, out_fake),
            grad_norm_d, (~torch.isfinite(grad_norm_d)).float(), penalty.detach(),
        ])  # fmt: skip
    return DUpdate(fake, stats)


def _unchanged(images: torch.Tensor) -> torch.Tensor:
    return images


def gradient_norm(net: nn.Module, scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer) -> torch.Tensor:
    """L2 norm of ``net``'s gradients, on the device. Under fp16 the grads are unscaled
    first (``scaler.step`` then knows not to do it again); inf when the step overflowed."""
    scaler.unscale_(opt)
    return torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])


WARMUP_STEPS = 3  # eager steps before the capture: cuDNN autotuning and Adam's state are done by then


class GraphChoice(NamedTuple):
    on: bool
    why: str  # one line for the log


def choose_graph(cfg: Config, device: torch.device) -> GraphChoice:
    """Whether this run captures its step as a CUDA graph (``train.cuda_graph``), and why."""
    t = cfg.train
    setting = f"train.cuda_graph={t.cuda_graph}"
    if t.cuda_graph == "off":
        return GraphChoice(False, f"{setting}: eager steps")
    if device.type != "cuda":
        return GraphChoice(False, f"{setting}: eager steps on the {device.type} (CUDA graphs need a GPU)")
    if t.precision == "fp16":
        return GraphChoice(
            False,
            f"{setting}: eager steps under fp16, whose grad scaler keeps per-step state on the host that a graph "
            "replay would not update (bf16 needs no scaler and is captured)",
        )
    if cfg.d_augment.on:
        return GraphChoice(
            False,
            f"{setting}: eager steps with d_augment, whose draws are seeded on the host before each step and whose "
            "ADA adjustments follow the host's step count, which a graph replay would not redo",
        )
    if cfg.model.conditional:
        return GraphChoice(False, f"{setting}: eager steps for a conditional model (its labels are no graph input)")
    if cfg.loss.penalised or cfg.optim.d_steps > 1:
        return GraphChoice(
            False,
            f"{setting}: eager steps with a gradient penalty or optim.d_steps > 1, whose steps differ "
            "(a lazy penalty every few steps, several batches a step) from the one a graph would replay",
        )
    if t.compile and t.cuda_graph == "auto":
        return GraphChoice(False, f"{setting}: eager compiled steps (train.compile); cuda_graph=on captures them too")
    return GraphChoice(True, f"{setting}: the whole step is one CUDA graph, captured after {WARMUP_STEPS} eager steps")


def average_gradients(net: nn.Module) -> None:
    """DDP's gradient average in one collective: ``net``'s gradients flattened into one
    buffer, all-reduced and divided by the world size (a graph can hold it)."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])


def broadcast_weights(nets: list[nn.Module]) -> None:
    """Rank 0's parameters and buffers on every rank, as DDP does when it wraps a net."""
    for net in nets:
        for tensor in [*net.parameters(), *net.buffers()]:
            dist.broadcast(tensor.data, src=0)


class TrainStep:
    """``step(reals)``: one training step on the step's real batches (``optim.d_steps`` of
    them), everything on the device. The loop calls it the same way whether it runs eagerly
    or replays a graph (which holds steps of one batch)."""

    def __init__(
        self,
        state: TrainState,
        g_train: nn.Module,
        d_train: nn.Module,
        cfg: Config,
        dist_info: DistInfo,
        stats_sum: torch.Tensor,
        graphed: bool,
    ):
        self.state, self.g_train, self.d_train = state, g_train, d_train
        self.how, self.loss, self.decay = StepSettings.of(cfg), cfg.loss, cfg.model.ema_decay
        self.conditional = cfg.model.conditional  # eager steps (choose_graph), with the batches' labels
        self.stats_sum = stats_sum  # the log interval's sum (Interval.stats): added to in place
        device = stats_sum.device
        # Steps done, for the EMA ramp (float64: it then rounds as the formula in Python floats).
        self.steps_done = torch.full((), float(state.step), dtype=torch.float64, device=device)
        self.average_grads = average_gradients if graphed and dist_info.distributed else None
        if self.average_grads is not None:
            broadcast_weights([state.generator, state.discriminator])
        self.graphed = graphed
        images_per_step = cfg.train.batch_size * cfg.optim.d_steps
        self.d_augment = (
            ada.DAugment(cfg.d_augment, state, cfg.train.seed, dist_info, images_per_step) if cfg.d_augment.on else None
        )
        self.eager_left = WARMUP_STEPS if graphed else 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_real: torch.Tensor | None = None

    def __call__(
        self, reals: torch.Tensor | Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None = None
    ) -> None:
        """``labels``: each batch's class labels (a conditional model's only; others ignore them)."""
        reals = (reals,) if isinstance(reals, torch.Tensor) else reals
        if self.conditional:
            self._step(reals, labels)
        elif self.graph is not None:
            self.static_real.copy_(reals[0])
            self.graph.replay()
        elif not self.graphed:
            self._step(reals)
        elif self.eager_left > 0:
            self._warmup_step(reals[0])
        else:
            self._capture(reals[0])
            self.graph.replay()

    def _step(self, reals: torch.Tensor | Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None = None) -> None:
        s = self.state
        if self.d_augment is not None:
            self.d_augment.begin(s.step + 1)
        stats = gan_step(
            s, self.g_train, self.d_train, reals, self.how, self.average_grads, self.d_augment,
            self.loss.r1_due(s.step + 1), labels,
        )  # fmt: skip
        if s.generator_ema is not None:
            self.steps_done += 1
            update_ema(s.generator_ema, s.generator, ema_decay(self.steps_done, self.decay))
        if self.d_augment is not None:
            self.d_augment.end(s.step + 1)
            stats = torch.cat([stats, self.d_augment.stats()])
        self.stats_sum.add_(stats)

    def _warmup_step(self, real: torch.Tensor) -> None:
        """An eager step on a side stream, as torch's notes ask of the iterations before a capture."""
        side = torch.cuda.Stream(real.device)
        side.wait_stream(torch.cuda.current_stream(real.device))
        with torch.cuda.stream(side), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "This instance was constructed with capturable=True")  # it will be
            self._step(real)
        torch.cuda.current_stream(real.device).wait_stream(side)
        self.eager_left -= 1

    def _capture(self, real: torch.Tensor) -> None:
        """Record one step on ``static_real`` (nothing runs: the first replay runs it).
        thread_local: the data loader's pin-memory thread may allocate meanwhile."""
        self.static_real = real.clone(memory_format=torch.preserve_format)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._step(self.static_real)
        self.graph = graph
        log.debug("captured the training step as a CUDA graph")
