"""Sample quality of the trainer against a plain seed-style loop, same budget.

    python -m bench.quality                                  # configs/fashion-mnist.yaml, 4000 steps
    python -m bench.quality --steps 4000 --plain-steps 8000 --eval-every 1000
    python -m bench.quality --only project model.ema_decay=0 # an ablation (a.b=value for both runs)
    python -m bench.quality --only project --nproc 2 train.batch_size=64 train.sync_bn=false  # DDP, no SyncBN
    python -m bench.quality --small-data 1000 --jobs 2          # d_augment on 1,000 images (bench/README.md)
    python -m bench.quality --small-data 0 --variants off,translation,ada,translation@ada   # on the 70k set
    python -m bench.quality --losses --jobs 2                  # each loss.kind, with and without spectral norm

(1) the project: ``python -m dcgan.train`` on the config (one process, its batch size;
with --nproc N, torchrun with N processes of that batch each),
evaluating every --eval-every steps on the EMA generator in eval mode (eval.every);
(2) the baseline: bench/plain_loop.py (fp32, Sigmoid + BCELoss, no EMA, G sampled in
train mode, the seeds' Adam: lr 2e-4, betas (0.5, 0.999)) on the same architecture and
data stream, run for
--plain-steps and evaluated at the same steps. Both are scored by the same Evaluator:
the classifier features of <shards>/features.pt (trained here first if missing),
--num-samples generated images against its 10000 real ones, the same latents each time.
Prints a table of FID / KID / precision / recall per step and the ratios at --steps.

--small-data N is the d_augment study instead: the project alone, once per --variants
(off; DiffAugment at p=1 with each subset of color, translation, cutout; ADA with all
three and with translation), at the same steps and seed, --jobs at a time. With N > 0 the data is a fixed
subset of N Fashion-MNIST training images (Debian's IDX files; the first N of a seed-0
permutation), scored against the 10k test images with a classifier trained on those
(dcgan.eval train-features --epochs 4); with N = 0, the config's own shards and features.

--losses is the losses study: the project alone on the config's shards, once per
--variants (bce, hinge, lsgan, wgan, and bce and hinge with spectral norm on D; KIND+r1
adds lazy R1, KIND+cond makes G and D class-conditional), the same way; each run's img/s
is its cost.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from bench.plain_loop import PlainLoop, batches
from dcgan.config.loading import load_config
from dcgan.data.shardset import resolve_shards
from dcgan.data.stream import Loader, ShardStream
from dcgan.data.writing import read_idx
from dcgan.models.d_augment import POLICIES
from dcgan.models.losses import KINDS
from dcgan.quality.evaluator import DEFAULT_FEATURES_NAME, Evaluator, choose_extractor
from dcgan.run.distributed import DistInfo

SCORES = ("fid", "kid", "precision", "recall")


class StudyRuns:
    """The study's training processes, run --jobs at a time: the first failure stops them
    all (SIGTERM: each saves and exits within seconds) and starts no more."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.stopping = False

    def start(self, cmd: list[str], **popen) -> subprocess.Popen:
        with self.lock:
            if self.stopping:
                raise RuntimeError("not started: another run failed")
            self.procs.append(subprocess.Popen(cmd, **popen))
            return self.procs[-1]

    def stop_all(self) -> None:
        with self.lock:
            self.stopping = True
            for proc in self.procs:
                proc.terminate()


def run_project(
    args, overrides: list[str], out_dir: Path, name: str = "project", log: Path | None = None, runs=None
) -> tuple[dict[int, dict], float]:
    """One ``dcgan.train`` run: its evaluations by step (with aug_p where logged) and its seconds.
    With ``log`` and ``runs`` (a StudyRuns), its output goes to ``log`` and it runs on one
    thread, started by ``runs`` (for --jobs in parallel)."""
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"] if args.nproc > 1 else []
    )
    cmd = [
        sys.executable, *launcher, "-m", "dcgan.train", "--config", args.config, "log.every=500", *overrides,
        f"train.out_dir={out_dir}", f"train.name={name}", f"train.steps={args.steps}",
        f"eval.every={args.eval_every}", f"eval.num_samples={args.num_samples}",
        "train.resume=never", "train.overwrite=true", "wandb.mode=disabled",
    ]  # fmt: skip
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    if log is None:
        subprocess.run(cmd, check=True)
    else:
        with log.open("w") as f:
            proc = runs.start(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.wait():
                raise RuntimeError(f"{name} failed (exit {proc.returncode}): see {log}")
    seconds = time.perf_counter() - t0
    scores, aug_p = {}, None
    for line in (out_dir / name / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        aug_p = record.get("aug_p", aug_p)
        if "fid" in record:
            scores[record["step"]] = {k: record[k] for k in SCORES} | {"aug_p": aug_p}
    return scores, seconds


# The seeds' (and the DCGAN paper's) Adam settings, whatever the config has been tuned to.
PLAIN_OPTIM = [
    "optim.g.lr=2e-4", "optim.d.lr=2e-4", "optim.g.betas=[0.5,0.999]", "optim.d.betas=[0.5,0.999]",
    "optim.label_smoothing=0",
]  # fmt: skip


def run_plain(args, overrides: list[str], device: torch.device) -> tuple[dict[int, dict], float]:
    cfg = load_config(args.config, [*overrides, *PLAIN_OPTIM])
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    plain = PlainLoop(cfg, device)
    evaluator = Evaluator.build(
        choose_extractor(cfg.eval, cfg.data.shards, cfg.model), cfg.eval, cfg.data, cfg.model, dist
    )
    stream = ShardStream(
        resolve_shards(cfg.data), cfg.data, rank=0, world_size=1, batch_size=cfg.train.batch_size,
        image_size=cfg.model.image_size, channels=cfg.model.channels, seed=cfg.train.seed,
    )  # fmt: skip
    data = batches(Loader(stream, device))
    scores, t0, t_eval = {}, time.perf_counter(), 0.0
    for step in range(1, args.plain_steps + 1):
        plain.step(next(data))
        if step % args.eval_every == 0 or step == args.plain_steps:
            t1 = time.perf_counter()
            with torch.no_grad():
                s = evaluator.evaluate(plain.sample, cfg.model.nz)
            t_eval += time.perf_counter() - t1
            scores[step] = {k: s[k] for k in SCORES}
            print(f"plain step {step}: " + " | ".join(f"{k} {s[k]:.4f}" for k in SCORES), flush=True)
    return scores, time.perf_counter() - t0 - t_eval


def table(plain: dict[int, dict], project: dict[int, dict]) -> str:
    def cells(row):
        return [f"{row[k]:.3f}" if k != "kid" else f"{row[k]:.4f}" for k in SCORES] if row else ["", "", "", ""]

    head = "| step | plain FID | plain KID | plain precision | plain recall | FID | KID | precision | recall |"
    lines = [head, "|" + "---:|" * 9]
    for step in sorted(set(plain) | set(project)):
        lines.append("| " + " | ".join([str(step), *cells(plain.get(step)), *cells(project.get(step))]) + " |")
    return "\n".join(lines)


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def augment_variants(names: list[str] | None = None) -> dict[str, list[str]]:
    """The study's runs by name: off, DiffAugment at p=1 on each subset of the policies
    (color, translation, color+translation, ...), ADA on all three (ada) and on translation
    alone (the best at p=1 on 1,000 grey images); with ``names``, those, where SUBSET@ada
    is ADA on that subset. Raises KeyError on a bad name."""
    subsets = ["+".join(c) for n in range(1, len(POLICIES) + 1) for c in itertools.combinations(POLICIES, n)]
    names = names or ["off", *subsets, "ada", "translation@ada"]
    variants: dict[str, list[str]] = {}
    for name in names:
        subset, _, ada = ("+".join(POLICIES) + "@ada" if name == "ada" else name).partition("@")
        if name == "off":
            variants[name] = []
        elif subset in subsets and ada in ("", "ada"):
            variants[name] = [f"d_augment.policy={subset.replace('+', ',')}", f"d_augment.p={ada or 1}"]
        else:
            raise KeyError(f"unknown variant {name!r}: off, ada, a subset ({', '.join(subsets)}), or SUBSET@ada")
    return variants


def run_shown(cmd: list[str]) -> None:
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def shard(source: Path, out: Path) -> None:
    if not (out / "manifest.json").exists():
        run_shown([sys.executable, "-m", "dcgan.shards", str(source), str(out), "--overwrite", "--workers", "2"])


def classifier_features(shards: str, features: Path, epochs: int | None = None) -> Path:
    """``features``, the classifier features of ``shards``, trained first if missing."""
    if not features.exists():
        cmd = [sys.executable, "-m", "dcgan.eval", "train-features", "--shards", shards, "--out", str(features)]
        run_shown(cmd + (["--epochs", str(epochs)] if epochs else []))
    return features


def small_data(n: int, root: Path) -> list[str]:
    """Shards of a fixed ``n``-image subset of Fashion-MNIST's training set and of its 10k
    test images (with their classifier features): the overrides that train on the one and
    score against the other."""
    root.mkdir(parents=True, exist_ok=True)
    subset = root / f"train-{n}.npz"
    if not subset.exists():
        images = read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")
        keep = np.random.default_rng(0).permutation(len(images))[:n]
        np.savez(subset, x=images[keep], y=labels[keep])
    shard(subset, root / f"train-{n}")
    shard(FASHION_MNIST / "t10k-images-idx3-ubyte.gz", root / "test")
    features = classifier_features(str(root / "test"), root / "test" / DEFAULT_FEATURES_NAME, epochs=4)
    return [f"data.shards={root / f'train-{n}'}", f"eval.features={features}"]


def loss_variants(names: list[str] | None = None) -> dict[str, list[str]]:
    """The losses study's runs by name: KIND[+sn][+r1][+cond], KIND one of loss.kind's (+sn:
    spectral norm on D; +r1: lazy R1 with gamma 0.1; +cond: class-conditional G and D). hinge and wgan have no target to smooth, so they
    run without the config's label smoothing. Raises KeyError on a bad name."""
    names = names or ["bce", "hinge", "lsgan", "wgan", "bce+sn", "hinge+sn"]
    variants: dict[str, list[str]] = {}
    for name in names:
        kind, *extras = name.split("+")
        if kind not in KINDS or not set(extras) <= {"sn", "r1", "cond"} or len(set(extras)) != len(extras):
            raise KeyError(f"unknown variant {name!r}: KIND[+sn][+r1][+cond], KIND one of {', '.join(KINDS)}")
        variants[name] = [f"loss.kind={kind}"]
        variants[name] += ["optim.label_smoothing=0"] if kind in ("hinge", "wgan") else []
        variants[name] += ["model.spectral_norm=true"] if "sn" in extras else []
        variants[name] += ["loss.r1_gamma=0.1"] if "r1" in extras else []
        variants[name] += ["model.conditional=true"] if "cond" in extras else []
    return variants


def chosen_variants(table, args) -> dict[str, list[str]] | None:
    """--variants looked up in ``table`` (augment_variants or loss_variants); None, said in
    one line, when a name is unknown."""
    try:
        return table(None if args.variants == "all" else args.variants.split(","))
    except KeyError as e:
        print(f"bench.quality: {e.args[0]}", file=sys.stderr)
        return None


def augment_study(args, overrides: list[str], out_dir: Path) -> int:
    variants = chosen_variants(augment_variants, args)
    if variants is None:
        return 2
    data = small_data(args.small_data, out_dir / "data") if args.small_data else []
    what = f"{args.small_data} Fashion-MNIST training images" if args.small_data else "the config's shards"
    return study(args, variants, data + overrides, what, out_dir, {"small_data": args.small_data})


def losses_study(args, overrides: list[str], out_dir: Path) -> int:
    variants = chosen_variants(loss_variants, args)
    if variants is None:
        return 2
    cfg = load_config(args.config, overrides)
    features = Path(cfg.eval.features or Path(cfg.data.shards) / DEFAULT_FEATURES_NAME)
    common = [f"eval.features={classifier_features(cfg.data.shards, features)}"] if not cfg.eval.inception else []
    return study(args, variants, common + overrides, "the config's shards", out_dir, {"losses": True})


def study(args, variants: dict[str, list[str]], common: list[str], what: str, out_dir: Path, facts: dict) -> int:
    """Each variant trained by ``dcgan.train`` at the same steps and seed, --jobs at a time,
    then one table: the scores at --steps, relative to the first variant, and the training
    rate of each (img/s on one thread, from the metrics lines, evaluations left out)."""
    print(f"# {args.config} on {what}: {args.steps} steps, {args.jobs} runs at a time", flush=True)
    runs = StudyRuns()

    def one(name: str) -> tuple[str, dict[int, dict], float]:
        try:
            scores, seconds = run_project(
                args, [*common, *variants[name]], out_dir, name=name, log=out_dir / f"{name}.log", runs=runs
            )
        except BaseException:
            runs.stop_all()  # before this worker is free to start the next run
            raise
        print(f"{name}: " + ", ".join(f"step {s} FID {r['fid']:.3f}" for s, r in sorted(scores.items())), flush=True)
        return name, scores, seconds

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, name) for name in variants]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f.exception() for f in futures if f.done() and f.exception()), None)
        if failed is not None:
            for future in futures:
                future.cancel()
            raise failed
    results = {name: (scores, seconds) for name, scores, seconds in (f.result() for f in futures)}
    (out_dir / "study.json").write_text(
        json.dumps({"config": args.config, **facts, "overrides": common, "runs": results}) + "\n"
    )
    first = next(iter(results))
    base = results[first][0].get(args.steps, {}).get("fid")
    print(
        f"| variant (at step {args.steps}) | FID | KID | precision | recall | FID / {first} | aug_p | img/s | wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (scores, seconds) in results.items():
        r = scores[args.steps]
        vs = f"{r['fid'] / base:.2f}" if base else ""
        p = f"{r['aug_p']:.3f}" if r["aug_p"] is not None else ""
        print(
            f"| {name} | {r['fid']:.3f} | {r['kid']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} | {vs} | {p} "
            f"| {training_rate(out_dir / name):.0f} | {seconds:.0f} |"
        )
    return 0


def training_rate(run_dir: Path) -> float:
    """The median img/s of a run's metrics lines (each a log interval's training alone)."""
    rates = [r["img_per_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if "img_per_s" in r]
    return float(np.median(rates)) if rates else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/fashion-mnist.yaml")
    parser.add_argument("--steps", type=int, default=4000, help="the project's steps (the target's budget)")
    parser.add_argument("--plain-steps", type=int, default=0, help="the plain loop's steps (default 2 x --steps)")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=10000, help="generated images per evaluation")
    parser.add_argument("--out-dir", default="runs/bench-quality")
    parser.add_argument("--only", choices=("plain", "project"), help="run one side only")
    parser.add_argument("--nproc", type=int, default=1, help="the project's processes (torchrun; DDP, SyncBN)")
    parser.add_argument(
        "--small-data", type=int, metavar="N",
        help="the d_augment study on N Fashion-MNIST training images (0: the config's shards)",
    )  # fmt: skip
    parser.add_argument(
        "--losses", action="store_true", help="the losses study: each loss.kind, with and without spectral norm"
    )
    parser.add_argument(
        "--variants",
        default="all",
        help="the study's runs: all, or a comma list (--small-data: off, color+cutout, ada, translation@ada ...; "
        "--losses: bce, hinge+sn, wgan+r1 ...)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="the study's runs at a time (each on one thread)")
    parser.add_argument(
        "overrides", nargs="*", help="a.b=value overrides for both runs (the plain loop keeps the seeds' Adam)"
    )
    args = parser.parse_args(argv)
    args.plain_steps = args.plain_steps or 2 * args.steps
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.small_data is not None and args.losses:
        parser.error("--small-data and --losses are two studies: one at a time")
    if args.small_data is not None:
        return augment_study(args, args.overrides, out_dir)
    if args.losses:
        return losses_study(args, args.overrides, out_dir)

    cfg = load_config(args.config, args.overrides)
    features = Path(cfg.eval.features or Path(cfg.data.shards) / DEFAULT_FEATURES_NAME)
    common = [f"eval.features={classifier_features(cfg.data.shards, features)}"] if not cfg.eval.inception else []
    common += [f"eval.num_samples={args.num_samples}"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"# {args.config}: batch {cfg.train.batch_size}, one process on {device.type} "
        f"({torch.get_num_threads()} threads); {args.num_samples} samples per evaluation",
        flush=True,
    )
    results = {"config": args.config, "device": device.type, "overrides": args.overrides}
    project = plain = {}
    if args.only != "project":
        plain, plain_s = run_plain(args, [*common, *args.overrides], device)
        results.update(plain=plain, plain_train_seconds=plain_s)
    if args.only != "plain":
        project, project_s = run_project(args, [*common, *args.overrides], out_dir)
        results.update(project=project, project_seconds=project_s)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    print(table(plain, project))
    at = args.steps
    if at in plain and at in project:
        ratio = project[at]["fid"] / plain[at]["fid"]
        print(
            f"at step {at}: FID {project[at]['fid']:.3f} vs plain {plain[at]['fid']:.3f} "
            f"(ratio {ratio:.2f}, target <= 0.5); recall {project[at]['recall']:.3f} (target >= 0.6)"
        )
        caught_up = [s for s in sorted(plain) if plain[s]["fid"] <= project[at]["fid"]]
        print(
            f"plain loop reaches the project's step-{at} FID "
            + (f"at step {caught_up[0]}" if caught_up else f"not within {args.plain_steps} steps")
        )
    if "plain_train_seconds" in results and "project_seconds" in results:
        print(
            f"wall: plain {plain_s:.0f}s training for {args.plain_steps} steps; project {project_s:.0f}s (with evals)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
