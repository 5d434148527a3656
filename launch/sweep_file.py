"""Reading a sweep file and its sweep folder: the runs it names, and where they go.

Both ``python -m launch.sweep`` (submission, ``launch/sweep.py``) and ``python -m launch.sweep
status`` (``launch/status.py``) read a sweep through this module, so they name the same runs
and find the same folders; neither imports the other for it. The file's format is in
``launch/sweep.py``'s doc. ``sweep.json`` (``SWEEP_JSON``) in the sweep folder maps runs to job
ids and names the sweep file that owns the folder: ``launch.sweep`` writes it,
``read_sweep_json`` / ``job_ids`` read it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import yaml

from dcgan.base.checks import ConfigError
from dcgan.base.fileio import read_json
from dcgan.config.loading import load_config, read_utf8, read_yaml
from dcgan.config.sections import Config
from dcgan.run.folder import RunFolder

SWEEP_JSON = "sweep.json"  # in the sweep folder, <out_dir>/<sweep name>/


DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int_uniform")


SWEEP_KEYS = ("base", "name", "set", "grid", "random", "slurm")


def read_sweep_file(path: Path) -> dict[str, Any]:
    """The sweep file's top-level mapping, its keys checked."""
    where = str(path)
    text = read_utf8(path, "sweep file")
    try:
        spec = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: top level must be a mapping ({', '.join(SWEEP_KEYS)})")
    for key in spec:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{where}: {key}: unknown key (known here: {', '.join(SWEEP_KEYS)})")
    if not spec.get("base"):
        raise ConfigError(f"{where}: base: the config every run starts from is missing")
    return spec


def sweep_name(path: Path, spec: dict[str, Any]) -> str:
    return str(spec.get("name") or path.stem)


def placed_runs(path: Path, spec: dict[str, Any]) -> list[tuple[int, list[str], list[str]]]:
    """Every run of a read sweep file as (index, its own overrides, the overrides it runs
    with: its own + train.name, train.out_dir and wandb.group). Submission and
    ``launch.sweep status`` both name runs here, so they find the same folders."""
    where, name = str(path), sweep_name(path, spec)
    fixed = mapping_at(spec.get("set"), where, "set")
    grid = mapping_at(spec.get("grid"), where, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{key}: expected a non-empty list of values, got {values!r}")
    draws = _random_draws(mapping_at(spec.get("random"), where, "random"), where)
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    runs = []
    for index, (point, draw) in enumerate(itertools.product(points, draws)):
        own = [_override(k, v) for k, v in {**fixed, **point, **draw}.items()]
        try:
            cfg = load_config(str(spec["base"]), own)
        except ConfigError as e:
            raise run_error(path, index, own, e) from None
        out_dir = Path(cfg.train.out_dir) / name
        run_name = f"r{index:03d}-{config_digest(str(spec['base']), own, cfg)}"
        if not (out_dir / run_name).exists():
            run_name = earlier_run_folder(out_dir, index, cfg) or run_name
        placed = [*own, f"train.name={run_name}", f"train.out_dir={out_dir}", f"wandb.group={name}"]
        runs.append((index, own, placed))
    return runs


PLACEMENT = (("train", "name"), ("train", "out_dir"), ("wandb", "group"))  # where a run goes, set by the sweep


def config_digest(base: str, own: list[str], cfg: Config) -> str:
    """8 hex digits of the settings a run is given: the keys its base config file and its
    overrides set, with the values the run trains with (as parsed and typed: a comment in
    the base, its key order or ``1.0e-4`` for ``0.0001`` change nothing), less its placement.

    A sweep resubmitted unchanged finds its runs again, and a run of another base or other
    settings never lands in one's folder. What the code fills in is left out: a code update
    that adds a setting or changes a default keeps the names, as it keeps a plain
    ``dcgan.train`` run's folder (the trainer logs what changed on resume)."""
    given = read_yaml(read_utf8(Path(base), "config")) or {}  # load_config read it already: a mapping
    for item in own:
        node = given
        *parents, leaf = item.partition("=")[0].strip().split(".")
        for key in parents:
            node[key] = node[key] if isinstance(node.get(key), dict) else {}
            node = node[key]
        node[leaf] = None  # only the key counts here: its value is the config's
    settings = _pick(cfg.to_dict(), given)
    for section, key in PLACEMENT:
        settings.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _pick(full: Any, shape: Any) -> Any:
    """``full`` cut to the keys of the mapping ``shape`` (a leaf of ``shape`` takes all below it)."""
    if not isinstance(shape, dict) or not isinstance(full, dict):
        return full
    return {key: _pick(full[key], below) for key, below in shape.items() if key in full}


def earlier_run_folder(out_dir: Path, index: int, cfg: Config) -> str | None:
    """The name of a run folder ``r<index>-...`` in the sweep folder that an earlier version
    of launch.sweep named (first by the run's overrides alone, then by its whole config
    with the code's defaults) and whose config.yaml holds this run's settings; the newest
    started when there are several. Without it a sweep resubmitted after the update would
    start its runs again in new folders. A folder of another base (the old names did not
    tell them apart) differs in some setting and is left alone; so is one never started
    (no config.yaml yet): the run starts in its new folder."""
    ours = _flat(cfg.to_dict())
    found = []
    for folder in out_dir.glob(f"r{index:03d}-*"):
        try:
            config = RunFolder(folder).config
            theirs = _flat(yaml.safe_load(config.read_text()))
            started = config.stat().st_mtime
        except (OSError, ValueError, yaml.YAMLError, AttributeError):
            continue  # not a started run folder
        # Settings the code added since (not in theirs) or dropped (not in ours) say nothing.
        common = (ours.keys() & theirs.keys()) - {".".join(k) for k in PLACEMENT}
        if common and all(ours[k] == theirs[k] for k in common):
            found.append((started, folder.name))
    return max(found)[1] if found else None


def _flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} from {"a": {"b": value}}."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_owner(path: Path, folder: Path, names: list[str]) -> None:
    """ConfigError when the sweep folder ``folder`` holds the runs of another sweep file
    (its sweep.json says which): two sweeps with one name and out_dir would share it. The
    same sweep file moved (another clone, another mount) is still the owner: every run
    sweep.json records is one of its runs (``names``), whose names hash their settings."""
    recorded = read_sweep_json(folder)
    try:
        owner = recorded.get("sweep_file")
        theirs = {str(run["name"]) for run in recorded.get("runs", [])}
    except (AttributeError, KeyError, TypeError):
        return  # no sweep submitted there yet (or one from before sweep.json named its file)
    if owner and owner != str(path.resolve()) and not theirs <= set(names):
        raise ConfigError(
            f"{path}: its sweep folder {folder} holds the runs of another sweep, {owner}; give this one another "
            "name (name: in the sweep file) or another train.out_dir"
        )


def run_error(path: Path, index: int, own: list[str], e: ConfigError) -> ConfigError:
    """A run's bad config, naming the sweep file and the run."""
    return ConfigError(f"{path}: run {index} ({' '.join(own) or 'no overrides'}): {e}")


def mapping_at(value: Any, where: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
    return value


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}"


def _random_draws(spec: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """``samples`` seeded draws of ``params`` ([{}]: no random part)."""
    if not spec:
        return [{}]
    for key in spec:
        if key not in ("samples", "seed", "params"):
            raise ConfigError(f"{where}: random.{key}: unknown key (known here: params, samples, seed)")
    samples, params = spec.get("samples", 1), mapping_at(spec.get("params"), where, "random.params")
    if not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"{where}: random.samples: expected an integer >= 1, got {samples!r}")
    rng = random.Random(spec.get("seed", 0))
    draws = []
    for _ in range(samples):
        draw = {}
        for key, dist in params.items():
            draw[key] = _draw(rng, dist, f"{where}: random.params.{key}")
        draws.append(draw)
    return draws


def _draw(rng: random.Random, dist: Any, where: str) -> Any:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")
    kind, arg = next(iter(dist.items()))
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{where}: choice: expected a non-empty list, got {arg!r}")
        return rng.choice(arg)
    try:
        lo, hi = (float(a) for a in arg)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {kind}: expected [low, high], got {arg!r}") from None
    if not lo <= hi or (kind == "log_uniform" and lo <= 0):
        raise ConfigError(f"{where}: {kind}: needs {'0 < ' if kind == 'log_uniform' else ''}low <= high, got {arg!r}")
    if kind == "int_uniform":
        return rng.randint(int(lo), int(hi))
    value = rng.uniform(lo, hi) if kind == "uniform" else math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return float(f"{value:.4g}")  # 4 significant digits: readable overrides, and plenty for a sweep


def read_sweep_json(folder: Path) -> dict[str, Any] | None:
    """The sweep folder's sweep.json (None: none yet, or unreadable)."""
    return read_json(folder / SWEEP_JSON)


def job_ids(folder: Path) -> dict[str, str]:
    """Run name -> its newest job id, from the sweep folder's sweep.json ({} without one)."""
    summary = read_sweep_json(folder) or {}
    found = {}
    for run in summary.get("runs", []) if isinstance(summary.get("runs"), list) else []:
        if isinstance(run, dict) and run.get("job_ids"):
            found[str(run.get("name"))] = str(run["job_ids"][-1])
    return found
