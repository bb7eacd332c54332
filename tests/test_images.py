"""Images as people have them (stages/lib/images.py): phone photos with EXIF orientation, wide
and float pixels, CMYK, transparency, 1-bit, several frames; one decoder for every stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.lib.images import BACKGROUND, UnsupportedImage, inspect_file, load_image, to_rgb

FIXTURES = Path(__file__).parent / "fixtures"


def saved(image: Image.Image, path: Path, fmt: str, **options) -> Path:
    image.save(path, fmt, **options)
    return path


def test_a_phone_photo_turned_by_exif_is_loaded_upright(tmp_path):
    # A real photo stored sideways with orientation 6 ("rotate 90 clockwise to view"), as phones
    # store upright shots; upright it is the original again.
    original = Image.open(FIXTURES / "ant_0.jpg").convert("RGB")
    stored = original.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    path = saved(stored, tmp_path / "phone.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    upright = load_image(path)
    assert upright.size == original.size != stored.size
    difference = np.abs(np.asarray(upright, dtype=int) - np.asarray(original, dtype=int)).mean()
    assert difference < 3, difference  # JPEG re-encoding only
    # The index records the upright size, and so does a reduced-scale (draft) decode.
    _, width, height, reason = inspect_file((str(path), 10**8))
    assert (width, height, reason) == (*original.size, "")
    drafted = load_image(path, min_size=64)
    assert (drafted.size[0] > drafted.size[1]) == (original.size[0] > original.size[1])


def test_16_bit_grayscale_keeps_its_range(tmp_path):
    ramp = (np.arange(256 * 64, dtype=np.uint32).reshape(64, 256) * 4).astype(np.uint16)  # 0..65532
    path = saved(Image.fromarray(ramp), tmp_path / "wide.png", "PNG")
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(load_image(path))
    assert abs(pixels.mean() - ramp.mean() / 257) < 1 and pixels.min() == 0 and pixels.max() == 255
    assert (pixels[..., 0] == pixels[..., 2]).all()


@pytest.mark.parametrize("mode, values, expected_mean", [
    ("I", np.arange(64 * 64, dtype=np.int32).reshape(64, 64) * 16, (64 * 64 - 1) * 16 / 2 / 257),  # 32-bit, 16-bit data
    ("F", np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64), 127.5),  # floats in 0..1
    ("F", np.linspace(-5, 5, 64 * 64, dtype=np.float32).reshape(64, 64), 127.5),  # any other range: min..max
])
def test_wide_and_float_pixels_are_scaled_not_clipped(tmp_path, mode, values, expected_mean):
    image = Image.fromarray(values, mode)
    path = saved(image, tmp_path / "wide.tif", "TIFF")
    pixels = np.asarray(load_image(path))
    assert abs(pixels.mean() - expected_mean) < 1.5, pixels.mean()


def test_cmyk_jpeg_becomes_the_same_colour_in_rgb(tmp_path):
    cmyk = Image.new("RGB", (32, 32), (200, 40, 40)).convert("CMYK")
    path = saved(cmyk, tmp_path / "print.jpg", "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    assert np.abs(np.asarray(load_image(path), dtype=int) - [200, 40, 40]).max() < 12


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_the_fixed_background(tmp_path, mode):
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))  # transparent black: garbage under the alpha
    rgba.paste((10, 20, 200, 255), (0, 0, 10, 10))  # the left half opaque
    if mode == "RGBA":
        image = rgba
    elif mode == "LA":
        image = rgba.convert("LA")
    else:
        image = rgba.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        image.info["transparency"] = image.getpixel((15, 5))
    path = saved(image, tmp_path / f"cut_out_{mode}.png", "PNG")
    pixels = np.asarray(load_image(path))
    assert tuple(pixels[5, 15]) == BACKGROUND
    assert tuple(pixels[5, 2]) != BACKGROUND


def test_one_bit_and_the_first_frame_of_many(tmp_path):
    bits = Image.new("1", (16, 16), 0)
    bits.paste(1, (0, 0, 8, 16))
    pixels = np.asarray(load_image(saved(bits, tmp_path / "bits.png", "PNG")))
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[0, 15]) == (0, 0, 0)
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert Image.open(path).n_frames == 2
    assert tuple(np.asarray(load_image(path))[8, 8]) == (255, 0, 0)


def test_a_mode_that_cannot_become_rgb_is_skipped_with_its_reason():
    class Odd:
        mode, info = "XYZ", {}

    with pytest.raises(UnsupportedImage, match="image mode XYZ is not supported"):
        to_rgb(Odd())


def test_every_image_reader_goes_through_load_image():
    # EXIF and modes are handled in one place: no other module opens images itself.
    root = Path(__file__).resolve().parents[1] / "stages"
    openers = [path.relative_to(root).as_posix() for path in root.rglob("*.py")
               if "Image.open(" in path.read_text() or ".convert(\"RGB\")" in path.read_text()]
    assert openers == ["lib/images.py"]


def test_bytes_are_not_an_image(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"plain text")
    assert inspect_file((str(path), 10**8))[3] == "not an image"
