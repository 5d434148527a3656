"""python -m launch.sweep configs/sweeps/celeba-lr.yaml --nodes 1 --gpus-per-node 8 [--dry-run]

A hyper-parameter sweep as one Slurm job array: every run is one array task (a
multi-task job of its own: nodes x tasks) with its own run folder (``--dry-run``
lists them), and all runs share one W&B group (``wandb.group``: the sweep's name).

A sweep file::

    base: configs/celeba.yaml          # the config every run starts from (path from the working directory)
    name: celeba-lr                    # default: the sweep file's name; runs go to <out_dir>/<name>/
    set: {train.steps: 20000}          # overrides shared by every run
    grid:                              # every combination of these values ...
      optim.g.lr: [1.0e-4, 2.0e-4]
      optim.d.lr: [1.0e-4, 2.0e-4]
    random:                            # ... times `samples` draws of these (seeded: the same table every time)
      samples: 3
      seed: 0
      params:
        optim.g.betas: {choice: [[0.5, 0.999], [0.0, 0.99]]}
        optim.d.lr: {log_uniform: [1.0e-5, 1.0e-3]}     # also: uniform, int_uniform
    slurm: {nodes: 1, gpus_per_node: 8, time: "4:00:00", array_parallelism: 4}   # launch/options.py

A run is named ``r<index>-<hash of its settings>`` (what its base config and overrides
set), so a run maps to the same folder when the sweep is submitted again, also after a
code update: runs that already reached ``train.steps`` are skipped, the others resume
from their checkpoints. A run folder named by an earlier version of launch.sweep is taken
up when its config.yaml holds the run's settings. Every run's config is checked before
anything is submitted. ``sweep.json`` in the sweep folder maps runs to job ids and names
the sweep file that owns the folder.

``python -m launch.sweep status SWEEP.yaml`` prints where every run stands (state, step,
best FID, last losses, img/s), best FID first (``launch/status.py``); it writes files only
when asked: ``--csv PATH`` (the table as CSV), ``--plot PATH`` (FID against step, PNG).

Exit codes (dcgan/base/exits.py): 0 submitted (or printed); 2 a bad sweep file, config or
option, caught before anything was submitted; 1 sbatch refused the job array or could not
be run (one line with sbatch's error; nothing submitted, sweep.json and the job folder as
they were).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dcgan.base.checks import ConfigError
from dcgan.base.exits import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from dcgan.base.fileio import write_atomic
from dcgan.checkpoint import files as checkpoint
from dcgan.config.loading import load_config, read_utf8, read_yaml
from dcgan.config.sections import Config
from dcgan.preflight import plan_run
from launch.job import TrainingJob
from launch.options import SlurmOptions, SubmitError, add_arguments, from_arguments, make_executor, submission

DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int_uniform")
SWEEP_KEYS = ("base", "name", "set", "grid", "random", "slurm")


@dataclass
class SweepRun:
    """One run of a sweep: its place in the sweep, its overrides and config, and its job."""

    index: int
    overrides: list[str]  # the sweep's own: set + grid point + random draw, then name/out_dir/group
    cfg: Config
    finished: bool = False
    job_id: str = ""

    @property
    def name(self) -> str:
        return self.cfg.train.name


@dataclass
class Sweep:
    path: Path
    base: str
    name: str
    runs: list[SweepRun] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.runs[0].cfg.run_dir.parent


def load_sweep(path: Path, world_size: int | None = None) -> Sweep:
    """Read a sweep file, expand it into runs and check every run's config (ConfigError
    names the file and the key at fault). ``world_size``: check the data against it."""
    return expand(path, read_sweep_file(path), world_size)


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


def expand(path: Path, spec: dict[str, Any], world_size: int | None = None) -> Sweep:
    """The runs of a read sweep file, each with its config built and checked."""
    sweep = Sweep(path, str(spec["base"]), sweep_name(path, spec))
    for index, own, placed in placed_runs(path, spec):
        try:
            cfg = plan_run(sweep.base, placed, world_size or 1, on_this_machine=False).cfg
        except ConfigError as e:
            raise run_error(path, index, own, e) from None
        sweep.runs.append(SweepRun(index, placed, cfg, finished=is_finished(cfg)))
    return sweep


def sweep_name(path: Path, spec: dict[str, Any]) -> str:
    return str(spec.get("name") or path.stem)


def placed_runs(path: Path, spec: dict[str, Any]) -> list[tuple[int, list[str], list[str]]]:
    """Every run of a read sweep file as (index, its own overrides, the overrides it runs
    with: its own + train.name, train.out_dir and wandb.group). Submission and
    ``launch.sweep status`` both name runs here, so they find the same folders."""
    where, name = str(path), sweep_name(path, spec)
    fixed = _mapping(spec.get("set"), where, "set")
    grid = _mapping(spec.get("grid"), where, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{key}: expected a non-empty list of values, got {values!r}")
    draws = _random_draws(_mapping(spec.get("random"), where, "random"), where)
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
            theirs = _flat(yaml.safe_load((folder / "config.yaml").read_text()))
            started = (folder / "config.yaml").stat().st_mtime
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
    try:
        recorded = json.loads((folder / "sweep.json").read_text())
        owner = recorded.get("sweep_file")
        theirs = {str(run["name"]) for run in recorded.get("runs", [])}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return  # no sweep submitted there yet (or one from before sweep.json named its file)
    if owner and owner != str(path.resolve()) and not theirs <= set(names):
        raise ConfigError(
            f"{path}: its sweep folder {folder} holds the runs of another sweep, {owner}; give this one another "
            "name (name: in the sweep file) or another train.out_dir"
        )


def run_error(path: Path, index: int, own: list[str], e: ConfigError) -> ConfigError:
    """A run's bad config, naming the sweep file and the run."""
    return ConfigError(f"{path}: run {index} ({' '.join(own) or 'no overrides'}): {e}")


def is_finished(cfg: Config) -> bool:
    """The run folder holds a valid checkpoint at train.steps (or later)."""
    newest, _ = checkpoint.latest_valid(cfg.run_dir / "checkpoints")
    return newest is not None and checkpoint.step_of(newest) >= cfg.train.steps


def _mapping(value: Any, where: str, key: str) -> dict[str, Any]:
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
    samples, params = spec.get("samples", 1), _mapping(spec.get("params"), where, "random.params")
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


def table(sweep: Sweep) -> str:
    """One line per run: what --dry-run prints."""
    lines = [f"sweep {sweep.name}: {len(sweep.runs)} run(s) from {sweep.base}, folder {sweep.folder}"]
    for run in sweep.runs:
        state = "finished, skipped" if run.finished else (f"job {run.job_id}" if run.job_id else "to submit")
        own = [o for o in run.overrides if not o.startswith(("train.name=", "train.out_dir=", "wandb.group="))]
        lines.append(f"  {run.name:<14} {state:<18} {' '.join(own) or '(base config)'}")
    return "\n".join(lines)


def write_summary(sweep: Sweep) -> Path:
    """sweep.json: every run's name, folder, overrides and job id (kept from earlier
    submissions for runs skipped this time)."""
    path = sweep.folder / "sweep.json"
    earlier = {}
    if path.exists():
        earlier = {r["name"]: r for r in json.loads(path.read_text()).get("runs", [])}
    runs = []
    for run in sweep.runs:
        jobs = list(earlier.get(run.name, {}).get("job_ids", []))
        if run.job_id:
            jobs.append(run.job_id)
        runs.append({
            "name": run.name, "run_dir": str(run.cfg.run_dir), "overrides": run.overrides,
            "job_ids": jobs, "finished_before_submit": run.finished,
        })  # fmt: skip
    summary = {
        "sweep": sweep.name,
        "base": sweep.base,
        "file": str(sweep.path),
        "sweep_file": str(sweep.path.resolve()),  # the folder's owner (check_owner)
        "submitted_at": time.time(),
        "runs": runs,
    }
    sweep.folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(json.dumps(summary, indent=1).encode()))
    return path


def submit_sweep(sweep: Sweep, opts: SlurmOptions) -> list:
    """Submit the runs not yet finished as one job array; returns their jobs. Raises
    SubmitError when sbatch does not take it (its files are removed)."""
    todo = [run for run in sweep.runs if not run.finished]
    if not todo:
        return []
    folder = Path(opts.folder) if opts.folder else sweep.folder / "slurm"
    with submission(folder, "the job array"):
        executor = make_executor(opts, folder, name=sweep.name)
        with executor.batch():  # one sbatch --array=0-N%parallelism, when the block ends
            jobs = [
                executor.submit(TrainingJob(sweep.base, run.overrides, os.getcwd(), opts.max_requeues)) for run in todo
            ]
    for run, job in zip(todo, jobs):
        run.job_id = job.job_id
    return jobs


def build_parser() -> argparse.ArgumentParser:
    """The command line; its epilog is this module's doc from the sweep file's format on."""
    from launch.status import build_parser as status_parser  # here: launch.status imports this module

    status_usage = status_parser().format_usage().removeprefix("usage: ").strip()
    parser = argparse.ArgumentParser(
        prog="python -m launch.sweep",
        usage=f"python -m launch.sweep [-h] [--dry-run] [Slurm flags] sweep\n       {status_usage}",
        description=__doc__.split("\n\n")[1].replace("``", "`"),
        epilog="\n\n".join(__doc__.split("\n\n")[2:]).replace("``", "`").replace("::", ":"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep", type=Path, help="sweep file, e.g. configs/sweeps/celeba-lr.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the table of runs; submit nothing")
    add_arguments(
        parser, "A flag overrides the sweep file's slurm: section; a setting neither gives takes its default."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        spec = read_sweep_file(args.sweep)
        # The slurm: section first: its world size is needed to check each run's data split.
        opts = from_arguments(args, base=_mapping(spec.get("slurm"), str(args.sweep), "slurm"), where=str(args.sweep))
        sweep = expand(args.sweep, spec, opts.world_size)
        check_owner(args.sweep, sweep.folder, [run.name for run in sweep.runs])
    except ConfigError as e:
        print(f"launch.sweep: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dry_run:
        print(table(sweep))
        return EXIT_OK
    try:
        jobs = submit_sweep(sweep, opts)
    except SubmitError as e:  # nothing submitted: sweep.json stays as it was
        print(f"launch.sweep: {e}", file=sys.stderr)
        return EXIT_FAILED
    summary = write_summary(sweep)
    print(table(sweep))
    if jobs:
        print(f"submitted {len(jobs)} run(s) as job array {jobs[0].job_id.split('_')[0]}; summary {summary}")
    else:
        print(f"every run has finished; nothing submitted; summary {summary}")
    return EXIT_OK


def cli(argv: list[str] | None = None) -> int:
    """``status SWEEP.yaml`` (launch/status.py), else submission (``main``)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        try:
            if argv[:1] == ["status"]:
                from launch.status import main as status_main  # matplotlib only when asked

                code = status_main(argv[1:])
            else:
                code = main(argv)
        except SystemExit:  # --help or a usage error: argparse's text waits in the same buffer
            sys.stdout.flush()
            raise
        # A short table is still in stdout's buffer (a pipe is block-buffered): flushed here, a
        # reader that has gone is caught below, not in Python's own flush at exit, which
        # prints "Exception ignored ... BrokenPipeError" and exits 120.
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `... | head`: the reader has gone; end as quietly as Unix tools do
        # Python would report the pipe again when it flushes stdout at exit (docs.python.org, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED  # its output could not all be written


if __name__ == "__main__":
    sys.exit(cli())
