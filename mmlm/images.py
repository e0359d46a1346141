"""Safe image decoding: any source and mode in, an RGB PIL image out, or a BadImageError naming the file.

Top-level (not under ``mmlm.data``) so that models and data both use it without models depending on data.

Handles EXIF orientation, grayscale / palette / transparency (composited on white) / CMYK / 16-bit and
float modes, animated images (first frame), and refuses decompression bombs from the header, before
any pixel is decoded.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmlm.errors import DataError

DEFAULT_MAX_PIXELS = 64_000_000


class BadImageError(DataError):
    """An image that cannot be used; ``.path`` names it and ``.reason`` says why."""

    def __init__(self, path: Any, reason: str | None = None):
        # The one-argument form lets DataLoader re-raise a worker's error as this type (it calls type(err)(message))
        # instead of a bare RuntimeError.
        self.path = str(path)
        self.reason = reason or ""
        super().__init__(self.path if reason is None else f"{self.path}: {reason}")


@dataclass
class ImageInfo:
    """What the file holds before conversion (for ``mmlm data inspect``)."""

    width: int
    height: int
    mode: str
    format: str | None


def _name(src: Any) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    return f"<{type(src).__name__}>"


def _bomb_reason(pil_message: str, max_pixels: int) -> str:
    """PIL's refusal (it quotes its own limit, 2 x Image.MAX_IMAGE_PIXELS) restated against ``max_pixels``."""
    found = re.search(r"\((\d+) pixels\)", pil_message)
    size = f"{int(found.group(1)):,} pixels" if found else "its header's pixel count"
    if found and int(found.group(1)) <= max_pixels:
        return (f"{size} is within max_pixels={max_pixels:,} (data.max_image_pixels) but over PIL's hard limit "
                f"of 2 x PIL.Image.MAX_IMAGE_PIXELS (refused as a decompression bomb)")
    return f"{size} exceeds max_pixels={max_pixels:,} (data.max_image_pixels; refused as a decompression bomb)"


def _check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    if width < 1 or height < 1:
        raise BadImageError(name, f"empty image ({width}x{height})")
    if width * height > max_pixels:
        raise BadImageError(name, f"{width}x{height} = {width * height:,} pixels exceeds max_pixels={max_pixels:,} "
                                  "(data.max_image_pixels; possible decompression bomb)")


def _array_to_image(array: np.ndarray, name: str) -> Image.Image:
    """HxW, HxWx1/3/4 arrays (uint8, uint16, bool, or float in [0, 1]) -> PIL."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise BadImageError(name, f"array shape {array.shape} is not HxW, HxWx1, HxWx3 or HxWx4")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise BadImageError(name, "float array holds NaN or inf")
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        array = np.clip(array * scale + 0.5, 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        if array.min(initial=0) < 0 or array.max(initial=0) > 255:
            raise BadImageError(name, f"{array.dtype} array values outside 0..255; "
                                      "pass uint8, uint16 or float in [0, 1]")
        array = array.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def _tensor_to_array(tensor: Any) -> np.ndarray:
    """A torchvision-style CHW (or HW) tensor -> HWC numpy."""
    array = tensor.detach().cpu().numpy()
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    elif array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # ambiguous (e.g. 3x3x3): torchvision's CHW wins
    return array


def _open(src: Any, max_pixels: int) -> tuple[Image.Image, str]:
    """Open ``src`` and fully decode its first frame; raises BadImageError for anything unusable."""
    name = _name(src)
    if isinstance(src, Image.Image):
        _check_pixels(src.width, src.height, max_pixels, name)
        return src, name
    if isinstance(src, np.ndarray):
        _check_pixels(src.shape[1] if src.ndim > 1 else 0, src.shape[0], max_pixels, name)
        return _array_to_image(src, name), name
    if type(src).__module__.startswith("torch"):
        array = _tensor_to_array(src)
        _check_pixels(array.shape[1] if array.ndim > 1 else 0, array.shape[0], max_pixels, name)
        return _array_to_image(array, name), name
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, Path)):
        try:
            data = Path(src).read_bytes()
        except FileNotFoundError:
            raise BadImageError(name, "file not found") from None
        except (IsADirectoryError, PermissionError, OSError) as err:
            raise BadImageError(name, f"cannot read file ({err.__class__.__name__}: {err})") from None
    else:
        raise TypeError(f"load_image: expected a path, bytes, PIL image, numpy array or tensor, "
                        f"got {type(src).__name__}")
    if not data:
        raise BadImageError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own max_pixels check decides
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImageError(name, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as err:
        raise BadImageError(name, _bomb_reason(str(err), max_pixels)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(name, f"cannot read image header ({err})") from None
    _check_pixels(image.width, image.height, max_pixels, name)  # from the header, before decoding
    try:
        image.seek(0)
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadImageError(name, f"corrupt or truncated image data ({err})") from None
    return image, name


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image).astype(np.int64)
        peak = array.max(initial=0)
        # 16-bit data is scaled down by 257; plain 32-bit ints already within 0..255 are kept as is.
        array = array / 257.0 if (mode != "I" or peak > 255) and peak > 0 else array
        if array.max(initial=0) > 255:
            array = array * (255.0 / array.max())
        return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float32))
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(array * scale + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(src: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``src`` (path, bytes, PIL image, HxWxC array or CHW tensor) to an upright RGB PIL image."""
    image, name = _open(src, max_pixels)
    try:
        upright = ImageOps.exif_transpose(image)
        rgb = _to_rgb(upright)
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(name, f"cannot convert image (mode {image.mode}) to RGB ({err})") from None
    return rgb.copy() if rgb is src else rgb


def image_info(src: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Size, mode and format as stored, after verifying that the image decodes."""
    image, _ = _open(src, max_pixels)
    return ImageInfo(image.width, image.height, image.mode, image.format)
