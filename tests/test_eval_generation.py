"""Generation metrics: FID/KID against closed forms and direct formulas, feature extraction, the shapes judge."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from mmlm.eval.generation_metrics import (
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
)
from mmlm.eval.shapes_judge import ShapesJudge, prompt_fidelity, target_kind_colour

# ------------------------------------------------------------------------------------------------ FID


@pytest.mark.parametrize("method", ["scipy", "eigh"])
def test_fid_of_a_set_with_itself_is_zero(method):
    feats = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(feats, feats, method=method)) < 1e-6


@pytest.mark.parametrize("method", ["scipy", "eigh"])
def test_fid_of_a_mean_shift_is_the_squared_shift(method):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))  # correlated features
    shift = rng.normal(size=8)
    expected = float(shift @ shift)
    assert frechet_distance(feats, feats + shift, method=method) == pytest.approx(expected, rel=1e-6)
    distances = [frechet_distance(feats, feats + t * shift, method=method) for t in (0.5, 1.0, 2.0)]
    assert distances == sorted(distances)


@pytest.mark.parametrize("method", ["scipy", "eigh"])
def test_fid_matches_the_gaussian_closed_form(method):
    # diagonal covariances commute: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(s1) - sqrt(s2))^2
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = float(((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum())
    got = frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b), method=method)
    assert got == pytest.approx(expected, rel=1e-9)
    # and from samples: close to the population value
    rng = np.random.default_rng(2)
    a = mu_a + rng.normal(size=(20000, 3)) * np.sqrt(var_a)
    b = mu_b + rng.normal(size=(20000, 3)) * np.sqrt(var_b)
    assert frechet_distance(a, b, method=method) == pytest.approx(expected, rel=0.03)


def test_fid_methods_agree_on_full_covariances_and_rank_deficiency_is_finite():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(100, 6)) @ rng.normal(size=(6, 6)), rng.normal(size=(100, 6)) * 2 + 1
    assert frechet_distance(a, b, method="scipy") == pytest.approx(frechet_distance(a, b, method="eigh"), rel=1e-6)
    few_a, few_b = rng.normal(size=(5, 32)), rng.normal(size=(5, 32))  # fewer samples than dimensions
    assert math.isfinite(frechet_distance(few_a, few_b))
    mu, sigma = feature_statistics(a)
    assert mu.shape == (6,) and sigma.shape == (6, 6)


def test_fid_input_errors():
    with pytest.raises(ValueError, match="feature dims differ"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\[num_samples, dim\]"):
        frechet_distance(np.zeros(3), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((3, 2), np.nan), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros((3, 2)), np.zeros((3, 2)), method="svd")


# ------------------------------------------------------------------------------------------------ KID


def _mmd2_direct(x, y, degree=3, coef0=1.0):
    gamma = 1.0 / x.shape[1]
    k = lambda u, v: (gamma * float(u @ v) + coef0) ** degree  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_the_unbiased_mmd_formula():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 5)) + 0.5
    # with subset_size = n every subset is a permutation of the whole set: one exact value, zero spread
    kid = kernel_inception_distance(x, y, subset_size=7, num_subsets=3)
    assert kid["kid_mean"] == pytest.approx(_mmd2_direct(x, y), rel=1e-9)
    assert kid["kid_std"] == pytest.approx(0.0, abs=1e-12)


def test_kid_small_sets_and_ordering():
    rng = np.random.default_rng(5)
    a, b, shifted = rng.normal(size=(40, 8)), rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) + 1.0
    same = kernel_inception_distance(a, b, num_subsets=20)  # default subset_size = 30 // 2
    different = kernel_inception_distance(a, shifted, num_subsets=20)
    assert abs(same["kid_mean"]) < different["kid_mean"]
    assert same["kid_std"] > 0 and different["kid_std"] > 0  # subsets differ: the spread is measured
    tiny = kernel_inception_distance(torch.randn(3, 4), torch.randn(2, 4), num_subsets=2)
    assert math.isfinite(tiny["kid_mean"]) and math.isfinite(tiny["kid_std"])
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(a, b, subset_size=31)


# ------------------------------------------------------------------------------------------ features


class TinyExtractor(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.conv(x))  # a [B, C, H, W] map: pooled by extract_features


def test_extract_features_from_tensors_and_pil_images():
    torch.manual_seed(0)
    model = TinyExtractor().train()
    images = torch.rand(10, 3, 8, 8)
    feats = extract_features(model, images, batch_size=4)
    assert feats.shape == (10, 6) and feats.dtype == torch.float32
    assert model.training  # mode restored
    assert torch.allclose(feats, extract_features(model, images, batch_size=10), atol=1e-6)  # eval mode, no dropout
    assert torch.allclose(feats, model.eval().conv(images).mean(dim=(2, 3)), atol=1e-6)
    pils = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in images]
    from_pil = extract_features(model, pils, batch_size=3)
    assert torch.allclose(from_pil, feats, atol=1e-2)
    with_transform = extract_features(model, pils, transform=lambda im: torch.zeros(3, 8, 8))
    assert torch.allclose(with_transform, with_transform[:1].expand(10, -1))


def test_extract_features_pools_token_outputs():
    model = nn.Sequential(nn.Flatten(2), nn.Linear(16, 5))  # [B, 3, 4, 4] -> [B, 3, 5] "tokens"
    feats = extract_features(model, torch.rand(4, 3, 4, 4))
    assert feats.shape == (4, 5)


# -------------------------------------------------------------------------------------- shapes judge

PALETTE = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 80, 220), "orange": (250, 135, 0)}
KINDS = ["circle", "square", "triangle"]


def draw_shape(kind, colour, rng, size=48):
    """A single anti-aliased shape on a light gradient background with mild noise (the test's own data)."""
    scale = 4
    ramp = np.linspace(-0.5, 0.5, size)
    base, amplitude = rng.uniform(215, 250, 3), rng.uniform(0, 20, 3)
    background = base + (ramp[None, :, None] * amplitude).repeat(size, 0)
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8)).resize((size * scale,) * 2)
    draw = ImageDraw.Draw(canvas)
    r = rng.uniform(0.12, 0.3) * size * scale
    cx, cy = rng.uniform(r + 2, size * scale - r - 2, size=2)
    rgb = tuple(int(v) for v in np.clip(np.array(PALETTE[colour]) + rng.integers(-10, 11, 3), 0, 255))
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif kind == "square":
        draw.rectangle((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=rgb)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=rgb)
    image = np.asarray(canvas.reduce(scale), np.int16) + rng.integers(-5, 6, (size, size, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def make_records(n, seed):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        kind, colour = KINDS[i % len(KINDS)], list(PALETTE)[rng.integers(len(PALETTE))]
        records.append({"image": draw_shape(kind, colour, rng), "attributes": {"kind": kind, "colour": colour}})
    return records


@pytest.fixture(scope="module")
def trained_judge():
    judge = ShapesJudge(kinds=KINDS, palette=PALETTE, image_size=32, width=8)
    info = judge.fit(make_records(240, seed=0), steps=150, batch_size=32, lr=5e-3)
    return judge, info


def test_judge_learns_kind_and_measures_colour(trained_judge):
    judge, info = trained_judge
    assert info["steps"] == 150 and info["train_loss"] < 1.0
    scores = judge.evaluate(make_records(60, seed=1))
    assert scores["colour_accuracy"] == 1.0
    assert scores["kind_accuracy"] >= 0.85
    assert scores["num_images"] == 60


def test_colour_measurement_handles_gradients_edges_and_blank_images():
    judge = ShapesJudge(kinds=KINDS, palette=PALETTE)
    rng = np.random.default_rng(7)
    tiny_orange = [draw_shape("circle", "orange", rng, size=16) for _ in range(5)]  # mostly anti-aliased edge
    assert judge.predict_colours(tiny_orange) == ["orange"] * 5
    blank = Image.new("RGB", (32, 32), (235, 235, 240))
    edge = Image.new("RGB", (32, 32), (235, 235, 240))
    ImageDraw.Draw(edge).rectangle((0, 0, 14, 14), fill=PALETTE["blue"])  # touches the border
    assert judge.predict_colours([blank, edge]) == [None, "blue"]
    tensor = torch.from_numpy(np.asarray(tiny_orange[0], np.float32) / 255).permute(2, 0, 1)
    assert judge.predict_colours([tensor]) == ["orange"]


def test_prompt_fidelity_scores_against_targets(trained_judge):
    judge, _ = trained_judge
    records = make_records(30, seed=2)
    images = [r["image"] for r in records]
    right = prompt_fidelity(images, [r["attributes"] for r in records], judge)
    wrong_colour = [{"kind": r["attributes"]["kind"], "colour": "not-a-colour"} for r in records]
    wrong = prompt_fidelity(images, wrong_colour, judge)
    assert right["fidelity"] >= 0.8 and right["colour_accuracy"] == 1.0
    assert wrong["colour_accuracy"] == 0.0 and wrong["fidelity"] == 0.0
    assert wrong["kind_accuracy"] == right["kind_accuracy"]
    with pytest.raises(ValueError, match="differ in length"):
        prompt_fidelity(images, wrong_colour[:3], judge)


def test_judge_save_load_round_trip(trained_judge, tmp_path):
    judge, _ = trained_judge
    path = judge.save(tmp_path / "judge.safetensors")
    loaded = ShapesJudge.load(path)
    images = [r["image"] for r in make_records(12, seed=3)]
    assert loaded.judge(images) == judge.judge(images)
    assert loaded.config == judge.config
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a ShapesJudge file"):
        ShapesJudge.load(tmp_path / "other.safetensors")


def test_judge_input_errors():
    judge = ShapesJudge(kinds=KINDS, palette=PALETTE)
    with pytest.raises(ValueError, match=r"records\[0\]: kind 'hexagon'"):
        judge.fit([{"image": Image.new("RGB", (8, 8)), "attributes": {"kind": "hexagon", "colour": "red"}}], steps=1)
    with pytest.raises(ValueError, match="expected keys 'kind' and 'colour'"):
        target_kind_colour({"count": 1})
    assert target_kind_colour({"shapes": [{"kind": "star", "colour": "red"}], "count": 1}) == ("star", "red")
    with pytest.raises(ValueError, match="at least 2 shape kinds"):
        ShapesJudge(kinds=["circle"], palette=PALETTE)


@pytest.mark.slow
def test_judge_on_the_real_shapes_dataset():
    shapes = pytest.importorskip("mmlm.data.shapes")
    from mmlm.eval.shapes_judge import train_shapes_judge

    judge, report = train_shapes_judge(steps=600, n_train=2000, n_test=300)
    assert judge.config.kinds == list(shapes.SHAPE_KINDS)
    for split in ("test", "compositional"):  # compositional: colour-kind pairs never seen in training
        assert report[split]["colour_accuracy"] >= 0.99, report
        assert report[split]["kind_accuracy"] >= 0.97, report
