"""Which device a process takes, and a process group with one process: what a GPU cluster
decides, checked here with the device counts given (tests/e2e/test_cuda.py runs it on a GPU)."""

import pytest
import torch

from conftest import run_module, write_config
from dcgan.base.checks import ConfigError
from dcgan.config.loading import load_config
from dcgan.preflight import check_compile_layout
from dcgan.run.distributed import DeviceError, cuda_index


@pytest.mark.parametrize(
    "local_rank, processes, visible, expected",
    [
        (0, 1, 1, 0),  # one process, one GPU
        (3, 8, 8, 3),  # torchrun on a node whose 8 GPUs every process sees
        (3, 8, 1, 0),  # Slurm --gpus-per-task=1: each task sees its own GPU as cuda:0
        (1, 2, 4, 1),  # more GPUs than processes: the first ones
    ],
)
def test_a_process_takes_the_gpu_its_binding_gives(local_rank, processes, visible, expected):
    assert cuda_index(local_rank, processes, visible) == expected


def test_any_other_binding_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(DeviceError) as refused:
        cuda_index(3, 4, 2)  # 4 processes share 2 GPUs: two of them would take the same one
    message = str(refused.value)
    assert "\n" not in message and message.startswith("train.device: LOCAL_RANK=3 of 4 process(es)")
    assert "sees 2 CUDA device(s) (CUDA_VISIBLE_DEVICES=0,1)" in message


@pytest.mark.e2e  # starts processes
def test_a_process_group_of_one(tmp_path, digit_shards):
    """train.distributed=always: DDP and SyncBN with one process (gloo here, NCCL on a GPU);
    train.cuda_graph=on on the CPU says it runs eagerly."""
    config = write_config(tmp_path / "one.yaml", digit_shards, train={"distributed": "always", "cuda_graph": "on"})
    result = run_module("dcgan.train", "--config", str(config), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es) on cpu (DDP)" in result.stderr
    assert "train.cuda_graph=on: eager steps on the cpu (CUDA graphs need a GPU)" in result.stderr


def test_compile_with_channels_last_is_refused_on_a_gpu_only():
    """torch.compile fails on ConvTranspose2d's backward in NHWC on CUDA (pytorch#171622,
    measured on an H200); on the CPU, and in NCHW, it runs."""
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^train.compile: .*add train.channels_last=false"):
        check_compile_layout(load_config(None, ["train.compile=true"]), gpu)
    check_compile_layout(load_config(None, ["train.compile=true", "train.channels_last=false"]), gpu)
    check_compile_layout(load_config(None, ["train.compile=true"]), cpu)
