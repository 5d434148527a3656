"""The W&B side of tracking: which mode, opening (and resuming) the run, and calls that
never take training down with them.

Most compute nodes have no route to the W&B server, so offline is first-class: the run
is written under ``<run folder>/wandb/`` and uploaded later with ``wandb sync``. A W&B
failure (no network, the wandb-core process killed by a signal meant for the trainer)
is reported once and the run goes on without W&B; the run folder has everything anyway.

W&B's own conventions hold: ``$WANDB_PROJECT``, ``$WANDB_ENTITY``, ``$WANDB_NAME``,
``$WANDB_RUN_GROUP``, ``$WANDB_TAGS`` and ``$WANDB_NOTES`` fill what ``wandb.*`` leaves
unset (``resolve_identity``), an empty ``WANDB_*`` variable counts as unset
(``tidy_environment``), and ``wandb.mode=auto`` goes online wherever wandb itself would
find a login (``find_login``). Deciding never touches the network.
"""

from __future__ import annotations

import configparser
import logging
import netrc
import os
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from dcgan.base.checks import ConfigError, FieldError
from dcgan.config.sections import WandbConfig

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "dcgan"  # wandb.project when neither the config nor $WANDB_PROJECT names one
# wandb 0.31's default server is CoreWeave Forge's front of api.wandb.ai (older clients:
# https://api.wandb.ai); a netrc entry for either host counts, as in wandb (FORGE_HOSTS).
DEFAULT_BASE_URL = "https://api.forge.coreweave.com"
# wandb/sdk/lib/urls.py FORGE_HOSTS: a Forge host -> the W&B API host behind it.
FORGE_HOSTS = {"forge.coreweave.com": "api.wandb.ai", "qa.forge.coreweave.com": "api.qa.wandb.ai"}
# $WANDB_MODE and the settings files' mode, as wandb reads them ("run" and "dryrun": old names).
MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}
# The variables behind the run's identity, by wandb.init argument (wandb/env.py).
IDENTITY_ENV = {
    "project": "WANDB_PROJECT",
    "entity": "WANDB_ENTITY",
    "name": "WANDB_NAME",
    "group": "WANDB_RUN_GROUP",
    "tags": "WANDB_TAGS",
    "notes": "WANDB_NOTES",
}


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def _expand(path: str, env: Mapping[str, str]) -> Path:
    if path == "~" or path.startswith("~/"):
        return _home(env) / path[2:]
    return Path(path)


def settings_files(env: Mapping[str, str], cwd: Path | None = None) -> list[Path]:
    """wandb's settings files, the one that wins last (wandb/sdk/wandb_setup.py
    ``_load_settings``, wandb_settings.py ``settings_workspace``): the global one
    ($WANDB_CONFIG_DIR/settings, else ~/.config/wandb/settings) and the workspace one
    (<$WANDB_DIR or the working directory>/wandb/settings, .wandb/ when that exists)."""
    config_dir = env.get("WANDB_CONFIG_DIR", "").strip()
    global_file = _expand(config_dir, env) / "settings" if config_dir else _home(env) / ".config" / "wandb" / "settings"
    root = _expand(env["WANDB_DIR"], env) if env.get("WANDB_DIR", "").strip() else (cwd or Path.cwd())
    workspace = root / (".wandb" if (root / ".wandb").exists() else "wandb") / "settings"
    return [global_file, workspace]


def read_settings(env: Mapping[str, str], cwd: Path | None = None) -> dict[str, tuple[str, Path]]:
    """The settings files' ``[default]`` keys: key -> (value, the file it came from)."""
    found: dict[str, tuple[str, Path]] = {}
    for path in settings_files(env, cwd):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
            items = parser.items("default") if parser.has_section("default") else []
        except (OSError, configparser.Error):
            continue  # wandb warns and treats the file as empty
        found.update({key: (value, path) for key, value in items})
    return found


def _netrc_path(env: Mapping[str, str]) -> Path:
    # wandb/sdk/lib/wbauth/wbnetrc.py _get_netrc_file_path
    if env.get("NETRC"):
        return _expand(env["NETRC"], env)
    for name in (".netrc", "_netrc"):
        if (_home(env) / name).exists():
            return _home(env) / name
    return _home(env) / ".netrc"


def _netrc_hosts(base_url: str) -> list[str]:
    """The netrc machines wandb looks up for ``base_url`` (wbnetrc.py
    ``read_netrc_auth_with_source``): its host[:port], then the W&B host behind a Forge address."""
    parts = urlsplit(base_url)
    # A Forge address is its API host (urls.py normalize_forge_base_url)
    hosts = [f"api.{parts.hostname}" if parts.hostname in FORGE_HOSTS else parts.netloc]
    for forge, api in FORGE_HOSTS.items():
        if parts.hostname in (forge, f"api.{forge}", api) and api not in hosts:
            hosts.append(api)
    return hosts


def find_login(env: Mapping[str, str] = os.environ, cwd: Path | None = None) -> str | None:
    """Where wandb would take its credentials from, or None: the checks wandb 0.31 makes
    before an online run (wandb/sdk/lib/wbauth/authenticate.py ``_use_system_auth``:
    ``_try_env_auth``, then ``wbnetrc.read_netrc_auth_with_source``, then the api_key
    setting), done here on ``env`` and the files, without wandb, never over the network.
    wandb has no public call that answers this without side effects: ``wandb.login``
    keeps the credentials for the session, prompts, and may ask the server who is logged in.
    An ``identity_token_file`` in a settings file is not a login to wandb 0.31 (its online
    runs stop with "No API key configured"); $WANDB_IDENTITY_TOKEN_FILE is."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if env.get(var, "").strip():
            return f"${var}"
    settings = read_settings(env, cwd)
    base_url = env.get("WANDB_BASE_URL", "").strip() or settings.get("base_url", (DEFAULT_BASE_URL,))[0]
    path = _netrc_path(env)
    try:
        entries = netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        entries = None  # absent or unreadable: wandb (warns and) reads no key from it
    for host in _netrc_hosts(base_url):
        creds = entries.authenticators(host) if entries is not None and host else None
        if creds and creds[2]:  # an entry without a password is no key
            return f"the entry for {host} in {path}"
    if "api_key" in settings and settings["api_key"][0].strip():
        return f"the api_key in {settings['api_key'][1]}"
    return None


def resolve_mode(cfg: WandbConfig, env: Mapping[str, str] = os.environ, cwd: Path | None = None) -> tuple[str, str]:
    """(mode, why): ``wandb.mode`` when not auto; else $WANDB_MODE; else the mode a
    settings file holds (``wandb offline``, ``wandb disabled`` write it); else online
    where wandb finds a login (``find_login``) and offline where it finds none."""
    if cfg.mode != "auto":
        return cfg.mode, "wandb.mode"
    from_env = env.get("WANDB_MODE", "").strip().lower()
    if from_env in MODES:
        return MODES[from_env], "$WANDB_MODE"
    settings = read_settings(env, cwd)
    if "mode" in settings and settings["mode"][0].strip().lower() in MODES:
        value, path = settings["mode"]
        return MODES[value.strip().lower()], f"mode = {value.strip()} in {path}"
    login = find_login(env, cwd)
    if login is not None:
        return "online", f"W&B login from {login}"
    return "offline", "no W&B login: no $WANDB_API_KEY, $WANDB_IDENTITY_TOKEN_FILE, netrc entry or api_key setting"


def env_tags(value: str) -> list[str]:
    """$WANDB_TAGS: comma-separated, blanks around a tag and empty items dropped (wandb
    refuses an empty tag; an over-long one is refused before the start: check_environment)."""
    return [t.strip() for t in value.split(",") if t.strip()]


def resolve_identity(
    cfg: WandbConfig, run_name: str, env: Mapping[str, str] = os.environ
) -> tuple[dict[str, Any], dict[str, str]]:
    """The run's project, entity, name, group, tags and notes for ``wandb.init``, and where
    each came from: ``wandb.<key>`` when set, else its W&B variable (IDENTITY_ENV), else
    the default (project: DEFAULT_PROJECT, name: ``run_name``, the rest: none)."""
    defaults: dict[str, Any] = {"project": DEFAULT_PROJECT, "name": run_name}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, var in IDENTITY_ENV.items():
        configured = getattr(cfg, key)
        from_env: Any = env.get(var, "").strip()
        if key == "tags":
            from_env = env_tags(from_env)
        if configured:
            values[key], sources[key] = configured, f"wandb.{key}"
        elif from_env:
            values[key], sources[key] = from_env, f"${var}"
        else:
            values[key], sources[key] = defaults.get(key), "default"
    return values, sources


def check_environment(cfg: WandbConfig, env: Mapping[str, str] = os.environ) -> None:
    """ConfigError naming the variable when a W&B variable the trainer reads holds what the
    same setting in the config could not: wandb would refuse it at the start and the run
    would go on without W&B. Checked before the start, as the config is. wandb validates
    every variable when it starts, also one whose setting the config gives."""
    if cfg.mode == "disabled":  # wandb is not started at all
        return
    mode = env.get("WANDB_MODE", "").strip()
    if mode and mode.lower() not in MODES:
        raise ConfigError(f"$WANDB_MODE: {mode!r} is not a W&B mode ({', '.join(MODES)})")
    for key, var in IDENTITY_ENV.items():
        value = env.get(var, "").strip()
        if not value:  # unset
            continue
        try:
            WandbConfig(**{key: env_tags(value) if key == "tags" else value})
        except FieldError as e:
            raise ConfigError(f"${var}: {e.problem} (as wandb.{key} in the config)") from None
    base_url = env.get("WANDB_BASE_URL", "").strip()
    problem = base_url_problem(base_url) if base_url else None
    if problem:
        raise ConfigError(f"$WANDB_BASE_URL: {base_url!r} {problem}")


def base_url_problem(url: str) -> str | None:
    """Why wandb 0.31 refuses ``url`` as its server's address (wandb_settings.py
    ``validate_base_url``), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError as e:
        return f"is not a URL ({e})"
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        return "is not the http:// or https:// address of a W&B server"
    if re.match(r".*wandb\.ai[^.]*$", url):  # wandb's own checks of its cloud's address
        if "api." not in url:
            return "is W&B's web site, not its server: https://api.wandb.ai"
        if parts.scheme != "https":
            return "must use https: https://api.wandb.ai"
    return None


def tidy_environment(env: MutableMapping[str, str] = os.environ) -> list[str]:
    """Make the W&B variables ones wandb starts with. wandb reads them all when it starts and
    refuses to start on an empty $WANDB_MODE, $WANDB_BASE_URL or $WANDB_TAGS, or on an empty
    tag, and on a $WANDB_MODE in capitals: empty ``WANDB_*`` variables are removed (empty
    means unset), $WANDB_MODE is lower-cased (``resolve_mode`` reads it in any case) and
    $WANDB_TAGS is rewritten to the tags ``env_tags`` keeps. Logs and returns what changed."""
    changed = []
    for var in sorted(k for k in env if k.startswith("WANDB_")):
        if not env[var].strip():
            del env[var]
            changed.append(f"${var} is empty: taken as unset")
            log.info("W&B: %s", changed[-1])
    if "WANDB_MODE" in env and env["WANDB_MODE"] != env["WANDB_MODE"].strip().lower():
        env["WANDB_MODE"] = env["WANDB_MODE"].strip().lower()
    if "WANDB_TAGS" in env:
        tags = env_tags(env["WANDB_TAGS"])
        if ",".join(tags) != env["WANDB_TAGS"]:
            env["WANDB_TAGS"] = ",".join(tags)
            if not tags:
                del env["WANDB_TAGS"]
    return changed


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
            except (Exception, SystemExit):  # noqa: BLE001 - teardown sys.exit()s with the service's exit code
                pass


def open_run(cfg: WandbConfig, run_dir: Path, run_name: str, run_id: str | None, config: dict) -> WandbRun:
    """Start (``run_id`` None) or continue (``run_id`` from the checkpoint) the W&B run of
    this run folder. Online that cannot reach the server goes on offline under the same
    id; any other failure leaves W&B off for this process."""
    tidy_environment()
    mode, why = resolve_mode(cfg)
    if mode == "disabled":
        log.info("W&B disabled (%s); metrics, grids and the summary go to %s only", why, run_dir)
        return WandbRun(None, mode)
    import wandb  # here: a disabled run needs no wandb installed (nor its import time)

    values, sources = resolve_identity(cfg, run_name)
    from_env = [f"{key} {values[key]!r} from {source}" for key, source in sources.items() if source.startswith("$")]
    if from_env:
        log.info("W&B run settings from the environment (wandb.* leaves them unset): %s", ", ".join(from_env))

    def init(mode: str, run_id: str | None):
        return wandb.init(
            project=values["project"],
            entity=values["entity"],
            group=values["group"],
            name=values["name"],
            tags=values["tags"] or None,
            notes=values["notes"],
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
