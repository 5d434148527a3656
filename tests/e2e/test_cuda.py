"""What only a GPU can show: the step makes no host sync, repeats from a seed, gives the
same training as a CUDA graph as eagerly, and CUDA checkpoints load anywhere. Every test is
marked ``cuda`` (skipped without a GPU); ``bash bench/gpu.sh`` runs them on one.

Tolerances: two runs of the same CUDA step are not bitwise equal (cuDNN's fastest
convolution algorithms add in a varying order), and a GAN amplifies such differences over
the steps, so runs are compared with cuDNN in deterministic mode, where they should agree
to float32 rounding; each test prints the largest difference it saw.
"""

import os

import pytest
import torch

from conftest import run_module, write_config
from dcgan.checkpoint import files as checkpoint
from dcgan.checkpoint.inference import load_generator
from dcgan.config.loading import load_config
from dcgan.data.cache import CachedLoader
from dcgan.data.shardset import resolve_shards
from dcgan.run.distributed import DistInfo
from dcgan.training.setup import build_training, memory_format
from dcgan.training.step import STAT_NAMES, TrainStep

pytestmark = pytest.mark.cuda

CUDA = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0))
# The trainers these tests start see the GPU (conftest hides it from all others).
GPU_ENV = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
AFFINE = {"hflip": True, "degrees": 10.0, "translate": [0.1, 0.1], "scale": [0.9, 1.1], "shear": 5.0}
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # float32 rounding, a few hundred operations deep


@pytest.fixture
def deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def gpu_config(path, shards, train=None, **sections):
    """write_config's tiny kmnist config, on CUDA, without W&B (its service takes seconds a run)."""
    return write_config(path, shards, train={"device": "cuda", **(train or {})}, wandb={"mode": "disabled"}, **sections)


def cuda_config(tmp_path, shards, **train):
    """The tests' tiny kmnist config on CUDA, data cached on the GPU with the seeds' affine augmentation."""
    return load_config(gpu_config(tmp_path / "cuda.yaml", shards, train, data={"cache": "on", "augment": AFFINE}))


def stepper(cfg, graphed):
    """A fresh state and its TrainStep, seeded as dcgan.train seeds them; returns (step, state, stats_sum)."""
    state, g_train, d_train = build_training(cfg, CUDA, graphed=graphed)
    checkpoint.seed_rng(cfg.train.seed + 1)
    stats_sum = torch.zeros(len(STAT_NAMES), device=CUDA.device)
    return TrainStep(state, g_train, d_train, cfg, CUDA, stats_sum, graphed=graphed), state, stats_sum


def cached_batches(cfg):
    loader = CachedLoader(
        resolve_shards(cfg.data), cfg.data, CUDA, batch_size=cfg.train.batch_size, image_size=cfg.model.image_size,
        channels=cfg.model.channels, seed=cfg.train.seed, memory_format=memory_format(cfg),
    )  # fmt: skip
    epoch = 0
    while True:
        for real, _ in loader.epoch(epoch):
            yield real
        epoch += 1


def train_steps(cfg, graphed, steps):
    """Per-step statistics (steps x STAT_NAMES) and the final state of ``steps`` steps."""
    step, state, stats_sum = stepper(cfg, graphed)
    batches, per_step = cached_batches(cfg), []
    for _ in range(steps):
        stats_sum.zero_()
        step(next(batches))
        per_step.append(stats_sum.clone())
    return torch.stack(per_step).cpu(), state


def weights(state):
    return torch.cat(
        [p.detach().flatten().cpu() for net in (state.generator, state.discriminator) for p in net.parameters()]
    )


def largest_difference(a, b):
    return ((a - b).abs() / (b.abs() + 1e-6)).max().item()


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graph"])
def test_the_step_makes_no_host_sync(tmp_path, digit_shards, graphed):
    """20 steps fed by the cache with affine augmentation, under set_sync_debug_mode("error"):
    any device-to-host wait raises. The first steps (cuDNN autotuning, the capture) and the
    epoch's start (its order is made on the CPU) come before."""
    cfg = cuda_config(tmp_path, digit_shards, steps=30)
    step, _, _ = stepper(cfg, graphed)
    batches = cached_batches(cfg)
    for _ in range(4):
        step(next(batches))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            step(next(batches))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert step.graph is not None if graphed else step.graph is None


def assert_trained_alike(label, stats, state, reference_stats, reference_state):
    """The same statistics at every step and the same weights, EMA and BN statistics at the
    end, within TOLERANCE; prints the largest differences (bench/gpu.sh's summary shows them)."""
    print(f"{label}: statistics {largest_difference(stats, reference_stats):.2e}, "
          f"weights {largest_difference(weights(state), weights(reference_state)):.2e}")  # fmt: skip
    torch.testing.assert_close(stats, reference_stats, **TOLERANCE)
    torch.testing.assert_close(weights(state), weights(reference_state), **TOLERANCE)
    ema, reference_ema = (
        torch.cat([t.flatten().cpu().float() for t in s.generator_ema.state_dict().values()])
        for s in (state, reference_state)
    )
    torch.testing.assert_close(ema, reference_ema, **TOLERANCE)


def test_eager_steps_repeat_from_a_seed(tmp_path, digit_shards, deterministic_cudnn):
    cfg = cuda_config(tmp_path, digit_shards, cuda_graph="off")
    first, state_a = train_steps(cfg, graphed=False, steps=50)
    second, state_b = train_steps(cfg, graphed=False, steps=50)
    assert_trained_alike("eager vs eager", second, state_b, first, state_a)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_steps_train_as_eager_ones(tmp_path, digit_shards, deterministic_cudnn, precision):
    """50 steps replayed from a CUDA graph against 50 eager steps from the same seed."""
    cfg = cuda_config(tmp_path, digit_shards, precision=precision)
    eager, state_e = train_steps(cfg, graphed=False, steps=50)
    graphed, state_g = train_steps(cfg, graphed=True, steps=50)
    assert_trained_alike(f"{precision} graph vs eager", graphed, state_g, eager, state_e)
    assert int(state_g.opt_d.state[next(iter(state_g.opt_d.state))]["step"]) == 50  # Adam stepped in every replay


def run_trainer(config, *overrides, env=None, timeout=300):
    result = run_module("dcgan.train", "--config", str(config), *overrides, env={**GPU_ENV, **(env or {})},
                        timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_graph_mode_checkpoint_resumes_in_either_mode(tmp_path, digit_shards):
    config = gpu_config(
        tmp_path / "graph.yaml", digit_shards,
        train={"cuda_graph": "on", "steps": 8, "precision": "bf16"},
        data={"cache": "on", "augment": AFFINE}, checkpoint={"every": 4, "keep": 5},
    )  # fmt: skip
    first = run_trainer(config)
    assert "the whole step is one CUDA graph" in first.stderr
    run_dir = tmp_path / "runs" / "graph"
    written = checkpoint.load(run_dir / "checkpoints" / "step_00000008.pt")
    resumed = {}
    for mode in ("off", "on"):
        result = run_trainer(config, "train.steps=12", f"train.cuda_graph={mode}", "train.resume=" + str(
            run_dir / "checkpoints" / "step_00000008.pt"), f"train.name=from-graph-{mode}")  # fmt: skip
        assert "resumed from" in result.stderr
        resumed[mode] = checkpoint.load(tmp_path / "runs" / f"from-graph-{mode}" / "checkpoints" / "step_00000012.pt")
    assert written["step"] == 8 and all(sd["step"] == 12 for sd in resumed.values())
    # A resumed eager run and a resumed graphed run train alike (bf16: a looser tolerance).
    for key in ("generator", "discriminator"):
        for name, tensor in resumed["off"][key].items():
            if tensor.is_floating_point():
                torch.testing.assert_close(resumed["on"][key][name], tensor, rtol=2e-2, atol=2e-3)


def test_a_cuda_checkpoint_loads_on_the_cpu(tmp_path, digit_shards):
    config = gpu_config(tmp_path / "gpu.yaml", digit_shards, train={"steps": 4})
    run_trainer(config)
    generator = load_generator(tmp_path / "runs" / "gpu")
    assert next(generator.parameters()).device.type == "cpu"
    images = generator.sample(4, seed=0)
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.uint8


def test_resume_with_channels_last_flipped(tmp_path, digit_shards):
    """CUDA's fused Adam refuses moments in another layout than their parameters."""
    config = gpu_config(tmp_path / "layout.yaml", digit_shards, train={"steps": 4})
    run_trainer(config, "train.channels_last=true")
    for steps, channels_last in ((8, "false"), (12, "true")):
        resumed = run_trainer(config, f"train.steps={steps}", f"train.channels_last={channels_last}")
        assert f"at step {steps - 4} " in resumed.stderr and "done: 4 steps" in resumed.stderr


def test_one_gpu_per_task_and_a_process_group_of_one(tmp_path, digit_shards):
    """A task that sees one GPU takes cuda:0 whatever its LOCAL_RANK (Slurm's --gpus-per-task=1);
    train.distributed=always runs DDP's replacement in the graph, NCCL and SyncBN with one process."""
    config = gpu_config(tmp_path / "bound.yaml", digit_shards, train={"steps": 8})
    env = {"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": GPU_ENV["CUDA_VISIBLE_DEVICES"][:1]}
    bound = run_trainer(config, env=env)
    assert "(local 3) takes cuda:0" in bound.stderr
    for mode in ("off", "on"):
        grouped = run_trainer(config, "train.distributed=always", f"train.cuda_graph={mode}", f"train.name=pg-{mode}")
        assert f"1 process(es) on cuda ({'DDP' if mode == 'off' else 'process group'}" in grouped.stderr
