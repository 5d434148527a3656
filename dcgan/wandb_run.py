"""The W&B side of tracking: which mode, opening (and resuming) the run, and calls that
never take training down with them.

Most compute nodes have no route to the W&B server, so offline is first-class: the run
is written under ``<run folder>/wandb/`` and uploaded later with ``wandb sync``. A W&B
failure (no network, the wandb-core process killed by a signal meant for the trainer)
is reported once and the run goes on without W&B; the run folder has everything anyway.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from dcgan.config import WandbConfig

log = logging.getLogger("dcgan.train")

DEFAULT_BASE_URL = "https://api.wandb.ai"


def api_key_configured(env: dict[str, str] | os._Environ = os.environ) -> bool:
    """True when wandb would find an API key: $WANDB_API_KEY or a netrc entry for the
    W&B host ($WANDB_BASE_URL's, where ``wandb login`` writes it)."""
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).hostname
    path = env.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(cfg: WandbConfig, env: dict[str, str] | os._Environ = os.environ) -> tuple[str, str]:
    """(mode, why): ``wandb.mode`` when set, else $WANDB_MODE, else online with an API key
    and offline without one."""
    if cfg.mode != "auto":
        return cfg.mode, "wandb.mode"
    from_env = env.get("WANDB_MODE", "").strip().lower()
    if from_env in ("online", "offline", "disabled"):
        return from_env, "$WANDB_MODE"
    if from_env == "dryrun":  # wandb's old name for offline
        return "offline", "$WANDB_MODE"
    if api_key_configured(env):
        return "online", "an API key is configured"
    return "offline", "no W&B API key is configured"


class WandbRun:
    """One rank-0 W&B run. Every call is guarded: the first failure is logged and W&B is
    dropped for the rest of the run (``self.run`` becomes None)."""

    def __init__(self, run: Any, mode: str):
        self.run, self.mode = run, mode  # run: None when disabled
        self.id: str | None = run.id if run is not None else None
        # This attempt's files: <run folder>/wandb/offline-run-<time>-<id> (or run-... online)
        self.files_dir: Path | None = Path(run.dir).parent if run is not None else None

    def log(self, values: dict[str, Any], step: int) -> None:
        self._call("log", lambda: self.run.log(values, step=step))

    def image(self, key: str, images: np.ndarray, step: int, caption: str = "") -> None:
        """``images``: one uint8 HxWxC grid (wandb 0.31 saves float images black)."""

        def log_image() -> None:
            import wandb  # only when a run is open: W&B disabled needs no wandb installed

            self.run.log({key: wandb.Image(images, caption=caption or None)}, step=step)

        self._call("log", log_image)

    def summary(self, values: dict[str, Any]) -> None:
        self._call("summary", lambda: self.run.summary.update(values))

    def finish(self, exit_code: int, preempted: bool) -> None:
        """Close the run; a preempted one is marked so (it carries on under the same id)."""
        if preempted:
            self._call("mark_preempting", lambda: self.run.mark_preempting())
        self._call("finish", lambda: self.run.finish(exit_code=exit_code))
        self.run = None

    def _call(self, what: str, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - W&B is a reporter; training must not stop for it
            log.warning("W&B %s failed (%s: %s); going on without W&B (the run folder has everything)",
                        what, type(e).__name__, e)  # fmt: skip
            self.run = None
            try:  # else wandb's exit hook fails again, loudly, on the same dead connection
                import wandb

                wandb.teardown()
            except Exception:  # noqa: BLE001
                pass


def open_run(cfg: WandbConfig, run_dir: Path, run_name: str, run_id: str | None, config: dict) -> WandbRun:
    """Start (``run_id`` None) or continue (``run_id`` from the checkpoint) the W&B run of
    this run folder. Online that cannot reach the server goes on offline under the same
    id; any other failure leaves W&B off for this process."""
    mode, why = resolve_mode(cfg)
    if mode == "disabled":
        log.info("W&B disabled (%s); metrics, grids and the summary go to %s only", why, run_dir)
        return WandbRun(None, mode)
    import wandb  # here: a disabled run needs no wandb installed (nor its import time)

    def init(mode: str, run_id: str | None):
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity or None,
            group=cfg.group or None,
            name=cfg.name or run_name,
            tags=cfg.tags or None,
            notes=cfg.notes or None,
            config=config,
            dir=str(run_dir),  # wandb writes to <dir>/wandb/
            mode=mode,
            id=run_id,
            resume="allow",  # a new id starts a run, a known one carries on
            # console="off": wandb would wrap sys.stdout/stderr, and DataLoader workers forked
            # from rank 0 would write through the wrapper to the parent's service connection.
            # The log is train.log in the run folder.
            settings=wandb.Settings(init_timeout=cfg.init_timeout, silent=True, console="off"),
        )

    try:
        run = init(mode, run_id)
    except Exception as e:  # noqa: BLE001
        if mode != "online":
            log.warning("W&B could not start (%s: %s); going on without it", type(e).__name__, e)
            return WandbRun(None, "disabled")
        log.warning("W&B online failed (%s: %s); going on offline", type(e).__name__, e)
        try:
            wandb.teardown()  # the failed attempt still holds the id in the wandb service
            run = init("offline", run_id)
        except Exception as e2:  # noqa: BLE001
            log.warning("W&B offline could not start either (%s: %s); going on without it", type(e2).__name__, e2)
            return WandbRun(None, "disabled")
        mode, why = "offline", "the server could not be reached"
    opened = WandbRun(run, mode)
    verb = "continues" if run_id else "started"
    if mode == "offline":
        log.info(
            "W&B offline (%s): run %s %s in %s; upload it later with: wandb sync %s",
            why, run.id, verb, opened.files_dir, run_dir / "wandb" / f"offline-run-*-{run.id}",
        )  # fmt: skip
    else:
        log.info("W&B online (%s): run %s %s, %s", why, run.id, verb, getattr(run, "url", ""))
    return opened
