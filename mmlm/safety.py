"""Loading weights from files we did not write: never run the code a pickle carries.

Weights come from ``.safetensors`` (plain tensors, nothing to execute) or, for PyTorch's own
formats, from ``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors, numbers,
strings and containers. Anything else in the file (a ``__reduce__`` that would call ``os.system``,
an arbitrary class) is refused with an :class:`UnsafeFileError` naming the file; nothing in it runs.

Third-party loaders follow the same rule: timm and diffusers pass ``weights_only=True``,
accelerate's ``load_state`` does too, and transformers prefers safetensors and refuses unsafe pickles.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class UnsafeFileError(ValueError):
    """A file that is refused because loading it could execute code, or is not a weights file at all."""


def load_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only.

    A pickle that needs anything else (the hallmark of a file that would run code when loaded) raises
    :class:`UnsafeFileError`; so does a file that is not a PyTorch file at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(
            f"{path}: refused to load: the pickle asks for more than tensors and plain containers "
            f"({_refusal_reason(err)}), so loading it could execute code. Load only files you trust, "
            "and prefer .safetensors"
        ) from None
    except Exception as err:  # garbage bytes surface as KeyError, EOFError, RuntimeError, BadZipFile, ...
        raise UnsafeFileError(f"{path}: not a readable PyTorch weights file ({type(err).__name__}: {err})") from None


def _refusal_reason(err: pickle.UnpicklingError) -> str:
    """The line of torch's message that says what was blocked (e.g. 'unsupported GLOBAL posix.system')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line:
            return line.rstrip(".")
    return lines[-1] if lines else type(err).__name__


def load_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` state dict from ``.safetensors`` or a PyTorch file (``weights_only``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        try:
            return load_file(str(path), device=str(device))
        except SafetensorError as err:
            raise UnsafeFileError(f"{path}: not a valid safetensors file ({err})") from None
    if suffix in TORCH_SUFFIXES:
        state = load_torch_file(path, map_location=device)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # the common {"state_dict": ..., "epoch": ...} wrapping
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UnsafeFileError(f"{path}: expected a mapping of parameter names to tensors, "
                                  f"got {type(state).__name__}")
        return state
    raise UnsafeFileError(f"{path}: unsupported weights file '{suffix}'; expected "
                          f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}")
