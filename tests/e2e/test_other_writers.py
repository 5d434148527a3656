"""Shards other tools wrote: real img2dataset output (downloaded from file:// URLs), the
index command, image members of any format and mode, and per-shard counts that the
reader checks: a wrong count is reported once, costs only that shard's positions, and
every rank still runs the same number of steps."""

import io
import json
import logging
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import make_shards, run_module, write_config
from dcgan.base.checks import ConfigError
from dcgan.config.sections import DataConfig
from dcgan.data.reading import decode_sample
from dcgan.data.shardset import resolve_shards, tar_samples
from dcgan.data.stream import Loader, ShardStream, read_images
from dcgan.preflight import plan_run

I2D_COUNTS = [63, 63, 24]  # 152 URLs, 2 of them missing, 64 per shard


@pytest.fixture(scope="module")
def img2dataset_folder(tmp_path_factory, real_images, img2dataset):
    """Real img2dataset shards: 150 real images, saved as 40x40 grey, RGB, RGBA and palette
    files, fetched from file:// URLs (two of which are missing) and resized to 28x28."""
    root = tmp_path_factory.mktemp("img2dataset")
    (root / "images").mkdir()
    urls = []
    for i, pixels in enumerate(real_images[0][:150]):
        mode = ("L", "RGB", "RGBA", "P")[i % 4]
        path = root / "images" / f"{i:04d}.{'jpg' if mode == 'RGB' else 'png'}"
        Image.fromarray(pixels).resize((40, 40), Image.BILINEAR).convert(mode).save(path)
        urls.append(path.as_uri())
    for at in (10, 100):
        urls.insert(at, (root / "images" / f"missing-{at}.png").as_uri())
    (root / "urls.txt").write_text("\n".join(urls) + "\n")
    out = root / "shards"
    args = ["--url_list", str(root / "urls.txt"), "--input_format", "txt", "--output_folder", str(out),
            "--output_format", "webdataset", "--image_size", "28", "--resize_mode", "center_crop",
            "--number_sample_per_shard", "64", "--processes_count", "1", "--thread_count", "4"]  # fmt: skip
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run([img2dataset, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert (out / "00000.parquet").exists() and not (out / "manifest.json").exists()
    return out


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) * 127.5).round().to(torch.uint8)


def sorted_rows(images: torch.Tensor) -> list[bytes]:
    return sorted(bytes(row) for row in images.flatten(1).numpy())


def test_img2dataset_folder_is_planned_with_its_own_counts(img2dataset_folder):
    shards = resolve_shards(DataConfig(shards=str(img2dataset_folder)))
    assert shards.counts == tuple(I2D_COUNTS) and shards.counted_by == "img2dataset's *_stats.json"
    # One epoch of 15 batches of 10 reads each of the 150 images once (.json members ignored).
    cfg = DataConfig(shards=str(img2dataset_folder), workers=2, shuffle_buffer=16)
    stream = ShardStream(shards, cfg, rank=0, world_size=1, batch_size=10, image_size=28, channels=1, seed=0)
    loader = Loader(stream, torch.device("cpu"))
    seen = torch.cat([x for x, _ in loader.epoch(0)])
    everything, _ = read_images(shards, None, 1, 28)
    assert len(everything) == 150 and sorted_rows(as_uint8(seen)) == sorted_rows(everything)
    assert loader.miscounted == {} and loader.corrupt_samples == 0 and loader.empty_positions == 0


def test_training_on_an_img2dataset_folder(tmp_path, img2dataset_folder):
    config = write_config(tmp_path / "i2d.yaml", img2dataset_folder, data={"workers": 2})
    result = run_module("dcgan.train", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "150 samples in 3 shards, counts from img2dataset's *_stats.json" in result.stderr
    summary = json.loads((tmp_path / "runs" / "i2d" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["data"]["miscounted_shards"] == []


def test_without_records_the_index_command_is_named_and_counts_them(tmp_path, img2dataset_folder):
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in img2dataset_folder.glob("*.tar"):
        shutil.copy(tar, bare)
    config = write_config(tmp_path / "bare.yaml", bare)
    refused = run_module("dcgan.train", "--config", str(config), timeout=120)
    assert refused.returncode == 2
    assert f"count them once with `python -m dcgan.shards index {bare}`" in refused.stderr

    indexed = run_module("dcgan.shards", "index", str(bare), "--workers", "2", timeout=120)
    assert indexed.returncode == 0, indexed.stderr
    assert "counting samples: done, 3 shards" in indexed.stderr  # progress, as log lines off a terminal
    manifest = json.loads((bare / "manifest.json").read_text())
    assert manifest["shards"] == ["00000.tar", "00001.tar", "00002.tar"] and manifest["shard_samples"] == I2D_COUNTS
    assert manifest["image_size"] == 28 and manifest["channels"] == 3  # img2dataset writes RGB JPEGs
    assert resolve_shards(DataConfig(shards=str(bare))).counted_by == str(bare / "manifest.json")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def close(got: np.ndarray, want: np.ndarray, lossy: bool) -> bool:
    diff = torch.from_numpy(np.abs(np.asarray(got, dtype=np.int64) - np.asarray(want, dtype=np.int64))).float()
    return diff.mean() < 2 if lossy else diff.max() == 0


def test_image_members_of_any_format_and_mode(tmp_path, real_images):
    grey = Image.fromarray(real_images[0][0])
    rgb = Image.merge("RGB", (grey, grey.transpose(Image.FLIP_LEFT_RIGHT), grey.transpose(Image.FLIP_TOP_BOTTOM)))
    deep = np.asarray(grey, np.uint16) * 257 + 100  # a 16-bit grey PNG
    palette = rgb.convert("P")
    cases = {  # member -> (bytes, expected grey, expected RGB), from PIL's own conversions
        "png": (encode(grey, "png"), np.asarray(grey), np.asarray(grey.convert("RGB"))),
        "webp": (encode(rgb, "webp", lossless=True), np.asarray(rgb.convert("L")), np.asarray(rgb)),
        "bmp": (encode(rgb.convert("RGBA"), "bmp"), np.asarray(rgb.convert("L")), np.asarray(rgb)),
        "tiff": (encode(palette, "tiff"), np.asarray(palette.convert("L")), np.asarray(palette.convert("RGB"))),
        "gif": (encode(grey, "gif"), np.asarray(grey), np.asarray(grey.convert("RGB"))),
        "image.png": (encode(Image.fromarray(deep), "png"), np.round(deep / 257).astype(np.uint8), None),
        "jpeg": (encode(rgb, "jpeg", quality=100, subsampling=0), np.asarray(rgb.convert("L")), np.asarray(rgb)),
    }
    with wds.TarWriter(str(tmp_path / "mixed.tar")) as sink:
        for i, (member, (data, _, _)) in enumerate(cases.items()):
            sink.write({"__key__": f"{i:03d}", member: data, "txt": b"a caption", "json": b'{"w": 28}'})
        sink.write({"__key__": "meta", "json": b"{}"})  # no image member: not a sample

    for sample, (member, (_, want_grey, want_rgb)) in zip(tar_samples(str(tmp_path / "mixed.tar")), cases.items()):
        assert member in sample
        got_grey = decode_sample(sample, 1, 28)
        got_rgb = decode_sample(sample, 3, 28)
        assert got_grey.shape == (28, 28, 1) and got_rgb.shape == (28, 28, 3)
        assert close(got_grey[..., 0], want_grey, lossy=member == "jpeg"), member
        if want_rgb is not None:
            assert close(got_rgb, want_rgb, lossy=member == "jpeg"), member

    indexed = run_module("dcgan.shards", "index", str(tmp_path), timeout=120)
    assert indexed.returncode == 0, indexed.stderr
    assert "1 group(s) with no image member (json) are not samples" in indexed.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shard_samples"] == [len(cases)] and manifest["channels"] == 3 and manifest["image_size"] == 28


# --------------------------------------------------------------------------- counts checked while reading


@pytest.fixture(scope="module")
def numbered_shards(tmp_path_factory, real_images):
    """128 real images whose label is their index, in order, in 4 shards of 32."""
    images, _ = real_images
    return make_shards(
        tmp_path_factory.mktemp("numbered") / "s", images[:128], np.arange(128), "--per-shard", "32", "--no-shuffle"
    )


def with_counts(src, dst, counts):
    """A copy of the shard folder ``src`` whose manifest claims ``counts``."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["shard_samples"] = counts
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("planned", [64, 8], ids=["doubled", "quartered"])
def test_a_wrong_count_costs_only_its_shard_and_is_reported(tmp_path, numbered_shards, planned):
    folder = with_counts(numbered_shards, tmp_path / "wrong", [planned] * 4)
    cfg = DataConfig(shards=str(folder), workers=2, shuffle_buffer=8)
    shards = resolve_shards(cfg)
    loaders = [
        Loader(
            ShardStream(shards, cfg, rank=r, world_size=2, batch_size=8, image_size=28, channels=1, seed=0),
            torch.device("cpu"),
        )  # fmt: skip
        for r in (0, 1)
    ]
    labels = [[i for _, y in loader.epoch(0) for i in y.tolist()] for loader in loaders]
    steps = 4 * planned // 16
    assert [len(rank) for rank in labels] == [steps * 8, steps * 8]  # every rank runs the planned steps
    seen = labels[0] + labels[1]
    found = {**loaders[0].miscounted, **loaders[1].miscounted}
    assert found == {f"shard-{i:06d}.tar": {"planned": planned, "found": 32} for i in range(4)}
    if planned > 32:  # each shard's missing half is filled with repeats; nothing is skipped
        assert sorted(set(seen)) == list(range(128)) and sum(ld.empty_positions for ld in loaders) >= 128
    else:  # only the first 8 of each shard are read, each once: no repeats
        assert len(set(seen)) == len(seen) == 32 and all(i % 32 < 8 for i in seen)


def test_a_run_reports_each_wrong_count_once_and_index_fixes_it(tmp_path, numbered_shards):
    folder = with_counts(numbered_shards, tmp_path / "wrong", [64] * 4)
    config = write_config(tmp_path / "wrong.yaml", folder, data={"workers": 2}, train={"steps": 48})  # 3 epochs
    result = run_module("dcgan.train", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    for i in range(4):
        assert result.stderr.count(f"shard {folder}/shard-{i:06d}.tar holds 32 samples, not the 64 planned") == 1
    assert f"`python -m dcgan.shards index {folder}` writes the true counts" in result.stderr
    summary = json.loads((tmp_path / "runs" / "wrong" / "summary.json").read_text())
    assert summary["data"]["miscounted_shards"] == [
        {"shard": f"shard-{i:06d}.tar", "planned": 64, "found": 32} for i in range(4)
    ]

    assert run_module("dcgan.shards", "index", str(folder), timeout=120).returncode == 0
    fixed = run_module("dcgan.train", "--config", str(config), "train.name=fixed", "train.steps=8")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "holds 32 samples" not in fixed.stderr and "shards with other counts than planned 0" in fixed.stderr


def test_full_size_images_without_a_manifest_are_flagged(tmp_path, real_images, caplog):
    big = Image.fromarray(real_images[0][0]).resize((64, 64))
    with wds.TarWriter(str(tmp_path / "000.tar")) as sink:
        for i in range(40):
            sink.write({"__key__": f"{i:03d}", "png": encode(big, "png")})
    config = write_config(tmp_path / "big.yaml", tmp_path, data={"samples_per_shard": 40})
    with caplog.at_level(logging.WARNING):
        plan_run(str(config), [], world_size=1)
    assert "the shards hold 64x64 images and model.image_size is 28" in caplog.text
    with pytest.raises(ConfigError, match="python -m dcgan.shards index"):
        plan_run(str(config), ["data.samples_per_shard=0"], world_size=1)


def test_a_shard_the_index_found_unreadable_is_left_out(tmp_path, numbered_shards):
    folder = tmp_path / "s"
    shutil.copytree(numbered_shards, folder)
    (folder / "manifest.json").unlink()
    (folder / "zz-broken.tar").write_bytes(b"not a tar file" * 100)
    indexed = run_module("dcgan.shards", "index", str(folder), timeout=120)
    assert indexed.returncode == 0 and "zz-broken.tar: unreadable after 0 samples" in indexed.stderr
    assert json.loads((folder / "manifest.json").read_text())["shard_samples"] == [32, 32, 32, 32, 0]
    cfg = DataConfig(shards=str(folder), workers=0, shuffle_buffer=8)
    stream = ShardStream(
        resolve_shards(cfg), cfg, rank=0, world_size=1, batch_size=8, image_size=28, channels=1, seed=0
    )
    loader = Loader(stream, torch.device("cpu"))
    labels = [i for _, y in loader.epoch(0) for i in y.tolist()]
    assert sorted(labels) == list(range(128)) and loader.unreadable_shards == 0  # never opened
