"""Decoding image files into RGB uint8 arrays, refusing what should not be decoded.

Every failure is an :class:`ImageError` whose message is the reject reason stored in the index,
so one broken file never ends a job.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import io
import logging
import os
import platform
import threading
import warnings

import numpy as np
import PIL
from PIL import Image, ImageOps

from .errors import HashindexError

# Larger images are refused as decompression bombs (Pillow's own default is ~89 Mpx and only warns).
MAX_PIXELS = 64_000_000
# The still-image formats Pillow reads, as a folder source lists them (``--extensions`` narrows it).
# Animated GIF/WebP/APNG give their first frame.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".tga")


def normalise_extensions(extensions) -> tuple[str, ...]:
    """``"jpg,.PNG"`` or ``["jpg", ".png"]`` → ``(".jpg", ".png")``; refuses formats Pillow is not listed for."""
    items = extensions.split(",") if isinstance(extensions, str) else list(extensions)
    out = tuple(dict.fromkeys("." + e.strip().lower().lstrip(".") for e in items if e.strip()))
    unknown = [e for e in out if e not in IMAGE_EXTENSIONS]
    if not out or unknown:
        raise ImageError(f"extensions {extensions!r}: " + (f"{', '.join(unknown)} not among the readable formats "
                                                           if unknown else "none given; ")
                         + f"choose from {', '.join(IMAGE_EXTENSIONS)}")
    return out


log = logging.getLogger(__name__)


class ImageError(HashindexError):
    """An image that cannot be turned into pixels; the message is the reason recorded."""


# libtiff prints its errors (and, where Pillow has not silenced them, its warnings) straight to
# stderr: encoding an archive of odd TIFFs would flood a job's console from every worker. The
# messages are routed here instead, per thread: a failed decode's reason carries them, and the
# rest go to the log at debug level.
_libtiff_messages = threading.local()
_TIFF_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)


def _libtiff_library() -> "ctypes.CDLL | None":
    """The libtiff that Pillow's decoder uses: the copy loaded into this process (Linux)."""
    import PIL._imaging  # noqa: F401  (loads Pillow's libtiff)
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libtiff" in line and "/" in line}
    except OSError:
        paths = set()
    wheel = glob.glob(os.path.join(os.path.dirname(os.path.dirname(PIL.__file__)), "pillow.libs", "libtiff*"))
    for path in [*sorted(paths), *wheel, ctypes.util.find_library("tiff")]:
        if path:
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


def _route_libtiff_messages() -> None:
    # va_list reaches the handler as a pointer on the x86-64 and aarch64 ABIs; elsewhere leave stderr be
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        return
    lib = _libtiff_library()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if lib is None or libc is None:
        return
    libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

    def handler(module, fmt, args):
        buffer = ctypes.create_string_buffer(512)
        libc.vsnprintf(buffer, len(buffer), fmt, args)
        text = buffer.value.decode("utf-8", "replace")
        if module and not module.startswith(b"tempfile"):  # Pillow's in-memory file name says nothing
            text = f"{module.decode('utf-8', 'replace')}: {text}"
        messages = getattr(_libtiff_messages, "items", None)
        if messages is not None and len(messages) < 5:
            messages.append(text)
        log.debug("libtiff: %s", text)

    _route_libtiff_messages.handler = _TIFF_HANDLER(handler)  # kept alive for as long as libtiff may call it
    lib.TIFFSetErrorHandler(_route_libtiff_messages.handler)
    lib.TIFFSetWarningHandler(_route_libtiff_messages.handler)


_route_libtiff_messages()


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes into an ``[H, W, 3]`` uint8 RGB array.

    EXIF orientation is applied, alpha is flattened onto white, grey/palette/CMYK/16-bit
    become 8-bit RGB. Raises :class:`ImageError` with a reason for anything undecodable.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    _libtiff_messages.items = []
    try:
        return _decode(data, max_pixels)
    except ImageError as exc:
        if _libtiff_messages.items:
            raise ImageError(f"{exc} (libtiff: {'; '.join(_libtiff_messages.items)})") from None
        raise
    finally:
        _libtiff_messages.items = None


def _decode(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"decompression bomb refused: {width}x{height} = {width * height:,} pixels "
                    f"> limit {max_pixels:,}")
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb refused: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"corrupt image: {exc}") from None


def to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to an RGB uint8 array (alpha composited on white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale the full range to 8 bits instead of clipping at 255
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = np.nanmin(arr), np.nanmax(arr)
        grey = ((arr - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
