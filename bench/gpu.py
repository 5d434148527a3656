"""Every GPU check and figure in one run; ``bash bench/gpu.sh`` calls it (see there).

The orchestrator (no arguments but --out, --cpu-smoke, --only) runs each stage in a child
process with its own time limit, prints it as PASS or FAIL with its time, and ends with a
summary. Stages:

  env         GPU, driver, torch, CUDA, cuDNN, NCCL, TF32 settings, free memory, CPUs, /dev/shm
  packages    webdataset, wandb, submitit importable (bench/gpu.sh installs them from .whl/)
  e2e         dcgan.train on CUDA: celeba on photo patches with the cache in bf16 (200 steps,
              then resumed to 250), pumpkins with its augmentation, torchrun with one process,
              and a process group of one (DDP, NCCL, SyncBN; then its CUDA graph)
  tests       tests/e2e/test_cuda.py (pytest -m cuda)
  throughput  the table: configs/celeba.yaml at batch 128 and 512, the plain seed loop, the
              trainer's step eager in fp32 and bf16, compiled, as a CUDA graph, as a graph
              fed by the cache, and with a process group of one; the demo config; the NCCL
              all-reduce of the nets' gradients

Two files go to --out: gpu.log (every stage's output, the trainers' logs included) and
report.json (every figure). The run folders, data and each stage's own JSON (merged into
the report) stay in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

REPO = Path(__file__).resolve().parents[1]
STAGES = ("env", "packages", "e2e", "tests", "throughput")
# Seconds per stage on one GPU: at most 8 minutes together (typically about 5).
LIMIT_S = {"env": 15, "packages": 25, "e2e": 70, "tests": 170, "throughput": 190}
SMOKE_LIMIT_S = {"env": 30, "packages": 30, "e2e": 120, "tests": 60, "throughput": 90}
PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16, the datasheet's figure: MFU is against it


# --------------------------------------------------------------------------- the orchestrator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU checks and figures (bench/gpu.sh)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "gpu-out"))
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dcgan-gpu"), help="run folders, data")
    parser.add_argument("--cpu-smoke", action="store_true", help="every stage at tiny sizes on the CPU")
    parser.add_argument("--only", default=",".join(STAGES), help=f"stages to run, of {','.join(STAGES)}")
    parser.add_argument("--tests", default="", metavar="EXPR", help="the tests stage runs only these (pytest -k)")
    parser.add_argument("--rows", default="", metavar="WORDS", help="the throughput stage measures only the rows "
                        "whose name holds one of these comma-separated words")  # fmt: skip
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # a child: run this one stage
    parser.add_argument("--result", help=argparse.SUPPRESS)  # where the child writes its figures
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage:
        figures = STAGE_FUNCTIONS[args.stage](work, args)
        Path(args.result).write_text(json.dumps(figures, indent=1))
        return 0 if figures.get("ok", True) else 1

    chosen = [s for s in args.only.split(",") if s]
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    limits = SMOKE_LIMIT_S if args.cpu_smoke else LIMIT_S
    report = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "stages": {}}  # fmt: skip
    with open(out / "gpu.log", "a") as log:
        for name in STAGES:
            if name not in chosen:
                continue
            result = run_stage(name, work, args, limits[name], log)
            report["stages"][name] = result
            print(f"{result['status']}  {name:<10} {result['seconds']:6.1f}s  {result.get('line', '')}", flush=True)
            (out / "report.json").write_text(json.dumps(report, indent=1))
    print(summary(report), flush=True)
    return 0 if all(r["status"] == "PASS" for r in report["stages"].values()) else 1


def run_stage(name: str, work: Path, args: argparse.Namespace, limit_s: float, log) -> dict:
    """The stage ``name`` in a child process, at most ``limit_s`` seconds: PASS or FAIL, time, figures."""
    smoke = args.cpu_smoke
    result_file = work / f"{name}.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "bench.gpu", "--stage", name, "--result", str(result_file),
               "--work", str(work), "--tests", args.tests, "--rows", args.rows] + (["--cpu-smoke"] if smoke else [])  # fmt: skip
    t0 = time.perf_counter()
    log.write(f"\n===== stage {name} (limit {limit_s:.0f}s) =====\n")
    log.flush()
    # Its own process group: at the time limit the stage goes with everything it started
    # (pytest, trainers), and none is left on the GPU.
    child = subprocess.Popen(
        command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=child_env(smoke), start_new_session=True
    )
    try:
        code = child.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        code = "timeout"
    seconds = time.perf_counter() - t0
    figures = json.loads(result_file.read_text()) if result_file.exists() else {}
    status = "PASS" if code == 0 else "FAIL"
    line = figures.get("line", "") if code == 0 else f"exit {code}: {figures.get('line') or 'see gpu.log'}"
    return {"status": status, "seconds": round(seconds, 1), "line": line, **figures}


def child_env(smoke: bool) -> dict:
    """The children's environment: the repository importable, output unbuffered, W&B off;
    in the smoke test one thread per process (several trainers share a small CPU)."""
    path = os.environ.get("PYTHONPATH", "")
    threads = {"OMP_NUM_THREADS": "1"} if smoke else {}
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{REPO}{os.pathsep + path if path else ''}",
            "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), **threads}  # fmt: skip


def summary(report: dict) -> str:
    """At most 60 lines: each stage, then the table and the targets."""
    lines = [f"== bench/gpu.sh summary ({report['mode']}, {report['started']})"]
    env = report["stages"].get("env", {})
    if env.get("line"):
        lines.append(f"environment: {env['line']}")
    for name, r in report["stages"].items():
        lines.append(f"{r['status']}  {name:<10} {r['seconds']:6.1f}s  {r.get('line', '')}"[:200])
        lines += [f"    {line}"[:200] for line in r.get("details", [])[:8]]
    table = report["stages"].get("throughput", {}).get("table")
    if table:
        lines += table[:30]
    return "\n".join(lines[:60])


# --------------------------------------------------------------------------- stages (children)


def stage_env(work: Path, args: argparse.Namespace) -> dict:
    """The machine and the versions every figure depends on, in one line."""
    smoke = args.cpu_smoke
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cpus": len(os.sched_getaffinity(0)), "dev_shm_free_gb": round(shutil.disk_usage("/dev/shm").free / 1e9, 1)}  # fmt: skip
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        facts.update(
            gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability())), driver=nvidia_driver(),
            cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())),
            tf32_conv=torch.backends.cudnn.allow_tf32, tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            memory_free_gb=round(free / 1e9, 1), memory_total_gb=round(total / 1e9, 1),
        )  # fmt: skip
        line = (f"{facts['gpu']} (sm {facts['capability']}, {facts['memory_free_gb']}/{facts['memory_total_gb']} GB "
                f"free), driver {facts['driver']}, torch {facts['torch']}, CUDA {facts['cuda']}, cuDNN {facts['cudnn']}, "
                f"NCCL {facts['nccl']}, TF32 conv {facts['tf32_conv']} matmul {facts['tf32_matmul']}, "
                f"{facts['cpus']} CPUs, /dev/shm {facts['dev_shm_free_gb']} GB free, Python {facts['python']}")  # fmt: skip
    else:
        line = f"no GPU; torch {facts['torch']}, {facts['cpus']} CPUs, Python {facts['python']}"
    print(line)
    return {"line": line, "facts": facts, "ok": smoke or torch.cuda.is_available()}


def nvidia_driver() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def stage_packages(work: Path, args: argparse.Namespace) -> dict:
    """Whether what dcgan imports is there (gpu.sh installed .whl/ first)."""
    smoke = args.cpu_smoke
    found, missing = {}, []
    needed = ["webdataset", "wandb", "submitit", "yaml", "torchvision", "torchmetrics", "pytest"]
    for name in needed + ([] if smoke else ["skimage"]):  # skimage: the photo patches (the smoke test uses digits)
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
        except ImportError as e:
            missing.append(f"{name} ({e})")
    line = ", ".join(f"{k} {v}" for k, v in found.items()) + (f"; MISSING: {', '.join(missing)}" if missing else "")
    print(line)
    return {"line": line, "ok": not missing}


def stage_e2e(work: Path, args: argparse.Namespace) -> dict:
    """Real trainer runs on photo patches; several at once (the GPU has room, the timing is not the point)."""
    from bench.gpu_table import bench_shards  # imported here, after the packages stage

    smoke = args.cpu_smoke
    runs_dir = work / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    shards = bench_shards(smoke)
    size = (["model.ngf=8", "model.ndf=8", "train.batch_size=8", "train.device=cpu", "data.workers=0"] if smoke
            else ["train.device=cuda"])  # fmt: skip
    steps = (lambda n: max(2, n // 50)) if smoke else (lambda n: n)
    common = [f"data.shards={shards}", f"train.out_dir={runs_dir}", "log.every=10" if smoke else "log.every=50",
              "log.samples_every=1000", "wandb.mode=disabled", *size]  # fmt: skip
    train = [sys.executable, "-m", "dcgan.train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                "dcgan.train"]  # fmt: skip
    celeba = ["--config", "configs/celeba.yaml", *common, "train.precision=bf16", "data.cache=on", "train.name=celeba",
              f"checkpoint.every={steps(100)}"]  # fmt: skip
    jobs = {
        "celeba bf16 cache": [*train, *celeba, f"train.steps={steps(200)}"],
        "pumpkins augmented": [*train, "--config", "configs/pumpkins.yaml", *common, "train.name=pumpkins",
                               "data.cache=on", f"train.steps={steps(60)}"],
        "torchrun 1 process": [*torchrun, "--config", "configs/celeba.yaml", *common, "train.name=torchrun",
                               "train.precision=bf16", f"train.steps={steps(50)}"],
        "process group of 1, eager DDP": [*train, "--config", "configs/celeba.yaml", *common, "train.name=ddp1",
                                          "train.precision=bf16", "train.distributed=always", "train.cuda_graph=off",
                                          f"train.steps={steps(50)}"],
        "process group of 1, graph": [*train, "--config", "configs/celeba.yaml", *common, "train.name=pg1graph",
                                      "train.precision=bf16", "train.distributed=always", f"train.steps={steps(50)}"],
    }  # fmt: skip
    results = run_all(jobs, work)
    # The celeba run resumed to 250 steps: it must carry on from step 200.
    resume = run_all({"celeba resumed to 250": [*train, *celeba, f"train.steps={steps(250)}"]}, work)
    results.update(resume)
    resumed = results["celeba resumed to 250"]
    if resumed["ok"] and f"at step {steps(200)} " not in Path(resumed["log"]).read_text():
        resumed.update(ok=False, line="did not resume from its step-200 checkpoint")
    details = [f"{'PASS' if r['ok'] else 'FAIL'} {name}: {r['line']}" for name, r in results.items()]
    for line in details:
        print(line)
    ok = all(r["ok"] for r in results.values())
    return {"ok": ok, "line": f"{sum(r['ok'] for r in results.values())}/{len(results)} runs passed", "details": details,
            "runs": results}  # fmt: skip


def run_all(jobs: dict[str, list[str]], work: Path) -> dict:
    """Start every command at once, wait for all; each one's log in work/e2e-<name>.log, its
    last lines printed (into gpu.log)."""
    started = {}
    for name, command in jobs.items():
        log_path = work / ("e2e-" + "".join(c if c.isalnum() else "-" for c in name) + ".log")
        log_file = open(log_path, "w")
        started[name] = (
            subprocess.Popen(command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT),
            log_path,
            log_file,
        )
    results = {}
    for name, (process, log_path, log_file) in started.items():
        code = process.wait()
        log_file.close()
        text = log_path.read_text()
        print(f"----- {name} (exit {code}), the last lines of {log_path}:")
        print("\n".join(text.splitlines()[-25:]), flush=True)
        done = [line for line in text.splitlines() if "] INFO done:" in line or "] ERROR" in line]
        last = done[-1].split("] ", 1)[-1] if done else text.strip().splitlines()[-1] if text.strip() else "no output"
        results[name] = {"ok": code == 0, "exit": code, "line": last[:160], "log": str(log_path)}
    return results


def stage_tests(work: Path, args: argparse.Namespace) -> dict:
    """tests/e2e/test_cuda.py; its output streams into gpu.log (a stage cut at its limit still
    shows how far it got), its verdicts come from a JUnit file."""
    report = work / "cuda-tests.xml"
    report.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "tests/e2e/test_cuda.py", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider",
               f"--junitxml={report}", "-o", "junit_logging=system-out"] + (["-k", args.tests] if args.tests else [])  # fmt: skip
    code = subprocess.run(command, cwd=REPO).returncode
    cases = ElementTree.parse(report).getroot().iter("testcase") if report.exists() else []
    counts, details = {"passed": 0, "failed": 0, "skipped": 0}, []
    for case in cases:
        verdict = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        counts["skipped" if verdict == "skipped" else "failed" if verdict in ("failure", "error") else "passed"] += 1
        if verdict in ("failure", "error"):
            details.append(f"FAILED {case.get('name')}")
        out = case.findtext("system-out") or ""
        details += [line.strip() for line in out.splitlines() if " vs " in line]  # the tests' measured differences
    ok = code == 0 or (args.cpu_smoke and code == 5)  # 5: every test skipped (no GPU)
    line = ", ".join(f"{n} {verdict}" for verdict, n in counts.items() if n) or f"pytest exit {code}"
    return {"ok": ok, "line": line, "details": details}


def stage_throughput(work: Path, args: argparse.Namespace) -> dict:
    """The table (bench/gpu_table.py), within the stage's time limit."""
    from bench import gpu_table

    smoke = args.cpu_smoke
    rows = [word for word in args.rows.split(",") if word]
    return gpu_table.measure_all(smoke, rows, PEAK_BF16_TFLOPS, deadline_s=SMOKE_LIMIT_S["throughput"] - 15 if smoke
                                 else LIMIT_S["throughput"] - 20)  # fmt: skip


STAGE_FUNCTIONS = {
    "env": stage_env, "packages": stage_packages, "e2e": stage_e2e, "tests": stage_tests, "throughput": stage_throughput,
}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
