"""The shard pipeline: rank/worker split, equal steps, new order per epoch, resume
position, corrupt data skipped and counted, never a hang, never an unpickle."""

import io
import json
import pickle

import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import epoch_labels, make_loader, make_shards
from dcgan.base.checks import ConfigError
from dcgan.config.sections import AugmentConfig
from dcgan.data.stream import DataError


@pytest.fixture(scope="module")
def indexed_shards(tmp_path_factory, real_images):
    """96 real images whose label is their index, in shards of 40, 40 and 16: fewer
    shards than 2 ranks x 2 workers, and of unequal size."""
    images, _ = real_images
    return make_shards(tmp_path_factory.mktemp("indexed") / "s", images[:96], np.arange(96), "--per-shard", "40")


def test_two_ranks_two_workers_cover_the_set_disjointly_with_equal_steps(indexed_shards):
    loaders = [make_loader(indexed_shards, rank=r, world_size=2) for r in (0, 1)]
    assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch == 96 // (2 * 4)
    per_rank = [epoch_labels(loader, 0) for loader in loaders]
    for batches in per_rank:
        assert len(batches) == 12 and all(len(b) == 4 for b in batches)
    seen = [i for batches in per_rank for b in batches for i in b]
    assert sorted(seen) == list(range(96))  # every sample once, no rank overlap


def test_each_epoch_has_a_new_order_and_a_new_split(indexed_shards):
    loader = make_loader(indexed_shards, rank=0, world_size=2)
    epoch0, epoch1 = epoch_labels(loader, 0), epoch_labels(loader, 1)
    assert epoch0 != epoch1
    assert set(sum(epoch0, [])) != set(sum(epoch1, []))  # rank 0 reads other samples, too
    assert epoch_labels(loader, 0) == epoch0  # and an epoch is reproducible


def test_images_match_their_labels_and_are_normalised(indexed_shards, real_images):
    images, _ = real_images
    x, labels = next(iter(make_loader(indexed_shards, workers=0).epoch(0)))
    assert x.dtype == torch.float32 and x.shape == (4, 1, 28, 28)
    assert x.min() >= -1 and x.max() <= 1
    expected = torch.from_numpy(images[labels.numpy()]).float().div(127.5).sub(1).unsqueeze(1)
    assert torch.equal(x, expected)


@pytest.mark.parametrize("start_batch", [1, 4, 7])
def test_starting_mid_epoch_gives_the_rest_of_that_epoch(indexed_shards, start_batch):
    loader = make_loader(indexed_shards, rank=1, world_size=2, augment=AugmentConfig(hflip=True, degrees=10))
    full = list(loader.epoch(3))
    rest = list(loader.epoch(3, start_batch))
    assert len(rest) == len(full) - start_batch
    for (x_full, y_full), (x_rest, y_rest) in zip(full[start_batch:], rest):
        assert torch.equal(y_full, y_rest) and torch.equal(x_full, x_rest)  # augmentation included


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def test_corrupt_sample_is_counted_and_replaced(tmp_path, indexed_shards):
    manifest = json.loads((indexed_shards / "manifest.json").read_text())
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for name in manifest["shards"]:
        samples = list(wds.WebDataset(str(indexed_shards / name), shardshuffle=False, empty_check=False))
        if name == manifest["shards"][0]:
            samples[5]["png"] = b"\x89PNG\r\n\x1a\n garbage"
        write_tar(bad_dir / name, [{k: v for k, v in s.items() if k != "__url__"} for s in samples])
    (bad_dir / "manifest.json").write_text(json.dumps(manifest))

    loader = make_loader(bad_dir, workers=2)
    labels = sum(epoch_labels(loader, 0), [])
    assert len(labels) == 96  # the slot did not come up short
    assert loader.corrupt_samples == 1
    assert len(set(labels)) == 95  # one sample stands in for the corrupt one


def test_unreadable_and_missing_shards_are_skipped(tmp_path, indexed_shards):
    manifest = json.loads((indexed_shards / "manifest.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in manifest["shards"]:
        (broken / name).write_bytes((indexed_shards / name).read_bytes())
    (broken / "manifest.json").write_text(json.dumps(manifest))
    first = broken / manifest["shards"][0]
    first.write_bytes(first.read_bytes()[:5000])  # truncated mid-sample
    loader = make_loader(broken, rank=0, world_size=2)
    (broken / manifest["shards"][2]).unlink()  # vanishes after the run started
    batches = epoch_labels(loader, 0)
    assert len(batches) == loader.steps_per_epoch and all(len(b) == 4 for b in batches)
    assert loader.unreadable_shards >= 2


@pytest.mark.timeout(60)
def test_nothing_readable_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "shard-000000.tar").write_bytes(b"not a tar file at all" * 100)
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": ["shard-000000.tar"], "shard_samples": [50]}))
    with pytest.raises(DataError, match="none of the 1 shards yields a sample"):
        list(make_loader(tmp_path, workers=0).epoch(0))


def test_pickles_in_shards_are_never_loaded(tmp_path, real_images):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    png = io.BytesIO()
    from PIL import Image

    Image.fromarray(real_images[0][0]).save(png, format="PNG")
    samples = [{"__key__": f"{i:04d}", "png": png.getvalue(), "pth": pickle.dumps(Evil())} for i in range(8)]
    samples += [{"__key__": "9998", "pth": pickle.dumps(Evil())}]  # no image member: not a sample
    samples += [{"__key__": "9999", "png": b"\x89PNG\r\n\x1a\n garbage", "pth": pickle.dumps(Evil())}]  # corrupt
    write_tar(tmp_path / "shard-000000.tar", samples)
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": ["shard-000000.tar"], "shard_samples": [9]}))
    loader = make_loader(tmp_path, batch_size=9, workers=0)
    batches = epoch_labels(loader, 0)
    assert len(batches[0]) == 9 and loader.corrupt_samples == 1 and loader.miscounted == {}
    assert not marker.exists()


def test_brace_patterns_and_pipe_urls(tmp_path, indexed_shards):
    # a pattern beside its manifest takes the counts from it
    loader = make_loader(f"{indexed_shards}/shard-{{000000..000002}}.tar")
    assert loader.steps_per_epoch == 24
    # without a manifest, data.samples_per_shard is required
    alone = tmp_path / "alone"
    alone.mkdir()
    for tar in indexed_shards.glob("*.tar"):
        (alone / tar.name).write_bytes(tar.read_bytes())
    with pytest.raises(ConfigError, match=f"count them once with `python -m dcgan.shards index {alone}`"):
        make_loader(f"{alone}/shard-{{000000..000002}}.tar")
    # pipe: URLs need data.samples_per_shard; a wrong guess is found out and reported
    piped = make_loader(f"pipe:cat {alone}/shard-{{000000..000002}}.tar", samples_per_shard=32, workers=1)
    labels = sum(epoch_labels(piped, 0), [])
    assert len(labels) == 96 and len(set(labels)) == 32 + 32 + 16  # cut at 32, and 16 short
    assert piped.miscounted == {
        "shard-000000.tar": {"planned": 32, "found": 40},
        "shard-000001.tar": {"planned": 32, "found": 40},
        "shard-000002.tar": {"planned": 32, "found": 16},
    }


def test_device_augmentation_is_seeded_by_the_batch_place(indexed_shards):
    """Augmentation runs in the training process on whole batches (dcgan/data/augment.py);
    a batch's flips and affines follow from (seed, epoch, rank, batch) alone, so a run
    resumed mid-epoch sees the very same augmented images."""
    pumpkins = {"hflip": True, "degrees": 5.0, "translate": (0.05, 0.025), "scale": (0.95, 1.05), "shear": 0.025}
    augmented = make_loader(indexed_shards, augment=AugmentConfig(**pumpkins))
    plain = [x for x, _ in make_loader(indexed_shards).epoch(0)]
    whole = [x for x, _ in augmented.epoch(0)]
    assert all(not torch.equal(a, p) for a, p in zip(whole, plain))  # every batch is augmented
    assert all(torch.equal(a, b) for a, b in zip(whole, (x for x, _ in augmented.epoch(0))))
    resumed = [x for x, _ in augmented.epoch(0, start_batch=7)]
    assert len(resumed) == len(whole) - 7 and all(torch.equal(a, b) for a, b in zip(resumed, whole[7:]))
    assert not torch.equal(whole[0], next(augmented.epoch(1))[0])
