"""Decoding: every odd kind of file either becomes correct RGB pixels or an ImageError with a reason."""
import io

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from hashindex.images import ImageError, decode_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo():
    return load_sample_image("flower.jpg")  # a real photograph shipped with scikit-learn


def test_real_jpeg_round_trip(photo):
    out = decode_image(encode(Image.fromarray(photo), "JPEG", quality=95))
    assert out.shape == photo.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - photo.astype(int)).mean() < 3


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, I am text\n", "not an image"),
])
def test_not_images_are_rejected_with_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_rejected(photo, fmt):
    data = encode(Image.fromarray(photo), fmt)
    with pytest.raises(ImageError, match="corrupt|not an image"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")  # 100 Mpx, a few kB on disk
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(bomb)


def test_grey_becomes_rgb():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = decode_image(encode(Image.fromarray(grey), "PNG"))
    assert out.shape == (8, 8, 3) and (out[..., 0] == grey).all() and (out[..., 2] == grey).all()


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(values), "PNG"))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg_becomes_rgb(photo):
    out = decode_image(encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95))
    assert out.shape == photo.shape
    assert np.abs(out.astype(int) - photo.astype(int)).mean() < 12


def test_palette_png_with_transparency_is_flattened_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    img.putpixel((0, 0), 1)
    out = decode_image(encode(img, "PNG", transparency=0))
    assert out[0, 0].tolist() == [0, 0, 255]     # opaque palette entry
    assert out[1, 1].tolist() == [255, 255, 255]  # transparent entry → white background


def test_alpha_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = [0, 0, 0, 255]    # opaque black
    rgba[0, 1] = [0, 0, 0, 0]      # fully transparent
    rgba[1, 0] = [0, 0, 0, 128]    # half transparent black → mid grey
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert 120 <= out[1, 0, 0] <= 135


def test_exif_orientation_is_applied():
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :10] = 255  # left half white in the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6   # "rotate 90° clockwise to display"
    out = decode_image(encode(Image.fromarray(img), "JPEG", exif=exif, quality=100))
    assert out.shape == (20, 10, 3)          # width and height swapped
    assert out[:8].mean() > 200 and out[12:].mean() < 50  # the white half is now on top


def test_one_pixel_image():
    out = decode_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))
    assert out.shape == (1, 1, 3) and out[0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF"])
def test_other_formats(fmt, photo):
    small = Image.fromarray(photo).resize((64, 48))
    out = decode_image(encode(small, fmt))
    assert out.shape == (48, 64, 3)


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "GIF"])
def test_still_formats_pillow_reads(fmt, photo):
    small = Image.fromarray(photo).resize((64, 48))
    out = decode_image(encode(small, fmt))
    assert out.shape == (48, 64, 3) and out.std() > 20


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode_image(data)
    assert out.shape == (16, 16, 3) and out[..., 0].min() > 200 and out[..., 2].max() < 50


def corrupt_lzw_tiff() -> bytes:
    """A TIFF whose LZW strip holds codes libtiff has not seen: libtiff reports an error itself."""
    rng = np.random.default_rng(0)
    data = bytearray(encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "TIFF",
                            compression="tiff_lzw"))
    data[18:68] = b"\xff" * 50  # Pillow writes the strip right after the 8-byte header
    return bytes(data)


def test_libtiff_messages_go_into_the_reason_not_onto_stderr(capfd):
    with pytest.raises(ImageError) as failure:
        decode_image(corrupt_lzw_tiff())
    assert "libtiff: Using code not yet in table" in str(failure.value)
    assert capfd.readouterr().err == ""
