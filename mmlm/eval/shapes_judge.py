"""Prompt fidelity on the shapes data, judged independently of the generator.

``ShapesJudge`` measures colour from pixels (the dominant foreground colour, mapped to the nearest named
palette colour) and kind with a tiny 3-conv CNN trained on real shapes; ``prompt_fidelity`` scores generated
images against their prompts' attributes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmlm.eval.plots import to_pil



def _shapes_palette() -> dict[str, tuple[int, int, int]]:
    from mmlm.data.shapes import COLOURS  # imported when needed: the judge also works with its own palette

    return {name: tuple(rgb) for name, rgb in COLOURS.items()}


def _shapes_kinds() -> list[str]:
    from mmlm.data.shapes import SHAPE_KINDS

    return list(SHAPE_KINDS)


def target_kind_colour(attributes: Mapping[str, Any]) -> tuple[str, str]:
    """(kind, colour) of the main shape: ``attributes["kind"/"colour"]`` or the first of ``attributes["shapes"]``."""
    if not isinstance(attributes, Mapping):
        raise TypeError(f"attributes: expected a mapping with kind and colour, got {type(attributes).__name__}")
    source = attributes
    if "kind" not in attributes and attributes.get("shapes"):
        source = attributes["shapes"][0]
    try:
        return source["kind"], source["colour"]
    except KeyError as err:
        raise ValueError(f"attributes {dict(attributes)!r}: expected keys 'kind' and 'colour' (or 'shapes')") from err


def _record_parts(record: Any) -> tuple[Any, Mapping[str, Any]]:
    if isinstance(record, Mapping):
        return record["image"], record["attributes"]
    return record.image, record.attributes


@dataclass
class ShapesJudgeConfig:
    """What a ShapesJudge needs besides its weights (saved in the safetensors metadata)."""

    kinds: list[str]
    palette: dict[str, tuple[int, int, int]]
    image_size: int = 32
    width: int = 16
    foreground_threshold: float = 50.0  # RGB distance from the fitted background that counts as foreground
    min_foreground_fraction: float = 0.005


class KindNet(nn.Module):
    """Three conv layers and a linear head over a one-channel, colour-free foreground map."""

    def __init__(self, num_kinds: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
        )
        self.head = nn.Linear(4 * width, num_kinds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class ShapesJudge:
    """Independent prompt-fidelity checker for shapes images (meant for single-shape images).

    Both checks start from a background model: a plane a + b x + c y per RGB channel fitted (robustly, two
    passes) to the border pixels, which matches the dataset's light tints and linear gradients. Pixels far
    from it are foreground. Colour: the palette colour nearest to most foreground pixels. Kind: ``KindNet``
    on the foreground map normalised to [0, 1], so the kind classifier never sees colour and also judges
    colour-kind pairs it was not trained on. Images of any size are resized to ``image_size``.
    """

    def __init__(
        self,
        kinds: Sequence[str] | None = None,
        palette: Mapping[str, Sequence[int]] | None = None,
        image_size: int = 32,
        width: int = 16,
        foreground_threshold: float = 50.0,
    ):
        kinds = list(kinds) if kinds is not None else _shapes_kinds()
        palette = dict(palette) if palette is not None else _shapes_palette()
        if len(kinds) < 2:
            raise ValueError(f"kinds: expected at least 2 shape kinds, got {kinds}")
        for name, rgb in palette.items():
            if len(rgb) != 3:
                raise ValueError(f"palette[{name!r}]: expected an (r, g, b) triple, got {rgb!r}")
        if image_size < 8:
            raise ValueError(f"image_size: expected >= 8, got {image_size}")
        self.config = ShapesJudgeConfig(
            kinds=kinds, palette={k: tuple(int(c) for c in v) for k, v in palette.items()},
            image_size=image_size, width=width, foreground_threshold=foreground_threshold,
        )
        self.net = KindNet(len(kinds), width)
        self.net.eval()

    # ---- measurement ----

    def _pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """[N, 3, S, S] float in 0..255 at the judge's resolution."""
        size = self.config.image_size
        arrays = []
        for image in images:
            if isinstance(image, (str, Path)):
                with Image.open(image) as opened:
                    image = opened.convert("RGB")
            pil = to_pil(image)
            if pil.size != (size, size):
                pil = pil.resize((size, size), Image.BILINEAR, reducing_gap=None)
            arrays.append(np.asarray(pil, np.float32))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def background(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] background estimate: per image and channel, a plane fitted to the border pixels."""
        n, _, size, _ = pixels.shape
        ramp = torch.linspace(-1, 1, size)
        ys, xs = torch.meshgrid(ramp, ramp, indexing="ij")
        design = torch.stack([torch.ones_like(xs), xs, ys], dim=-1).reshape(-1, 3)  # [P, 3]
        border = torch.zeros(size, size, dtype=torch.bool)
        border[[0, -1], :] = True
        border[:, [0, -1]] = True
        values = pixels.reshape(n, 3, -1).transpose(1, 2)  # [N, P, 3]

        def fit(weights: torch.Tensor) -> torch.Tensor:
            weighted = design.unsqueeze(0) * weights.unsqueeze(-1)  # [N, P, 3]
            lhs = design.T.unsqueeze(0) @ weighted + 1e-6 * torch.eye(3)
            coef = torch.linalg.solve(lhs, weighted.transpose(1, 2) @ values)  # [N, 3, 3 channels]
            return design.unsqueeze(0) @ coef  # [N, P, 3]

        weights = border.reshape(1, -1).float().expand(n, -1)
        plane = fit(weights)
        # second pass without the border pixels that a shape touching the edge covers
        inliers = weights * (torch.linalg.vector_norm(values - plane, dim=-1) < self.config.foreground_threshold / 2)
        enough = inliers.sum(dim=1, keepdim=True) >= 8
        plane = fit(torch.where(enough, inliers, weights))
        return plane.transpose(1, 2).reshape(n, 3, size, size)

    def foreground_distance(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, S, S] RGB distance of each pixel from its image's fitted background."""
        return torch.linalg.vector_norm(pixels - self.background(pixels), dim=1)

    def _kind_inputs(self, distance: torch.Tensor) -> torch.Tensor:
        peak = distance.flatten(1).amax(dim=1).clamp_min(1.0).reshape(-1, 1, 1)
        return (distance / peak).unsqueeze(1)

    def predict_colours(self, images: Sequence[Any]) -> list[str | None]:
        """The palette name of each image's dominant foreground colour; None when no foreground is found.

        Anti-aliased edges mix the shape's colour with the background (mixed orange is close to yellow), so
        each foreground pixel p votes for the palette colour c whose mixing line bg + a (c - bg) passes
        nearest to it, rather than for the nearest colour.
        """
        pixels = self._pixels(images)
        background = self.background(pixels)
        names = list(self.config.palette)
        palette = torch.tensor([self.config.palette[n] for n in names], dtype=torch.float32)  # [K, 3]
        min_pixels = max(2, int(self.config.min_foreground_fraction * pixels[0, 0].numel()))
        colours: list[str | None] = []
        for image, bg in zip(pixels, background):
            offset = (image - bg).permute(1, 2, 0)  # [S, S, 3]
            mask = torch.linalg.vector_norm(offset, dim=-1) > self.config.foreground_threshold
            if int(mask.sum()) < min_pixels:
                colours.append(None)
                continue
            offset, bg_rgb = offset[mask], bg.permute(1, 2, 0)[mask]  # [M, 3]
            direction = palette.unsqueeze(0) - bg_rgb.unsqueeze(1)  # [M, K, 3]
            amount = (offset.unsqueeze(1) * direction).sum(-1) / direction.pow(2).sum(-1).clamp_min(1.0)
            residual = offset.unsqueeze(1) - amount.clamp(0.0, 1.25).unsqueeze(-1) * direction
            votes = torch.linalg.vector_norm(residual, dim=-1).argmin(dim=1)
            colours.append(names[int(torch.bincount(votes, minlength=len(names)).argmax())])
        return colours

    @torch.no_grad()
    def predict_kinds(self, images: Sequence[Any], batch_size: int = 256) -> list[str]:
        """The kind class of each image."""
        self.net.eval()
        kinds = []
        for start in range(0, len(images), batch_size):
            inputs = self._kind_inputs(self.foreground_distance(self._pixels(images[start : start + batch_size])))
            kinds.extend(self.config.kinds[i] for i in self.net(inputs).argmax(dim=1).tolist())
        return kinds

    @torch.no_grad()
    def features(self, images: Sequence[Any], batch_size: int = 256) -> torch.Tensor:
        """[N, 4 * width + 3] features for FID/KID: the kind net's pooled shape features and the mean
        foreground colour (0..1), so both shape and colour differences move the distance."""
        self.net.eval()
        out = []
        for start in range(0, len(images), batch_size):
            pixels = self._pixels(images[start : start + batch_size])
            distance = self.foreground_distance(pixels)
            shape = self.net.features(self._kind_inputs(distance)).flatten(1)
            weights = (distance > self.config.foreground_threshold).float().unsqueeze(1)
            colour = (pixels * weights).sum((2, 3)) / weights.sum((2, 3)).clamp_min(1.0) / 255.0
            out.append(torch.cat([shape, colour], dim=1))
        return torch.cat(out)

    def judge(self, images: Sequence[Any]) -> list[dict[str, str | None]]:
        """[{"kind": ..., "colour": ...}] per image."""
        return [{"kind": k, "colour": c} for k, c in zip(self.predict_kinds(images), self.predict_colours(images))]

    # ---- training ----

    @torch.enable_grad()  # callers may evaluate under no_grad (the Trainer does)
    def fit(
        self,
        records: Sequence[Any],
        steps: int = 600,
        batch_size: int = 64,
        lr: float = 3e-3,
        seed: int = 0,
    ) -> dict[str, float]:
        """Train the kind classifier on records (``.image`` + ``.attributes``, or dicts with those keys).

        Augmentation: horizontal flips and, for half the batch, a random down-and-up resampling to
        8..image_size pixels, so low-resolution generators are judged fairly. Returns the final training
        loss and accuracy (on the last 10% of steps).
        """
        if steps < 1:
            raise ValueError(f"steps: expected >= 1, got {steps}")
        if not records:
            raise ValueError("records: expected at least one training record, got none")
        index = {kind: i for i, kind in enumerate(self.config.kinds)}
        images, targets = [], []
        for i, record in enumerate(records):
            image, attributes = _record_parts(record)
            kind, _ = target_kind_colour(attributes)
            if kind not in index:
                raise ValueError(f"records[{i}]: kind {kind!r} is not one of the judge's kinds {self.config.kinds}")
            images.append(image)
            targets.append(index[kind])
        inputs = torch.cat(
            [self._kind_inputs(self.foreground_distance(self._pixels(images[s : s + 512])))
             for s in range(0, len(images), 512)]
        )
        labels = torch.tensor(targets)
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
            torch.manual_seed(seed)
            self.net = KindNet(len(self.config.kinds), self.config.width)
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
        self.net.train()
        size = self.config.image_size
        tail_losses, tail_correct, tail_seen = [], 0, 0
        for step in range(steps):
            pick = torch.randint(len(labels), (min(batch_size, len(labels)),), generator=generator)
            x, y = inputs[pick], labels[pick]
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip.reshape(-1, 1, 1, 1), x.flip(-1), x)
            low = int(torch.randint(8, size + 1, (1,), generator=generator))
            half = len(x) // 2
            if low < size and half:
                coarse = F.interpolate(x[:half], size=(low, low), mode="bilinear", antialias=True)
                x = torch.cat([F.interpolate(coarse, size=(size, size), mode="bilinear"), x[half:]])
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step >= steps - max(1, steps // 10):
                tail_losses.append(loss.item())
                tail_correct += int((logits.argmax(dim=1) == y).sum())
                tail_seen += len(y)
        self.net.eval()
        return {"train_loss": float(np.mean(tail_losses)), "train_accuracy": tail_correct / tail_seen, "steps": steps}

    def evaluate(self, records: Sequence[Any]) -> dict[str, float]:
        """The judge's own accuracy on real (held-out) records: kind, colour and both."""
        images, attributes = zip(*(_record_parts(r) for r in records)) if records else ((), ())
        return prompt_fidelity(list(images), list(attributes), self)

    # ---- persistence ----

    def save(self, path: str | Path) -> Path:
        """One safetensors file: the KindNet weights plus the config as JSON metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.net.state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt", "shapes_judge_config": json.dumps(asdict(self.config))})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ShapesJudge":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"shapes judge file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if "shapes_judge_config" not in metadata:
            raise ValueError(f"{path}: not a ShapesJudge file (no 'shapes_judge_config' metadata)")
        config = json.loads(metadata["shapes_judge_config"])
        judge = cls(
            kinds=config["kinds"], palette=config["palette"], image_size=config["image_size"],
            width=config["width"], foreground_threshold=config["foreground_threshold"],
        )
        judge.config.min_foreground_fraction = config["min_foreground_fraction"]
        judge.net.load_state_dict(load_file(str(path)))
        judge.net.eval()
        return judge


def train_shapes_judge(
    steps: int = 600, n_train: int = 2000, n_test: int = 300, image_size: int = 32, seed: int = 0
) -> tuple[ShapesJudge, dict[str, Any]]:
    """Train a judge on single-shape images from ``mmlm.data.shapes`` and measure it on held-out splits.

    Returns the judge and its own accuracy: ``{"fit": ..., "test": ..., "compositional": ...}`` (the
    compositional split holds colour-kind pairs never seen in training).
    """
    from mmlm.config import ShapesConfig
    from mmlm.data.shapes import generate_shapes

    config = ShapesConfig(min_shapes=1, max_shapes=1, seed=seed)
    judge = ShapesJudge(image_size=image_size)
    train = generate_shapes(n_train, split="train", config=config)
    report: dict[str, Any] = {"fit": judge.fit(train, steps=steps, seed=seed)}
    for split in ("test", "compositional"):
        report[split] = judge.evaluate(generate_shapes(n_test, split=split, config=config))
    return judge, report


def prompt_fidelity(
    images: Sequence[Any], target_attributes: Sequence[Mapping[str, Any]], judge: ShapesJudge
) -> dict[str, float]:
    """How often generated ``images`` show the prompted main shape, as judged by ``judge``.

    ``target_attributes[i]`` has ``kind`` and ``colour`` (or a ``shapes`` list whose first entry has them).
    Returns ``{"colour_accuracy", "kind_accuracy", "fidelity" (both right), "num_images"}``.
    """
    if len(images) != len(target_attributes):
        raise ValueError(f"images and target_attributes differ in length: {len(images)} vs {len(target_attributes)}")
    if not len(images):
        raise ValueError("images: expected at least one image, got none")
    targets = [target_kind_colour(a) for a in target_attributes]
    verdicts = judge.judge(images)
    kind_ok = [v["kind"] == kind for v, (kind, _) in zip(verdicts, targets)]
    colour_ok = [v["colour"] == colour for v, (_, colour) in zip(verdicts, targets)]
    n = len(targets)
    return {
        "colour_accuracy": sum(colour_ok) / n,
        "kind_accuracy": sum(kind_ok) / n,
        "fidelity": sum(k and c for k, c in zip(kind_ok, colour_ok)) / n,
        "num_images": n,
    }
