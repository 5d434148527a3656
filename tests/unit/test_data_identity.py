"""A checkpoint knows the data it was trained on by content, not only by shard names and
counts; and ``python -m dcgan.shards`` writes a folder of one's own images truthfully
(no unlabelled strays, keys that name their source image, mixed sizes said as such)."""

import gzip
import io
import json
import logging
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_shards, run_module, write_config
from dcgan.checkpoint import files, resume
from dcgan.config.sections import DataConfig
from dcgan.data.shardset import describe_change, first_image_size, resolve_shards, shard_digest, tar_header_names
from dcgan.data.stream import read_images
from dcgan.preflight import warn_if_resized
from dcgan.shards import main as shards_main


def identity(folder) -> dict:
    return resolve_shards(DataConfig(shards=str(folder))).identity()


def rewrite_tar(path: Path, change) -> None:
    """Rewrite the shard at ``path`` member by member, ``change(name, data)`` giving each
    member's new bytes; the manifest beside it is left as it was."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            data = change(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


# --------------------------------------------------------------------------- resuming on rebuilt shards


@pytest.mark.e2e  # starts processes
def test_a_resume_on_the_same_images_rewritten_at_another_size_is_refused(tmp_path, real_images):
    images, labels = real_images
    shards = make_shards(tmp_path / "data", images[:128], labels[:128], "--per-shard", "32")
    config = write_config(tmp_path / "run.yaml", shards)
    assert run_module("dcgan.train", "--config", str(config)).returncode == 0
    run_dir = tmp_path / "runs" / "run"
    saved = files.load(files.checkpoint_path(run_dir / "checkpoints", 6))["data"]
    assert len(saved["content"]) == 4 and all(size > 0 for size, _ in saved["content"])

    # The same images, names and counts; each shard's bytes differ.
    source = tmp_path / "data-source.npz"
    assert (
        shards_main([str(source), str(shards), "--workers", "1", "--per-shard", "32", "--size", "64", "--overwrite"])
        == 0
    )
    now = identity(shards)
    assert (now["shards"], now["counts"], now["fingerprint"]) == (
        saved["shards"],
        saved["counts"],
        saved["fingerprint"],
    )

    change = re.compile(r"shard-000000\.tar: content changed \(bytes \d+ -> \d+\)")
    dry = run_module("dcgan.train", "--config", str(config), "train.steps=9", "--dry-run")
    assert dry.returncode == 2 and change.search(dry.stderr), dry.stderr
    refused = run_module("dcgan.train", "--config", str(config), "train.steps=9")
    assert refused.returncode == 2 and change.search(refused.stderr), refused.stderr
    assert "(4 of 4 shards)" in refused.stderr and "train.data_changed=continue" in refused.stderr

    go_on = run_module("dcgan.train", "--config", str(config), "train.steps=9", "train.data_changed=continue")
    assert go_on.returncode == 0, go_on.stderr
    assert re.search(r"resumed from \S+ at step 6", go_on.stderr)
    assert re.search(r"the data changed \(shard-000000\.tar: content changed \(bytes", go_on.stderr)
    assert files.load(files.checkpoint_path(run_dir / "checkpoints", 9))["data"]["content"] == now["content"]


def test_a_checkpoint_from_before_content_identities_resumes_on_names_and_counts(tmp_path, digit_shards, caplog):
    """Its identity has no "content": what both hold (names, counts) is compared, and the log says so."""
    now = resolve_shards(DataConfig(shards=str(digit_shards)))
    old = {k: v for k, v in now.identity().items() if k in ("fingerprint", "samples", "shards", "counts")}
    with caplog.at_level(logging.INFO):
        assert resume.check_same_data(old, now, tmp_path / "step_00000006.pt", "refuse") is None
    assert "compared by names and counts only" in caplog.text
    fewer = {**old, "shards": old["shards"][:-1], "counts": old["counts"][:-1], "fingerprint": "0" * 16}
    assert "added shard-000005.tar" in describe_change(fewer, now.identity())  # names and counts still count


# --------------------------------------------------------------------------- what the content covers


def test_content_is_where_the_data_lies_not_which_folder_or_when_copied(tmp_path, digit_shards):
    """A copy that does not keep mtimes (the manifest's records no longer vouch) reads the
    headers again, and finds what the writer recorded."""
    copy = tmp_path / "copy"
    shutil.copytree(digit_shards, copy, copy_function=shutil.copyfile)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert all(
        r["mtime_ns"] != (copy / n).stat().st_mtime_ns for n, r in zip(manifest["shards"], manifest["shard_content"])
    )
    assert [r["digest"] for r in manifest["shard_content"]] == [shard_digest(str(copy / n)) for n in manifest["shards"]]
    assert describe_change(identity(digit_shards), identity(copy)) is None


def test_a_shard_edited_in_place_is_seen_though_its_size_stays(tmp_path, digit_shards):
    """One member a byte shorter: the tar keeps its size (512-byte blocks) and its manifest
    record, but its mtime moved, so its headers are read and their digest differs."""
    copy = tmp_path / "copy"
    shutil.copytree(digit_shards, copy)
    before = identity(copy)
    shard = copy / "shard-000002.tar"
    size = shard.stat().st_size
    rewrite_tar(shard, lambda name, data: data[:-1] if name.startswith("000000") and name.endswith(".png") else data)
    assert shard.stat().st_size == size
    change = describe_change(before, identity(copy))
    assert change == f"shard-000002.tar: content changed (the same {size} bytes, members of other names or sizes)"


def test_remote_shards_are_identified_by_names_and_counts_and_the_log_says_so(digit_shards, caplog):
    local = identity(digit_shards)
    spec = f"pipe:cat {digit_shards}/shard-{{000000..000005}}.tar"
    with caplog.at_level(logging.INFO):
        remote = resolve_shards(DataConfig(shards=spec, samples_per_shard=100)).identity()
        resolve_shards(DataConfig(shards=spec, samples_per_shard=100)).identity()
    assert remote["content"] == [None] * 6 and remote["content_fingerprint"] is None
    assert caplog.text.count("checkpoints record their names and counts, not their content") == 1
    same_counts = {
        **local,
        "counts": remote["counts"],
        "samples": remote["samples"],
        "fingerprint": remote["fingerprint"],
    }
    assert describe_change(same_counts, remote) is None  # the local content is not compared with nothing


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_header_walk_finds_the_members_tarfile_finds(tmp_path, fmt):
    """Long names (a ustar prefix, a GNU long name, a PAX path), a PAX header per member
    (webdataset's float mtimes), a folder entry: the same names and sizes as tarfile's."""
    path = tmp_path / "x.tar"
    names = ["a.png", "deep/" * 20 + "b.png", "d/e.cls"] + (["c" * 120 + ".png"] if fmt != tarfile.USTAR_FORMAT else [])
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 700 * i, 1.5 if fmt == tarfile.PAX_FORMAT else 0
            tar.addfile(info, io.BytesIO(b"x" * info.size))
    with tarfile.open(path) as tar:
        expected = [b"%s\0%d" % (m.name.encode(), m.size) for m in tar.getmembers() if m.isreg()]
    assert tar_header_names(path.read_bytes()) == expected
    cut = path.read_bytes()[:1500]  # cut inside the second member: the walk says where it stopped
    assert tar_header_names(cut)[-1].startswith(b"headers end at byte")


def test_a_gzipped_shard_is_known_by_the_checksum_of_the_tar_inside(tmp_path):
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = tarfile.TarInfo("000.png")
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    a.write_bytes(gzip.compress(tar.getvalue(), mtime=0))
    b.write_bytes(gzip.compress(tar.getvalue().replace(b"abc", b"abd"), mtime=0))
    assert a.stat().st_size == b.stat().st_size and shard_digest(str(a)) != shard_digest(str(b))


# --------------------------------------------------------------------------- shards from one's own folder


def save(path: Path, size=(28, 28), value=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_an_image_beside_the_class_folders_is_refused_by_name(tmp_path, capsys):
    root = tmp_path / "photos"
    for i, cls in enumerate(["cat", "dog"]):
        save(root / cls / f"{i}.png")
    save(root / "stray.png")
    assert shards_main([str(root), str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stray.png" in err and "move them into a class folder (cat, dog)" in err
    assert not list((tmp_path / "out").glob("*.tar"))
    (root / "stray.png").unlink()  # a folder with no class folders at all is unlabelled, as before
    save(tmp_path / "flat" / "a.png")
    assert shards_main([str(tmp_path / "flat"), str(tmp_path / "flat-out"), "--workers", "1"]) == 0


def test_a_corrupt_sample_names_the_image_it_came_from(tmp_path, caplog):
    root = tmp_path / "photos"
    save(root / "cat" / "tabby one.png", value=10)
    save(root / "dog" / "rex.v2.png", value=20)
    out = tmp_path / "out"
    assert shards_main([str(root), str(out), "--workers", "1", "--no-shuffle"]) == 0
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = sorted(tar.getnames())
    assert names == ["000000000-cat_tabby_one_png.cls", "000000000-cat_tabby_one_png.png",
                     "000000001-dog_rex_v2_png.cls", "000000001-dog_rex_v2_png.png"]  # fmt: skip
    rewrite_tar(
        out / "shard-000000.tar",
        lambda name, data: b"\0" * len(data) if "rex" in name and name.endswith("png") else data,
    )
    with caplog.at_level(logging.WARNING):
        images, labels = read_images(resolve_shards(DataConfig(shards=str(out))), None, 3, 28)
    assert len(images) == 1 and labels.tolist() == [0]
    assert "skipping corrupt sample 000000001-dog_rex_v2_png in" in caplog.text


def test_mixed_sizes_are_recorded_as_mixed_and_no_one_size_is_claimed(tmp_path, caplog):
    root = tmp_path / "photos"
    save(root / "a.png", (50, 50))
    save(root / "b.png", (64, 48))
    save(root / "c.png", (64, 48))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert shards_main([str(root), str(out), "--workers", "1", "--no-shuffle"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_size"] is None and manifest["image_sizes"] == {"64x48": 2, "50x50": 1}
    assert "the images are of 2 sizes (64x48: 2, 50x50: 1)" in caplog.text and "--size S" in caplog.text
    caplog.clear()
    shards = resolve_shards(DataConfig(shards=str(out)))
    assert first_image_size(shards) is None  # the first image is 50x50: not the set's size
    with caplog.at_level(logging.WARNING):
        warn_if_resized(shards, 64)
    assert "hold 50x50" not in caplog.text
    assert "the shards hold images of 2 sizes (64x48: 2, 50x50: 1): each is resized and centre-cropped to 64x64" in (
        caplog.text
    )
