"""dcgan.shards writes what it reads: folders, IDX (gz or not) and arrays round-trip."""

import gzip
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import FASHION_MNIST
from dcgan.shards import main as shards_main


def read_back(out_dir, mode="l8"):
    """{key: (image array, label)} from the shards, read with webdataset's own decoder."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    urls = [str(out_dir / name) for name in manifest["shards"]]
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode(mode):
        image = next(sample[k] for k in ("png", "jpg", "npy") if k in sample)
        samples[sample["__key__"]] = (image, int(sample["cls"]) if "cls" in sample else -1)
    return manifest, samples


def write_idx(path, array, magic_dim):
    header = bytes([0, 0, 8, magic_dim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_folder_with_classes_any_format_and_a_corrupt_file(tmp_path, real_images):
    images, _ = real_images
    root = tmp_path / "photos"
    expected = {}
    for i, (cls, ext) in enumerate(
        [("cat", "png"), ("cat", "bmp"), ("dog", "jpg"), ("dog/nested", "gif"), ("dog", "tiff")]
    ):
        (root / cls).mkdir(parents=True, exist_ok=True)
        rgb = np.stack([images[i]] * 3, -1)
        Image.fromarray(rgb).save(root / cls / f"img{i}.{ext}")
        expected[f"img{i}"] = (rgb, 0 if cls == "cat" else 1, ext in ("png", "bmp", "gif", "tiff"))
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    out = tmp_path / "shards"
    assert shards_main([str(root), str(out), "--per-shard", "2", "--workers", "2"]) == 0

    manifest, samples = read_back(out, "rgb8")
    assert manifest["samples"] == 5 and manifest["shard_samples"] == [2, 2, 1]
    assert manifest["classes"] == ["cat", "dog"] and manifest["channels"] == 3 and manifest["image_size"] == 28
    assert manifest["skipped"] == 1 and manifest["skipped_items"][0]["name"].endswith("dog/broken.png")
    labels = sorted(label for _, label in samples.values())
    assert labels == [0, 0, 1, 1, 1]
    # every lossless image comes back bit for bit (matched by content: keys are write order)
    stored = [img for img, _ in samples.values()]
    for rgb, _, lossless in expected.values():
        if lossless:
            assert any(np.array_equal(rgb, s) for s in stored)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_files_round_trip(tmp_path, real_images, suffix):
    images, labels = real_images
    src = tmp_path / "idx"
    src.mkdir()
    write_idx(src / f"train-images-idx3-ubyte{suffix}", images[:30], 3)
    write_idx(src / f"train-labels-idx1-ubyte{suffix}", labels[:30], 1)
    write_idx(src / f"t10k-images-idx3-ubyte{suffix}", images[30:40], 3)
    write_idx(src / f"t10k-labels-idx1-ubyte{suffix}", labels[30:40], 1)
    out = tmp_path / "out"
    assert shards_main([str(src), str(out), "--no-shuffle", "--per-shard", "16", "--workers", "1"]) == 0
    manifest, samples = read_back(out)
    assert manifest["samples"] == 40 and manifest["shard_samples"] == [16, 16, 8]
    # folder order is sorted (t10k before train); --no-shuffle keeps it
    order = np.concatenate([np.arange(30, 40), np.arange(30)])
    for key, (image, label) in samples.items():
        src_index = order[int(key)]
        assert np.array_equal(image, images[src_index]) and label == labels[src_index]


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_test_split(tmp_path):
    out = tmp_path / "fm"
    assert shards_main([str(FASHION_MNIST / "t10k-images-idx3-ubyte.gz"), str(out), "--workers", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 10000 and manifest["image_size"] == 28 and len(manifest["classes"]) == 10


def test_float_npz_with_resize_and_jpg(tmp_path, real_images):
    images, labels = real_images
    floats = images[:20].astype(np.float32) / 255.0  # [0, 1] floats
    np.savez(tmp_path / "a.npz", images=floats, labels=labels[:20])
    out = tmp_path / "out"
    assert shards_main([str(tmp_path / "a.npz"), str(out), "--size", "14", "--format", "jpg", "--workers", "1"]) == 0
    manifest, samples = read_back(out)
    assert manifest["image_size"] == 14 and manifest["image_format"] == "jpg"
    assert all(img.shape == (14, 14) for img, _ in samples.values())
    assert sorted(label for _, label in samples.values()) == sorted(labels[:20].tolist())


def test_nchw_npy_to_npy_members(tmp_path, real_images):
    images, _ = real_images
    rgb_nchw = np.stack([images[:6]] * 3, 1)  # (6, 3, 28, 28)
    np.save(tmp_path / "a.npy", rgb_nchw)
    out = tmp_path / "out"
    assert shards_main([str(tmp_path / "a.npy"), str(out), "--format", "npy", "--no-shuffle", "--workers", "1"]) == 0
    manifest, samples = read_back(out)
    assert manifest["channels"] == 3 and manifest["classes"] == []
    assert np.array_equal(samples["000000000"][0], rgb_nchw[0].transpose(1, 2, 0))
    assert samples["000000000"][1] == -1  # no label member


def test_resize_is_shorter_side_then_center_crop(tmp_path):
    wide = np.zeros((20, 40), np.uint8)
    wide[:, 10:30] = 255  # a white centre square on black side bands
    np.save(tmp_path / "wide.npy", wide[None])
    out = tmp_path / "out"
    assert shards_main([str(tmp_path / "wide.npy"), str(out), "--size", "10", "--workers", "1"]) == 0
    _, samples = read_back(out)
    ((image, _),) = samples.values()
    assert image.shape == (10, 10)
    assert image[:, 1:-1].min() == 255 and image.min() > 128  # the bands were cropped away (edges blur)


def test_bad_sources_exit_2(tmp_path, capsys):
    assert shards_main([str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert shards_main([str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    assert "no image files found" in capsys.readouterr().err
    bad_idx = tmp_path / "x-images-idx3-ubyte"
    bad_idx.write_bytes(bytes([0, 0, 8, 3]) + (100).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 50)
    assert shards_main([str(bad_idx), str(tmp_path / "o")]) == 2
    assert "truncated?" in capsys.readouterr().err


def test_existing_shards_are_not_overwritten_by_accident(tmp_path, real_images):
    np.save(tmp_path / "a.npy", real_images[0][:4])
    out = tmp_path / "out"
    assert shards_main([str(tmp_path / "a.npy"), str(out), "--workers", "1"]) == 0
    assert shards_main([str(tmp_path / "a.npy"), str(out), "--workers", "1"]) == 2
    assert shards_main([str(tmp_path / "a.npy"), str(out), "--workers", "1", "--overwrite"]) == 0


def test_same_source_same_bytes_and_one_header_per_member(tmp_path, real_images):
    """Shards are reproducible (checksums stay valid across rewrites), and each member
    has a single ustar header: a PAX header per member doubled the shards of small images
    and the time spent parsing them."""
    images, labels = real_images
    np.savez(tmp_path / "a.npz", x=images[:40], y=labels[:40])
    first, second = tmp_path / "first", tmp_path / "second"
    for out, workers in ((first, "1"), (second, "2")):
        assert shards_main([str(tmp_path / "a.npz"), str(out), "--per-shard", "16", "--workers", workers]) == 0
    for tar in sorted(first.glob("*.tar")):
        assert tar.read_bytes() == (second / tar.name).read_bytes()
    with tarfile.open(first / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert len(members) == 32 and all(not m.pax_headers for m in members)  # 16 x (.png, .cls)
    assert (first / "shard-000000.tar").stat().st_size <= 32 * (512 + 512 + 1024)
