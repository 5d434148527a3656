"""data.cache: the set decoded once and held on the device (dcgan/data/cache.py). The split's
contract under a real 2-rank torchrun, bitwise resume after SIGTERM, the images and
labels it holds, corrupt samples counted and skipped, and auto's choice both ways."""

import io
import json
import os
import re
import signal
import tarfile

import numpy as np
import pytest
import torch
from test_resume import assert_bitwise_equal, final_state, last_logged_step, resumed_at, wait_until, worker_pids
from torch.utils.data import DataLoader

from conftest import make_shards, run_module, run_python, start_python, write_config
from dcgan.base.checks import ConfigError
from dcgan.config.sections import DataConfig
from dcgan.data import cache
from dcgan.data.cache import (
    UNMEASURED,
    CacheChoice,
    CachedLoader,
    Room,
    agree_on_cache,
    choose_cache,
    decoding_workers,
    measure_room,
    usable_cpus,
)
from dcgan.data.shardset import resolve_shards
from dcgan.preflight import plan_run
from dcgan.run.distributed import DistInfo

ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def indexed_shards(tmp_path_factory, real_images):
    """200 real images whose label is their index, in shards of 64 (the last holds 8)."""
    images, _ = real_images
    return make_shards(tmp_path_factory.mktemp("indexed") / "s", images[:200], np.arange(200), "--per-shard", "64")


def cached(shards, **data) -> CachedLoader:
    cfg = DataConfig(shards=str(shards), **{"workers": 1, "cache": "on", **data})
    return CachedLoader(resolve_shards(cfg), cfg, ONE_PROCESS, batch_size=8, image_size=28, channels=1, seed=0)


@pytest.mark.e2e  # starts processes
def test_split_under_two_rank_torchrun(indexed_shards):
    result = run_python("tests/cache_checks.py", str(indexed_shards), nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cache checks passed" in result.stdout


def test_the_cache_holds_the_shards_images_and_labels(indexed_shards, real_images):
    loader = cached(indexed_shards)
    assert (loader.samples, loader.steps_per_epoch, loader.workers) == (200, 25, 0)
    batches = list(loader.epoch(0))
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == list(range(200))  # one process: the whole set, each sample once
    images = torch.cat([x for x, _ in batches])
    expected = torch.from_numpy(real_images[0][labels.numpy()]).unsqueeze(1).float() / 127.5 - 1
    assert images.dtype == torch.float32 and torch.equal(images, expected)


def test_corrupt_samples_are_counted_and_skipped(tmp_path, real_images):
    images, _ = real_images
    shards = make_shards(tmp_path / "s", images[:64], np.arange(64), "--per-shard", "32")
    tar = shards / "shard-000001.tar"  # garble the png of 3 samples, keep the tar valid
    with tarfile.open(tar) as f:
        members = [(m, f.extractfile(m).read()) for m in f.getmembers()]
    with tarfile.open(tar, "w") as f:
        for i, (member, data) in enumerate(members):
            data = b"not a png" if member.name.endswith(".png") and i < 6 else data
            member.size = len(data)
            f.addfile(member, io.BytesIO(data))
    loader = cached(shards)
    assert (loader.samples, loader.corrupt_samples, loader.unreadable_shards) == (61, 3, 0)
    assert len({label for _, y in loader.epoch(0) for label in y.tolist()}) == 56  # 7 batches of 8 out of 61


@pytest.mark.e2e  # starts processes
def test_auto_choice_both_ways(tmp_path, digit_shards):
    fits = DataConfig(shards="x", cache="auto", cache_max_gb=1.0)
    assert choose_cache(fits, (512,), 1, 28, 1, ROOMY_CPU).on
    small = DataConfig(shards="x", cache="auto", cache_max_gb=0.0001)
    choice = choose_cache(small, (512,), 1, 28, 1, ROOMY_CPU)
    assert not choice.on and "0.00 GB > data.cache_max_gb=0.0001" in choice.why
    # the choice a run makes, and says
    config = write_config(tmp_path / "c.yaml", digit_shards, data={"cache": "auto"})
    assert plan_run(str(config), [], 1).cache.on
    assert not plan_run(str(config), ["data.cache_max_gb=0.0001"], 1).cache.on
    result = run_module("dcgan.train", "--config", str(config), "train.steps=1", "data.cache_max_gb=0.0001")
    assert result.returncode == 0, result.stderr
    assert "data.cache=auto: off, the 512 decoded images take 0.00 GB > data.cache_max_gb=0.0001" in result.stderr


# --------------------------------------------------------------------------- the rule, on given machines

SET = (5000,) * 40  # 200000 images: 2.46 GB of uint8 at 64x64 RGB
ROOMY_CPU = Room(on_cpu=True, gpu_free_gb=None, ram_gb=64.0, shm_gb=32.0, cpus=8, processes=1)
ROOMY_GPU = Room(on_cpu=False, gpu_free_gb=80.0, ram_gb=512.0, shm_gb=256.0, cpus=16, processes=1)


def choose(room: Room, world_size: int = 1, **data) -> CacheChoice:
    return choose_cache(DataConfig(shards="x", **data), SET, 3, 64, world_size, room)


def test_auto_on_a_gpu_caches_in_half_its_free_memory():
    assert choose(ROOMY_GPU).why == (
        "data.cache=auto: on, the 200000 decoded images take 2.46 GB, 2.46 GB on the GPU <= 0.5 of the GPU's "
        "80.00 GB free"
    )
    half = choose(ROOMY_GPU._replace(gpu_free_gb=4.5))  # 2.46 > 2.25, though it would fit 4.5 - 2 GB
    assert not half.on and "2.46 GB on the GPU > 0.5 of the GPU's 4.50 GB free" in half.why
    assert choose(ROOMY_GPU._replace(gpu_free_gb=4.5), cache="on").on
    assert not choose(ROOMY_GPU, cache_max_gb=2.0).on  # a number keeps its meaning: GB of pixels
    assert choose(ROOMY_GPU._replace(gpu_free_gb=4.5), cache_max_gb=3.0).on


@pytest.mark.parametrize(
    "room, world_size, data, lacking",
    [
        (ROOMY_GPU._replace(gpu_free_gb=4.0), 1, {}, "2.46 GB of them on the GPU (each rank's share padded to the "
         "longest) exceed its 4.00 GB free less 2 GB kept for training"),
        # 4 processes, each holding its rows, their padded copy and the gathered set: 4 x 3.69 GB > 0.8 x 16 GB
        (ROOMY_GPU._replace(ram_gb=16.0, processes=4), 4, {}, "building the cache takes up to 3.69 GB of RAM per "
         "process x 4 process(es), more than 0.8 of the 16.00 GB this machine has available"),
        (ROOMY_CPU._replace(ram_gb=2.0), 1, {}, "up to 2.46 GB of RAM per process x 1 process(es)"),
        (ROOMY_GPU._replace(shm_gb=0.064), 1, {"workers": 2}, "16 decoding worker(s) per process x 1 process(es) "
         "hand up to 1.27 GB through /dev/shm, which has 0.06 GB free"),
    ],
)  # fmt: skip
def test_a_machine_that_lacks_room_refuses_on_and_turns_auto_off(room, world_size, data, lacking):
    with pytest.raises(ConfigError) as refused:
        choose(room, world_size, cache="on", **data)
    assert str(refused.value).startswith("data.cache: on, but the 200000 decoded images take 2.46 GB, and ")
    assert lacking in str(refused.value) and "\n" not in str(refused.value)
    fallback = choose(room, world_size, **data)
    assert not fallback.on and fallback.why.startswith("data.cache=auto: off, ") and lacking in fallback.why


def test_a_small_dev_shm_says_what_to_do_and_needs_nothing_without_workers():
    small = ROOMY_GPU._replace(shm_gb=0.064)
    assert "give /dev/shm more room (docker run --shm-size=...) or set data.workers=0" in choose(small).why
    assert choose(small, workers=0).on and choose(small, workers=0, cache="on").on  # decoded in the process


def test_plans_for_other_machines_leave_the_choice_to_each_process():
    assert choose(UNMEASURED) == CacheChoice(
        False, "data.cache=auto: chosen by each process at start, from its GPU's free memory"
    )
    assert choose(UNMEASURED, cache="on").on


def test_decoding_workers_come_from_the_cpus_this_process_may_use(monkeypatch, indexed_shards):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)  # as Slurm binds a task
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable_cpus() == 3 and measure_room(torch.device("cpu")).cpus == 3
    assert [decoding_workers(1, 3, 1), decoding_workers(1, 3, 2), decoding_workers(4, 3, 2)] == [3, 1, 4]
    assert decoding_workers(0, 3, 1) == 0  # data.workers=0: in the training process
    started = []
    monkeypatch.setattr(cache, "DataLoader", lambda *a, **kw: started.append(kw["num_workers"]) or DataLoader(*a, **kw))
    assert cached(indexed_shards).samples == cached(indexed_shards, workers=0).samples == 200
    assert started == [3, 0]
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert usable_cpus() == 64


def test_one_process_agrees_with_itself():
    choice = CacheChoice(False, "why")
    assert agree_on_cache(choice, ONE_PROCESS) is choice


STEPS = 48  # 512 samples, 2 ranks x 16: 16 steps per epoch, so the stop lands mid-epoch of epoch 1 or 2
CACHED_RUN = {
    "data": {"cache": "on", "augment": {"hflip": True, "degrees": 5.0, "translate": [0.05, 0.05]}},
    "train": {"steps": STEPS},
    "log": {"every": 1, "samples_every": 1000},
    "checkpoint": {"every": 40, "keep": 5},
}


@pytest.mark.e2e  # starts processes
def test_sigterm_and_resume_is_bitwise_exact_with_the_cache(tmp_path, digit_shards):
    config = write_config(tmp_path / "cached.yaml", digit_shards, **CACHED_RUN)
    reference = run_module("dcgan.train", "--config", str(config), "train.name=reference", nproc=2, timeout=300)
    assert reference.returncode == 0, reference.stderr
    assert "data.cache=on" in reference.stderr and re.search(r"cached 512 images .* in [\d.]+s", reference.stderr)
    run_dir = tmp_path / "runs" / "stopped"
    log = tmp_path / "stopped.log"
    proc = start_python("-m", "dcgan.train", "--config", str(config), "train.name=stopped", nproc=2, log=log)
    wait_until(lambda: last_logged_step(run_dir) >= 20, proc, "step 20")
    os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)
    proc.wait(timeout=120)
    stop = int(re.search(r"stopped on request after step (\d+)/", log.read_text()).group(1))
    assert 20 <= stop < 40 and stop % 16 != 0  # before the periodic checkpoint, mid-epoch
    again = run_module("dcgan.train", "--config", str(config), "train.name=stopped", nproc=2, timeout=300)
    assert again.returncode == 0, again.stderr
    assert resumed_at(again.stderr) == stop
    assert_bitwise_equal(final_state(tmp_path / "runs" / "reference", STEPS), final_state(run_dir, STEPS))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["corrupt_samples"] == 0 and summary["status"] == "done"
