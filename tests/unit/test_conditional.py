"""``model.conditional``: G given a class with z, D a projection of the class
(dcgan/models/conditional.py), the class count from the shards, the grid's rows and the
evaluation's classes. Exact resume with labels through the reader and the cache, on one and
two ranks: tests/e2e/test_losses_resume.py."""

import pytest
import torch

from conftest import make_shards
from dcgan.base.checks import ConfigError
from dcgan.base.images import to_uint8
from dcgan.config.loading import load_config
from dcgan.config.sections import EvalConfig
from dcgan.data.shardset import resolve_shards
from dcgan.models.conditional import grid_labels
from dcgan.models.networks import ARCH_IMAGE_SIZE, build_models
from dcgan.preflight import settle_classes
from dcgan.quality.evaluator import Evaluator, evaluation_labels
from dcgan.quality.scores import fid_score
from dcgan.run.distributed import DistInfo
from dcgan.training.setup import build_training
from dcgan.training.step import StepSettings, gan_step

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


def conditional(arch: str, *overrides: str):
    size = ARCH_IMAGE_SIZE[arch]
    return load_config(None, [
        f"model.arch={arch}", f"model.image_size={size}", f"model.channels={1 if size == 28 else 3}",
        "model.nz=8", "model.ngf=4", "model.ndf=4", "model.conditional=true", "model.num_classes=5",
        "train.batch_size=4", *overrides,
    ])  # fmt: skip


@pytest.mark.parametrize("arch", sorted(ARCH_IMAGE_SIZE))
def test_g_and_d_answer_to_the_class_in_every_architecture(arch):
    cfg = conditional(arch)
    torch.manual_seed(0)
    G, D = build_models(cfg)
    G.eval(), D.eval()
    m, size = cfg.model, cfg.model.image_size
    z = torch.randn(4, m.nz, 1, 1)
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 4, 4, 4])
    images = G(z, a)
    assert images.shape == (4, m.channels, size, size)
    assert not torch.equal(images, G(z, b))  # the same z, another class: another image
    logits = D(images, a)
    assert logits.shape == (4,) and not torch.equal(logits, D(images, b))
    # The projection: D(x, y) - D(x, y') = <embed(y) - embed(y'), D's features summed over positions>.
    h = D.body(images)
    pooled = h.sum(dim=(2, 3)) if h.dim() == 4 else h
    torch.testing.assert_close(logits - D(images, b), ((D.embed(a) - D.embed(b)) * pooled).sum(1))


def test_a_conditional_step_trains_the_class_embeddings_of_both_nets():
    cfg = conditional("celeba", "loss.kind=hinge", "loss.r1_gamma=1", "model.spectral_norm=true")
    state, g_train, d_train = build_training(cfg, CPU)
    g_before = state.generator.embed.weight.detach().clone()
    d_embed = next(p for n, p in state.discriminator.named_parameters() if n.startswith("embed"))
    d_before = d_embed.detach().clone()
    real, labels = torch.rand(4, 3, 64, 64) * 2 - 1, torch.tensor([0, 1, 1, 3])
    stats = gan_step(state, g_train, d_train, [real], StepSettings.of(cfg), r1_due=True, labels=[labels])
    assert torch.isfinite(stats).all()
    moved = (state.generator.embed.weight.detach() - g_before).abs().sum(1)
    assert (moved[[0, 1, 3]] > 0).all() and moved[[2, 4]].eq(0).all()  # only the classes in the batch
    assert not torch.equal(d_embed.detach(), d_before)


def test_the_class_count_comes_from_the_shards_and_shards_without_classes_are_refused(tmp_path, real_images):
    images, labels = real_images
    labelled = resolve_shards(
        load_config(None, [f"data.shards={make_shards(tmp_path / 'a', images[:40], labels[:40])}"]).data
    )
    unlabelled_dir = make_shards(tmp_path / "b", images[:40])
    unlabelled = resolve_shards(load_config(None, [f"data.shards={unlabelled_dir}"]).data)
    cfg = load_config(None, ["model.conditional=true"])
    assert settle_classes(cfg, labelled).model.num_classes == len(labelled.classes) == 10
    assert cfg.model.num_classes == 0  # settled on a copy
    with pytest.raises(ConfigError, match="model.conditional: the shards of data.shards=.* carry no classes") as e:
        settle_classes(cfg, unlabelled)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model.num_classes: 3, but the shards hold 10 classes"):
        settle_classes(load_config(None, ["model.conditional=true", "model.num_classes=3"]), labelled)
    with pytest.raises(ConfigError, match="model.num_classes: is for a conditional model"):
        load_config(None, ["model.num_classes=3"])


def test_the_grid_has_a_row_per_class_and_evaluations_draw_the_same_classes_each_time():
    assert grid_labels(3, 64).tolist() == [0] * 21 + [1] * 21 + [2] * 21
    assert grid_labels(100, 64).tolist() == list(range(100))  # at least one image a class
    drawn = evaluation_labels(1000, 10, seed=0)
    assert torch.equal(drawn, evaluation_labels(1000, 10, seed=0)) and set(drawn.tolist()) == set(range(10))
    assert evaluation_labels(5, 10, 0, label=7).tolist() == [7] * 5 and evaluation_labels(5, 0, 0) is None


class Pixels(torch.nn.Module):
    """A stand-in extractor: a 4x4 image's 16 pixels are its features."""

    num_features = 16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().flatten(1)


def test_intra_class_fid_scores_each_class_against_its_own_real_images():
    """Class k's generated images against the real images labelled k only; a class with
    under 2 real images is left out of the mean, the same split on every rank."""
    evaluator = Evaluator(Pixels(), torch.empty(0), EvalConfig(num_samples=40, batch_size=7, seed=3), CPU)

    def sample(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # class k: brighter with k
        return torch.tanh(z.flatten(1) * 0.3 + labels[:, None] * 0.4 - 0.6).view(-1, 1, 4, 4)

    gen = torch.Generator().manual_seed(0)
    real_labels = torch.tensor([0] * 30 + [1] * 25 + [2] * 1 + [-1] * 4)  # class 2: one image; -1: unlabelled
    real = torch.rand(len(real_labels), 16, generator=gen) * 60 + real_labels[:, None].clamp(min=0) * 50
    intra = evaluator.intra_class_fid(sample, 16, 3, 12, (real, real_labels))
    assert intra["real"] == [30, 25, 1] and intra["skipped"] == [2] and intra["generated"] == 12
    z = torch.randn(12, 16, 1, 1, generator=torch.Generator().manual_seed(3))  # eval.seed's latents for each class
    expected = [fid_score(real[real_labels == k], Pixels()(to_uint8(sample(z, torch.full((12,), k))))) for k in (0, 1)]
    assert intra["fid"][:2] == pytest.approx(expected, rel=1e-5) and intra["fid"][2] is None
    assert intra["intra_fid"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert expected[0] != pytest.approx(expected[1])
