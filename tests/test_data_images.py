"""Safe image decoding: modes, EXIF, size limits, corrupt files, real sample photos."""

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmlm.data.images import BadImageError, image_info, load_image
from mmlm.data.sources import DataError

SKIMAGE_DATA = Path(pytest.importorskip("skimage.data").__file__).parent


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


@pytest.fixture
def photo():
    """A small RGB image with distinct quadrants, so rotations are detectable."""
    array = np.zeros((20, 30, 3), np.uint8)
    array[:10, :15] = (255, 0, 0)
    array[:10, 15:] = (0, 255, 0)
    array[10:, :15] = (0, 0, 255)
    array[10:, 15:] = (255, 255, 0)
    return Image.fromarray(array)


@pytest.mark.parametrize("name, size", [("astronaut.png", (512, 512)), ("coffee.png", (600, 400)),
                                        ("chelsea.png", (451, 300)), ("camera.png", (512, 512)),
                                        ("no_time_for_that_tiny.gif", None)])
def test_scikit_image_samples_decode_to_rgb(name, size):
    image = load_image(SKIMAGE_DATA / name)
    assert image.mode == "RGB"
    if size:
        assert image.size == size
    if name == "camera.png":
        assert image_info(SKIMAGE_DATA / name).mode == "L"
        pixels = np.asarray(image)
        assert (pixels[..., 0] == pixels[..., 2]).all()


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)
    with Image.open(SKIMAGE_DATA / "no_time_for_that_tiny.gif") as gif:
        frames, size = getattr(gif, "n_frames", 1), gif.size
    assert frames > 1 and load_image(SKIMAGE_DATA / "no_time_for_that_tiny.gif").size == size


def test_exif_orientation_is_applied(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = _save(photo, tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (20, 30)  # height and width swapped
    assert np.abs(np.subtract(image.getpixel((15, 2)), (255, 0, 0))).max() < 40  # red now top right


def test_modes_become_rgb(tmp_path, photo):
    cmyk = _save(photo.convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    assert np.abs(np.subtract(load_image(cmyk).getpixel((2, 2)), (255, 0, 0))).max() < 40

    sixteen = np.full((6, 7), 65535, np.uint16)
    sixteen[:3] = 257 * 100
    path = _save(Image.fromarray(sixteen), tmp_path / "16bit.png")
    assert image_info(path).mode.startswith("I")
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (100, 100, 100) and image.getpixel((0, 5)) == (255,) * 3

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    path = _save(palette, tmp_path / "palette.png", transparency=0)
    image = load_image(path)
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((3, 3)) == (255, 255, 255)  # transparent -> white

    rgba = Image.new("RGBA", (3, 3), (0, 0, 255, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    image = load_image(_save(rgba, tmp_path / "rgba.png"))
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 1)) == (0, 0, 255)

    assert load_image(_save(photo.convert("L"), tmp_path / "gray.png")).mode == "RGB"
    assert load_image(_save(photo.convert("1"), tmp_path / "bw.bmp")).mode == "RGB"


def test_tiny_and_extreme_aspect_images(tmp_path):
    assert load_image(_save(Image.new("RGB", (1, 1), (1, 2, 3)), tmp_path / "one.png")).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(_save(Image.new("L", (4000, 2)), tmp_path / "wide.png")).size == (4000, 2)


def test_in_memory_sources():
    array = np.zeros((5, 6, 3), np.uint8)
    array[0, 0] = (9, 8, 7)
    assert load_image(array).getpixel((0, 0)) == (9, 8, 7)
    assert load_image(np.ones((5, 6), np.float32)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.zeros((5, 6, 4), np.uint8)).getpixel((0, 0)) == (255, 255, 255)  # alpha 0 -> white
    tensor = torch.zeros(3, 5, 6)
    tensor[0] = 1.0
    image = load_image(tensor)
    assert image.size == (6, 5) and image.getpixel((0, 0)) == (255, 0, 0)
    buffer = io.BytesIO()
    Image.new("RGB", (2, 3), (4, 5, 6)).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (2, 3)
    rgb = Image.new("RGB", (2, 2))
    assert load_image(rgb) is not rgb  # callers may mutate the result
    with pytest.raises(BadImageError, match="array shape"):
        load_image(np.zeros((2, 3, 5)))
    with pytest.raises(TypeError, match="expected a path"):
        load_image(12)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_bad_images(tmp_path, photo, fmt):
    buffer = io.BytesIO()
    photo.resize((200, 200)).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(BadImageError, match="truncated") as info:
        load_image(path)
    assert info.value.path == str(path) and isinstance(info.value, DataError)


def test_empty_missing_and_non_image_files(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a jpeg")
    for name, reason in [("zero.png", "empty file"), ("text.jpg", "not an image"), ("missing.png", "not found")]:
        with pytest.raises(BadImageError, match=reason) as info:
            load_image(tmp_path / name)
        assert name in str(info.value) and reason in info.value.reason


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    path = _save(Image.new("L", (3000, 3000)), tmp_path / "big.png")
    with pytest.raises(BadImageError, match="max_pixels"):
        load_image(path, max_pixels=1_000_000)
    with pytest.raises(BadImageError, match="max_pixels"):
        load_image(np.zeros((2000, 1000), np.uint8), max_pixels=1_000_000)
    assert load_image(path, max_pixels=10_000_000).size == (3000, 3000)
    # A header claiming 100k x 100k: refused before any pixel data is read.
    header = io.BytesIO()
    Image.new("L", (8, 8)).save(header, format="PNG")
    data = bytearray(header.getvalue())
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width and height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    with pytest.raises(BadImageError, match="max_pixels|decompression bomb"):
        load_image(bytes(data))
