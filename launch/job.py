"""What every task of a submitit job runs: one rank of ``dcgan.train``, in this process.

``TrainingJob`` turns the Slurm (or submitit-local) task environment into the variables
torchrun would have set (MASTER_ADDR = first node, MASTER_PORT from the job id, RANK,
LOCAL_RANK, WORLD_SIZE), then calls ``dcgan.train.main`` exactly as torchrun's workers do.

Preemption. submitit's own USR2 handler calls ``checkpoint()`` on global rank 0 only
and lets the other ranks run on, so it cannot make the ranks agree on a stop step
(a rank that stops alone leaves the others in a collective). The trainer installs its own handler for USR2 / SIGTERM: every rank
stops after the same step, rank 0 writes the checkpoint and all return
``EXIT_PREEMPTED``. Then global rank 0 runs ``scontrol requeue`` (at most
``max_requeues`` times over the job's life) and every task exits without a result, so
submitit's client keeps waiting for the requeued job, which resumes from the run folder.
Before the trainer's handler is installed (the first seconds of a task) submitit's is
in place: the job is ``Checkpointable``, so it is requeued as it was submitted.
A job requeued from outside (``scontrol requeue``, a node failure) starts the same way
and resumes from the newest valid checkpoint.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import submitit

from dcgan import train
from dcgan.base.exits import EXIT_OK, EXIT_PREEMPTED
from dcgan.checkpoint import files as checkpoint
from dcgan.config.loading import load_config
from dcgan.run.folder import RunFolder

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """The training exited with an error; submitit reports it to the client as the job's result."""


@dataclass
class TrainingJob(submitit.helpers.Checkpointable):
    config: str  # the YAML config, as given on the login node
    overrides: list[str]
    workdir: str  # where it was submitted from: relative paths in the config mean the same there
    max_requeues: int

    def __call__(self) -> dict[str, Any] | None:
        os.chdir(self.workdir)
        job = submitit.JobEnvironment()
        # CUDA_VISIBLE_DEVICES is left alone: each rank finds its GPU from LOCAL_RANK and the GPUs
        # it sees (dcgan/run/distributed.py, cuda_index).
        torch_env = submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        requeues = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if job.global_rank == 0:
            print(
                f"launch.job: job {job.job_id}, {job.num_nodes} node(s), {job.num_tasks} task(s), "
                f"rendezvous {torch_env.master_addr}:{torch_env.master_port}, "
                f"requeue {requeues} of at most {self.max_requeues}",
                file=sys.stderr,
                flush=True,
            )
        not_requeued: list[str] = []  # why rank 0 did not requeue, if it did not

        def on_exit(code: int) -> None:
            # Rank 0, before any rank exits (with KillOnBadExit, Slurm ends the job as
            # soon as one task exits 75).
            if code == EXIT_PREEMPTED:
                self.requeue(job, requeues, not_requeued)

        code = train.main(["--config", self.config, *self.overrides], on_exit=on_exit)
        if code == EXIT_OK:
            return self.summary() if job.global_rank == 0 else None
        if code != EXIT_PREEMPTED:
            raise JobFailed(f"dcgan.train exited with code {code} on rank {job.global_rank}; see the task logs")
        if not_requeued:
            raise JobFailed(not_requeued[0])
        # No result file: for submitit's client the job is not over, it is requeued.
        # (SystemExit, unlike an exception, is not turned into an error result.)
        sys.exit(EXIT_PREEMPTED)

    def requeue(self, job: submitit.JobEnvironment, requeues: int, not_requeued: list[str]) -> None:
        """Rank 0, after the stop checkpoint: ``scontrol requeue`` this job, within the bound.
        Must not raise (the other ranks wait for it): a reason not to requeue goes into
        ``not_requeued`` and becomes the job's error."""
        if job.cluster != "slurm":
            log.warning(
                "stopped and checkpointed; the %s executor cannot requeue: submit again to carry on", job.cluster
            )
            return
        if requeues >= self.max_requeues:
            not_requeued.append(
                f"job {job.job_id} stopped and checkpointed but is not requeued: it already was {requeues} time(s), "
                f"the limit (--max-requeues {self.max_requeues}); submit again to carry on"
            )
            log.error("%s", not_requeued[0])
            return
        try:
            done = subprocess.run(["scontrol", "requeue", job.job_id], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("scontrol requeue %s failed (%s); the job ends here: submit again to carry on", job.job_id, e)
            return
        if done.returncode == 0:
            log.warning("requeued job %s (requeue %d of at most %d)", job.job_id, requeues + 1, self.max_requeues)
        else:  # e.g. Slurm is already requeuing it itself (PreemptMode=REQUEUE)
            log.warning("scontrol requeue %s: %s", job.job_id, (done.stderr or done.stdout).strip())

    def summary(self) -> dict[str, Any]:
        """What the client gets from ``job.result()``: where the run is and how far it got."""
        cfg = load_config(self.config, self.overrides)
        newest, _ = checkpoint.latest_valid(RunFolder.of(cfg).checkpoints)
        return {
            "run_dir": str(cfg.run_dir.resolve()),
            "step": checkpoint.step_of(newest) if newest else 0,
            "checkpoint": str(newest.resolve()) if newest else None,
        }
