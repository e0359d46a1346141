"""Generation metrics that never download anything.

- ``frechet_distance`` (FID) and ``kernel_inception_distance`` (KID) work on feature tensors from ANY
  feature extractor; ``extract_features`` runs one (e.g. a timm model built or loaded locally). The usual
  Inception weights are deliberately not used: numbers are comparable only under the same extractor.

Prompt fidelity on the shapes data (``ShapesJudge``, ``prompt_fidelity``) lives in ``mmlm.eval.shapes_judge``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from mmlm.eval.plots import to_pil

# --------------------------------------------------------------------------------------------- FID


def _as_features(feats: Any, name: str) -> np.ndarray:
    array = feats.detach().cpu().double().numpy() if hasattr(feats, "detach") else np.asarray(feats, np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected features shaped [num_samples, dim], got shape {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 samples for a covariance, got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return array


def _trace_sqrt_product_eigh(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """tr(sqrt(A B)) for symmetric PSD A, B as sum(sqrt(eig(sqrt(A) B sqrt(A)))): symmetric and stable."""
    w, v = np.linalg.eigh(sigma_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ sigma_b @ sqrt_a
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def _trace_sqrt_product_scipy(sigma_a: np.ndarray, sigma_b: np.ndarray, eps: float = 1e-6) -> float | None:
    """tr(sqrtm(A B)) with scipy as pytorch-fid computes it; None when the result is unusable."""
    from scipy import linalg

    with warnings.catch_warnings():  # a singular product (few samples) is handled below, not worth a warning
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            return None
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance_from_stats(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray, method: str = "auto"
) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrt(S_a S_b)), the Frechet distance of two Gaussians.

    ``method``: "scipy" (scipy.linalg.sqrtm, as pytorch-fid), "eigh" (eigen-decomposition), or "auto"
    (scipy when installed, falling back to eigh if sqrtm returns a significantly complex result, which
    happens for rank-deficient covariances, e.g. fewer samples than feature dimensions).
    """
    if method not in ("auto", "scipy", "eigh"):
        raise ValueError(f"method: expected 'auto', 'scipy' or 'eigh', got {method!r}")
    diff = np.asarray(mu_a, np.float64) - np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    if sigma_a.shape != sigma_b.shape or sigma_a.shape != (diff.size, diff.size):
        raise ValueError(f"statistics disagree in shape: mu {diff.shape}, sigmas {sigma_a.shape} and {sigma_b.shape}")
    trace_sqrt = None
    if method in ("auto", "scipy"):
        try:
            trace_sqrt = _trace_sqrt_product_scipy(sigma_a, sigma_b)
        except ImportError:
            if method == "scipy":
                raise
        if trace_sqrt is None and method == "scipy":
            raise ValueError("scipy.linalg.sqrtm gave a complex result; use method='eigh'")
    if trace_sqrt is None:
        trace_sqrt = _trace_sqrt_product_eigh(sigma_a, sigma_b)
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt)


def feature_statistics(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of features shaped [num_samples, dim], e.g. to cache the real set's."""
    array = _as_features(feats, "feats")
    return array.mean(axis=0), np.cov(array, rowvar=False).reshape(array.shape[1], array.shape[1])


def frechet_distance(feats_a: Any, feats_b: Any, method: str = "auto") -> float:
    """FID-style Frechet distance between two feature sets (torch tensors or arrays, [num_samples, dim])."""
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: feats_a has {a.shape[1]}, feats_b has {b.shape[1]}")
    return frechet_distance_from_stats(*feature_statistics(a), *feature_statistics(b), method=method)


# --------------------------------------------------------------------------------------------- KID


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    """Unbiased MMD^2 with the kernel k(a, b) = (gamma <a, b> + coef0)^degree (as torch-fidelity)."""
    m = x.shape[0]
    k_xx = (x @ x.T * gamma + coef0) ** degree
    k_yy = (y @ y.T * gamma + coef0) ** degree
    k_xy = (x @ y.T * gamma + coef0) ** degree
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    feats_a: Any,
    feats_b: Any,
    subset_size: int | None = None,
    num_subsets: int = 100,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """KID: unbiased polynomial-kernel MMD^2 averaged over random subsets (Binkowski et al. 2018).

    Follows torch-fidelity: each subset draws ``subset_size`` samples without replacement from each set,
    ``gamma`` defaults to 1 / dim. ``subset_size`` defaults to 1000, or to half the smaller set when that
    has fewer than 2,000 samples: small sets work (torchmetrics' fixed 1000 fails on them) and the subsets
    still differ, so ``kid_std`` measures a spread (subsets of the whole set would all give one value).
    Returns ``{"kid_mean", "kid_std"}``; the unbiased estimate can be slightly negative for matching
    distributions.
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: feats_a has {a.shape[1]}, feats_b has {b.shape[1]}")
    largest = min(len(a), len(b))
    subset_size = min(1000, max(2, largest // 2)) if subset_size is None else subset_size
    if not 2 <= subset_size <= largest:
        raise ValueError(f"subset_size: expected 2..{largest} (the smaller set's size), got {subset_size}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets: expected >= 1, got {num_subsets}")
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = np.zeros(num_subsets)
    for i in range(num_subsets):
        x = a[rng.choice(len(a), subset_size, replace=False)]
        y = b[rng.choice(len(b), subset_size, replace=False)]
        mmds[i] = _polynomial_mmd2(x, y, degree, gamma, coef0)
    return {"kid_mean": float(mmds.mean()), "kid_std": float(mmds.std())}


# -------------------------------------------------------------------------------------- extraction


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: Any,
    transform: Callable[[Any], torch.Tensor] | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Features [num_images, dim] (float32, CPU) of ``images`` under any ``model``.

    ``images``: a tensor [N, C, H, W] or a sequence of images (PIL, arrays, CHW tensors). ``transform``
    is applied to each image (e.g. timm's eval transform on PIL images); without one, non-tensor images are
    converted to [0, 1] CHW tensors. Outputs are flattened to vectors: a [B, C, H, W] map is average-pooled
    over H, W and a [B, L, D] token sequence over L; a tuple/list output uses its first element.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            if isinstance(chunk, torch.Tensor) and transform is None:
                batch = chunk
            else:
                batch = torch.stack([_to_input(image, transform) for image in chunk])
            out = model(batch.to(device))
            if isinstance(out, (tuple, list)):
                out = out[0]
            if out.ndim == 4:
                out = out.mean(dim=(2, 3))
            elif out.ndim == 3:
                out = out.mean(dim=1)
            outputs.append(out.reshape(out.shape[0], -1).float().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError("extract_features: got no images")
    return torch.cat(outputs)


def _to_input(image: Any, transform: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    if transform is not None:
        return transform(image)
    if isinstance(image, torch.Tensor):
        return image
    return torch.from_numpy(np.asarray(to_pil(image), np.float32) / 255.0).permute(2, 0, 1)
