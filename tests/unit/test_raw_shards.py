"""Raw shards (``dcgan.shards --format raw``): many images per tar member as one uint8
.npy. Written by the real CLI and read by the real reader, they give the same images as
PNG shards, each image counts as one sample for the split, resume and the index, and a
damaged or pickled member costs only its own images."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import epoch_labels, make_loader, make_shards
from dcgan.base.checks import ConfigError
from dcgan.config.sections import AugmentConfig, DataConfig
from dcgan.data.cache import CachedLoader
from dcgan.data.shardset import ERROR, first_image_size, resolve_shards, tar_samples
from dcgan.data.stream import read_images
from dcgan.data.writing import count_shard
from dcgan.run.distributed import DistInfo
from dcgan.shards import main as shards_main

ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
RAW = ("--format", "raw", "--per-member", "20", "--per-shard", "40")  # 96 images: 40, 40, 16 in members of 20


@pytest.fixture(scope="module")
def raw_indexed(tmp_path_factory, real_images):
    """96 real images whose label is their index, as raw shards of 40, 40 and 16 images
    (members of 20, 20 | 20, 20 | 16): fewer shards than 2 ranks x 2 workers."""
    images, _ = real_images
    return make_shards(tmp_path_factory.mktemp("raw") / "s", images[:96], np.arange(96), *RAW)


def rgb_of(images):
    """Real RGB images: three different real images as the channels of each."""
    return np.stack([images, np.roll(images, 1, 0), np.roll(images, 2, 0)], -1)


# --------------------------------------------------------------------------- round trip


def test_the_writer_stacks_images_into_members_within_shards(raw_indexed):
    manifest = json.loads((raw_indexed / "manifest.json").read_text())
    assert manifest["shard_samples"] == [40, 40, 16] and manifest["samples"] == 96
    assert manifest["image_format"] == "raw" and manifest["images_per_member"] == 20
    assert manifest["image_size"] == 28 and manifest["channels"] == 1
    with tarfile.open(raw_indexed / manifest["shards"][2]) as tar:
        assert tar.getnames() == ["000000080.images.npy", "000000080.labels.npy"]
        images, labels = (
            np.load(io.BytesIO(tar.extractfile(f"000000080.{m}").read())) for m in ("images.npy", "labels.npy")
        )
    assert images.dtype == np.uint8 and images.shape == (16, 28, 28, 1)  # the channel axis kept for grey
    assert labels.dtype == np.int64 and labels.shape == (16,)
    assert first_image_size(resolve_shards(DataConfig(shards=f"{raw_indexed}/shard-000000.tar"))) == (28, 28)


@pytest.mark.parametrize(
    "colour, channels, image_size",
    [("grey", 1, 28), ("rgb", 3, 28), ("rgb", 1, 28), ("grey", 3, 28), ("rgb", 3, 14)],
)
def test_raw_reads_back_exactly_what_png_does(tmp_path, real_images, colour, channels, image_size):
    """Same images and labels from raw as from PNG shards of one source, also when the
    model's channels or size differ from the shards' (converted and resized alike)."""
    images, labels = real_images
    source = images[:50] if colour == "grey" else rgb_of(images[:50])
    write = ("--per-shard", "20", "--no-shuffle")
    png = make_shards(tmp_path / "png", source, labels[:50], *write)
    raw = make_shards(tmp_path / "raw", source, labels[:50], *write, "--format", "raw", "--per-member", "8")
    assert json.loads((raw / "manifest.json").read_text())["shard_samples"] == [16, 16, 16, 2]  # whole members
    png_images, png_labels = read_images(resolve_shards(DataConfig(shards=str(png))), None, channels, image_size)
    raw_images, raw_labels = read_images(resolve_shards(DataConfig(shards=str(raw))), None, channels, image_size)
    assert raw_images.dtype == torch.uint8 and raw_images.shape == (50, channels, image_size, image_size)
    assert torch.equal(raw_images, png_images) and torch.equal(raw_labels, png_labels)
    assert torch.equal(raw_labels, torch.from_numpy(labels[:50]))


def test_two_ranks_two_workers_cover_raw_shards_once_with_equal_steps(raw_indexed, real_images):
    loaders = [make_loader(raw_indexed, rank=r, world_size=2) for r in (0, 1)]
    assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch == 12
    per_rank = [epoch_labels(loader, 0) for loader in loaders]
    for batches in per_rank:
        assert len(batches) == 12 and all(len(b) == 4 for b in batches)
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(96))
    x, labels = next(iter(loaders[1].epoch(1)))  # each image with its own label
    expected = torch.from_numpy(real_images[0][labels.numpy()]).float().div(127.5).sub(1).unsqueeze(1)
    assert torch.equal(x, expected)


@pytest.mark.parametrize("start_batch", [1, 5])
def test_resuming_mid_epoch_on_raw_shards_gives_the_rest_of_it(raw_indexed, start_batch):
    loader = make_loader(raw_indexed, rank=1, world_size=2, augment=AugmentConfig(hflip=True, degrees=10))
    full = list(loader.epoch(2))
    rest = list(loader.epoch(2, start_batch))
    assert len(rest) == len(full) - start_batch
    for (x_full, y_full), (x_rest, y_rest) in zip(full[start_batch:], rest):
        assert torch.equal(y_full, y_rest) and torch.equal(x_full, x_rest)


# --------------------------------------------------------------------------- damage


def rewrite_member(src, dst, member, change):
    """Copy the tar ``src`` to ``dst`` with ``member``'s bytes replaced by ``change(bytes)``:
    a valid tar holding one damaged member."""
    with tarfile.open(src) as tar_in, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tar_out:
        for info in tar_in.getmembers():
            data = tar_in.extractfile(info).read()
            if info.name == member:
                data = change(data)
                info.size = len(data)
            tar_out.addfile(info, io.BytesIO(data))


def damaged_copy(raw_indexed, tmp_path, change):
    """The raw set with shard 0's second member (written images 20..39) damaged by
    ``change``, and the labels of that member's images (the write order is shuffled)."""
    out = tmp_path / "damaged"
    shutil.copytree(raw_indexed, out)
    rewrite_member(raw_indexed / "shard-000000.tar", out / "shard-000000.tar", "000000020.images.npy", change)
    with tarfile.open(raw_indexed / "shard-000000.tar") as tar:
        lost = np.load(io.BytesIO(tar.extractfile("000000020.labels.npy").read()))
    assert len(lost) == 20
    return out, set(lost.tolist())


def truncated(data):
    return data[: len(data) // 2]  # the npy header reads, the pixels stop half-way


def headless(data):
    return b"garbage!" + data[8:]  # the npy magic is gone: not even the image count reads


@pytest.mark.parametrize("change", [truncated, headless])
def test_a_damaged_raw_member_costs_only_its_own_images(raw_indexed, tmp_path, change):
    damaged, lost = damaged_copy(raw_indexed, tmp_path, change)
    loader = make_loader(damaged, world_size=1, workers=2)
    labels = sum(epoch_labels(loader, 0), [])  # no DataError
    assert len(labels) == 96
    # the samples the member stands for: its header's count, else one
    assert loader.corrupt_samples == (20 if change is truncated else 1)
    assert set(labels) == set(range(96)) - lost  # every other image was read
    if change is truncated:
        assert loader.miscounted == {} and loader.empty_positions == 0  # the shard's count still holds
    else:
        assert loader.miscounted == {"shard-000000.tar": {"planned": 40, "found": 21}}
    images, read_labels = read_images(resolve_shards(DataConfig(shards=str(damaged))), None, 1, 28)
    assert sorted(read_labels.tolist()) == sorted(set(range(96)) - lost) and len(images) == 76


@pytest.fixture(scope="module")
def three_members(tmp_path_factory, real_images):
    """48 real images whose label is their index, in one raw shard of 3 members of 16."""
    images, _ = real_images
    args = ("--format", "raw", "--per-member", "16", "--per-shard", "48")
    return make_shards(tmp_path_factory.mktemp("cut") / "s", images[:48], np.arange(48), *args)


# Where a copy of the shard stops, around its third member (the planned count, 48, is in the manifest):
# (name, member, offset into its data, images decoded, images counted as corrupt, the shard's count by the index)
CUTS = [
    ("between members", "000000032.images.npy", -512, 32, 0, 32),  # where its tar header would start
    ("inside the tar header", "000000032.images.npy", -400, 32, 0, 32),  # the member never starts: nothing to count
    ("inside the npy header", "000000032.images.npy", 50, 32, 1, 33),  # it starts, its image count is lost: one
    ("inside the images", "000000032.images.npy", 2000, 32, 16, 48),
    ("inside the labels", "000000032.labels.npy", 40, 32, 16, 48),
    ("before the end-of-archive block", "000000032.labels.npy", 512, 48, 0, 48),  # every member whole
]


def cut_copy(three_members, tmp_path, member, offset) -> tuple[Path, set[int]]:
    """A copy of the shard folder with its shard cut ``offset`` bytes into ``member``'s
    data; and the labels of the third member (the images a cut in it may cost)."""
    with tarfile.open(three_members / "shard-000000.tar") as tar:
        info = tar.getmember(member)
        third = set(np.load(io.BytesIO(tar.extractfile("000000032.labels.npy").read())).tolist())
    cut = tmp_path / "cut"
    shutil.copytree(three_members, cut)
    with open(cut / "shard-000000.tar", "r+b") as f:
        f.truncate(info.offset_data + offset)
    return cut, third


def read_cut(url: str) -> tuple[list[int], int, Exception | None]:
    """The labels of the samples that decode, the corrupt ones, and the read error, as
    every reader meets them (shardset.tar_samples)."""
    read, errors = [], 0
    try:
        for sample in tar_samples(url):
            errors += ERROR in sample
            read += [sample["cls"]] if ERROR not in sample else []
    except Exception as e:
        return read, errors, e
    return read, errors, None


@pytest.mark.parametrize("where, member, offset, decoded, corrupt, indexed", CUTS, ids=[c[0] for c in CUTS])
def test_a_raw_shard_cut_short_costs_only_the_cut_member(
    three_members, tmp_path, caplog, where, member, offset, decoded, corrupt, indexed
):
    """Wherever a copy stops, the whole members are read, the cut one's images (as many as
    arrived of its header says) are corrupt, and the shard is reported cut short: never
    taken for a whole, shorter one, which the index would write as true and the reader
    would blame on the manifest."""
    cut, third = cut_copy(three_members, tmp_path, member, offset)
    kept = set(range(48)) - (third if decoded == 32 else set())
    read, errors, error = read_cut(str(cut / "shard-000000.tar"))
    assert set(read) == kept and errors == corrupt and isinstance(error, tarfile.ReadError)

    loader = make_loader(cut, world_size=1, workers=1)
    labels = sum(epoch_labels(loader, 0), [])  # the training reader (it replaces corrupt samples from the next lap)
    assert set(labels) == kept and (loader.corrupt_samples > 0) == (corrupt > 0)
    assert loader.unreadable_shards > 0 and loader.miscounted == {}
    cfg = DataConfig(shards=str(cut), workers=1, cache="on")
    cached = CachedLoader(resolve_shards(cfg), cfg, ONE_PROCESS, batch_size=4, image_size=28, channels=1, seed=0)
    assert set(cached.labels.tolist()) == kept and cached.samples == decoded
    assert cached.corrupt_samples == corrupt and cached.unreadable_shards > 0 and cached.miscounted == {}
    images, read_labels = read_images(resolve_shards(DataConfig(shards=str(cut))), None, 1, 28)
    assert sorted(read_labels.tolist()) == sorted(kept) and len(images) == decoded  # evaluation's reader

    found = count_shard(str(cut / "shard-000000.tar"))  # the index
    assert (found.samples, found.unopenable) == (indexed, corrupt) and found.error
    assert shards_main(["index", str(cut), "--workers", "1"]) == 0
    assert json.loads((cut / "manifest.json").read_text())["shard_samples"] == [indexed]
    assert f"shard-000000.tar: unreadable after {indexed} samples" in caplog.text


@pytest.mark.parametrize("where, member, offset, decoded, corrupt, indexed", CUTS, ids=[c[0] for c in CUTS])
def test_a_cut_shard_read_through_a_pipe_counts_as_the_file_does(
    three_members, tmp_path, where, member, offset, decoded, corrupt, indexed
):
    """``pipe:`` shards (a bucket, a download) stream the tar; a cut member's header
    arrives there too, so the images it costs are counted alike."""
    cut, _ = cut_copy(three_members, tmp_path, member, offset)
    read, errors, error = read_cut(f"pipe:cat {cut / 'shard-000000.tar'}")
    assert (len(read), errors, type(error)) == (decoded, corrupt, tarfile.ReadError)
    assert (read, errors) == read_cut(str(cut / "shard-000000.tar"))[:2]


@pytest.mark.parametrize("content", [b'{"shards": ["shard-0', b"[1, 2]", b"\xff\xfe"])
def test_index_repairs_a_damaged_manifest_and_keeps_it_aside(three_members, tmp_path, content, capsys):
    folder = tmp_path / "m"
    shutil.copytree(three_members, folder)
    (folder / "manifest.json").write_bytes(content)
    assert shards_main(["index", str(folder), "--workers", "1"]) == 0
    assert json.loads((folder / "manifest.json").read_text())["shard_samples"] == [48]
    assert (folder / "manifest.json.unreadable").read_bytes() == content


BAD_COUNTS = [  # JSON objects, as index leaves them, whose counts are not names and counts
    b'{"shards": 5, "shard_samples": "x", "classes": ["a"]}',
    b'{"shards": [["shard-000000.tar"]], "shard_samples": [48], "classes": ["a"]}',
    b'{"shards": {"shard-000000.tar": 48}, "shard_samples": [48], "classes": ["a"]}',
]


@pytest.mark.parametrize("content", BAD_COUNTS)
def test_index_repairs_a_manifest_whose_counts_are_not_counts(three_members, tmp_path, content, caplog):
    folder = tmp_path / "m"
    shutil.copytree(three_members, folder)
    (folder / "manifest.json").write_bytes(content)
    assert shards_main(["index", str(folder), "--workers", "1"]) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["shards"] == ["shard-000000.tar"] and manifest["shard_samples"] == [48]
    assert manifest["classes"] == ["a"]  # the fields index does not count are kept
    assert "manifest.json: its old 'shards' and 'shard_samples' are not lists of names and counts" in caplog.text


@pytest.mark.parametrize("content", BAD_COUNTS)
def test_training_on_a_manifest_whose_counts_are_not_counts_names_the_index(three_members, tmp_path, content):
    folder = tmp_path / "m"
    shutil.copytree(three_members, folder)
    (folder / "manifest.json").write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        resolve_shards(DataConfig(shards=str(folder)))
    message = str(caught.value)
    assert f"{folder / 'manifest.json'} is not a valid manifest" in message and "\n" not in message
    assert message.endswith(f"`python -m dcgan.shards index {folder}` rewrites it")


# --------------------------------------------------------------------------- index


def test_index_counts_raw_shards_like_the_writer(raw_indexed, tmp_path):
    written = json.loads((raw_indexed / "manifest.json").read_text())
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in written["shards"]:
        shutil.copy(raw_indexed / name, bare / name)
    assert shards_main(["index", str(bare), "--workers", "2"]) == 0
    indexed = json.loads((bare / "manifest.json").read_text())
    assert indexed["shards"] == written["shards"] and indexed["shard_samples"] == written["shard_samples"]
    assert indexed["samples"] == 96 and indexed["image_size"] == 28 and indexed["channels"] == 1
    # a truncated member: still its 20 images (what the reader yields for it), all unopenable
    damaged, _ = damaged_copy(raw_indexed, tmp_path, truncated)
    found = count_shard(str(damaged / "shard-000000.tar"))
    assert (found.samples, found.unopenable, found.error) == (40, 20, "")


def test_index_sees_rgb_raw_shards(tmp_path, real_images):
    raw = make_shards(tmp_path / "rgb", rgb_of(real_images[0][:30]), None, "--format", "raw", "--per-member", "7")
    (raw / "manifest.json").unlink()
    assert shards_main(["index", str(raw), "--workers", "1"]) == 0
    indexed = json.loads((raw / "manifest.json").read_text())
    assert indexed["shard_samples"] == [30] and indexed["channels"] == 3 and indexed["image_size"] == 28
    with tarfile.open(raw / "shard-000000.tar") as tar:  # no labels in the source: no labels member
        assert all(name.endswith(".images.npy") for name in tar.getnames()) and len(tar.getnames()) == 5


# --------------------------------------------------------------------------- pickles


def test_pickled_raw_members_are_refused_never_loaded(tmp_path, real_images):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    def npy(array):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=True)
        return buf.getvalue()

    evil = np.array([Evil()] * 4, dtype=object)
    good = real_images[0][:8, :, :, None]
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        sink.write({"__key__": "a", "images.npy": npy(evil)})  # pickled images
        sink.write({"__key__": "b", "images.npy": npy(good), "labels.npy": npy(evil.repeat(2))})  # pickled labels
        sink.write({"__key__": "c", "images.npy": npy(good), "labels.npy": npy(np.arange(8))})
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": ["shard-000000.tar"], "shard_samples": [20]}))

    shards = resolve_shards(DataConfig(shards=str(tmp_path)))
    images, labels = read_images(shards, None, 1, 28)
    assert labels.tolist() == list(range(8))  # only c's images: a's 4 and b's 8 are corrupt samples
    assert torch.equal(images[:, 0], torch.from_numpy(good[..., 0]))
    loader = make_loader(tmp_path, batch_size=8, workers=0)
    assert set(sum(epoch_labels(loader, 0), [])) <= set(range(8)) and loader.corrupt_samples >= 12
    assert loader.miscounted == {}  # 4 + 8 + 8: each refused image still counts as a sample
    found = count_shard(str(tmp_path / "shard-000000.tar"))
    assert (found.samples, found.unopenable) == (20, 12)
    assert not marker.exists()


def test_images_of_several_sizes_make_members_of_one_size(tmp_path, real_images):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, side in enumerate([28, 28, 28, 20, 20, 28]):  # written in name order (--no-shuffle)
        Image.fromarray(real_images[0][i]).resize((side, side)).save(folder / f"{i}.png")
    raw, png = tmp_path / "raw", tmp_path / "png"
    assert shards_main([str(folder), str(raw), "--format", "raw", "--no-shuffle", "--workers", "1"]) == 0
    assert shards_main([str(folder), str(png), "--no-shuffle", "--workers", "1"]) == 0
    with tarfile.open(raw / "shard-000000.tar") as tar:  # a folder without classes: no labels member
        assert tar.getnames() == ["000000000.images.npy", "000000003.images.npy", "000000005.images.npy"]
    raw_images, _ = read_images(resolve_shards(DataConfig(shards=str(raw))), None, 3, 28)
    png_images, _ = read_images(resolve_shards(DataConfig(shards=str(png))), None, 3, 28)
    assert raw_images.shape == (6, 3, 28, 28) and torch.equal(raw_images, png_images)
