"""Seeded image augmentation: the views a feature cache holds for view-consistency or contrastive terms.

An :class:`Augment` turns a batch of decoded pixels (``[n, H, W, 3]`` uint8, or a list of such
arrays of varying size, as :class:`hashindex.sources.Decoded` holds them) into one augmented view
of each image, in the same pixel format, so the frozen backbone computes its features exactly as it
does for plain images. Every random choice of a view is drawn from its own generator, seeded by
``(seed, row, view)``: a view depends on nothing else (not the batch it is in, not the chunking of a
Dask build, not the worker), so a cache rebuilt or resumed anywhere holds the same views.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import HashindexError

# RandomResizedCrop's own fallback: after this many rejected draws, crop the centre
_CROP_TRIES = 10


class AugmentError(HashindexError):
    """A bad augmentation parameter; the message names it."""


def mirror(pixels):
    """The horizontal mirror image of each image of a batch of decoded pixels (``[n, H, W, 3]``, or a
    list of ``[H, W, 3]`` arrays of varying size), in the same format."""
    if isinstance(pixels, np.ndarray):
        return np.ascontiguousarray(pixels[:, :, ::-1])
    return [np.ascontiguousarray(image[:, ::-1]) for image in pixels]


@dataclass(frozen=True)
class Augment:
    """Random resized crop, then a small rotation and shift, then a horizontal flip (each image and
    view drawn on its own).

    Parameters
    ----------
    crop_scale : tuple of float
        Range of the crop's area as a fraction of the image's, ``0 < low <= high <= 1``.
    crop_ratio : tuple of float
        Range of the crop's aspect ratio (width / height), drawn log-uniformly, ``0 < low <= high``.
    flip : bool
        Flip horizontally with probability 1/2.
    max_shift : float
        Largest shift along each axis as a fraction of the output's size, in ``[0, 0.5]``.
    rotate : float
        Largest rotation in degrees (either way), in ``[0, 180]``.

    Areas a shift or rotation uncovers are black. Rows, views and seeds are non-negative integers.
    """

    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    max_shift: float = 0.1
    rotate: float = 10.0

    def __post_init__(self):
        # normalised so that equal settings give equal reprs, and so equal cache keys
        scale, ratio = _pair("crop_scale", self.crop_scale), _pair("crop_ratio", self.crop_ratio)
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise AugmentError(f"crop_scale must be two area fractions 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0.0 < ratio[0] <= ratio[1] or not math.isfinite(ratio[1]):
            raise AugmentError(f"crop_ratio must be two aspect ratios 0 < low <= high, got {self.crop_ratio}")
        if not isinstance(self.flip, (bool, np.bool_)):
            raise AugmentError(f"flip must be True or False, got {self.flip!r}")
        shift, rotate = _number("max_shift", self.max_shift), _number("rotate", self.rotate)
        if not 0.0 <= shift <= 0.5:
            raise AugmentError(f"max_shift must be a fraction of the size in [0, 0.5], got {self.max_shift}")
        if not 0.0 <= rotate <= 180.0:
            raise AugmentError(f"rotate must be a number of degrees in [0, 180], got {self.rotate}")
        for name, value in (("crop_scale", scale), ("crop_ratio", ratio), ("flip", bool(self.flip)),
                            ("max_shift", shift), ("rotate", rotate)):
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        """The parameters, JSON-ready (a feature cache records them)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def params(self, row: int, view: int, seed: int, height: int, width: int) -> dict:
        """The random choices of one view of the ``height`` × ``width`` image at ``row``.

        Returns a dict with the crop box ``top, left, crop_height, crop_width``, ``angle`` (degrees),
        ``shift`` (fractions of the output's width and height) and ``flip``. Drawn from
        ``numpy.random.default_rng([seed, row, view])``: one generator per view of each image.
        """
        rng = np.random.default_rng([_index("seed", seed), _index("row", row), _index("view", view)])
        # the same draws whatever the settings (a fixed number first, then the crop's variable number
        # of tries): turning the flip off, say, leaves every view's crop, angle and shift as they were
        flip = bool(rng.random() < 0.5) and self.flip
        angle = float(rng.uniform(-1.0, 1.0)) * self.rotate
        dx, dy = (float(d) * self.max_shift for d in rng.uniform(-1.0, 1.0, size=2))
        top, left, h, w = _crop_box(rng, height, width, self.crop_scale, self.crop_ratio)
        return {"top": top, "left": left, "crop_height": h, "crop_width": w, "angle": angle, "shift": (dx, dy),
                "flip": flip}

    def __call__(self, pixels, rows, *, view: int, seed: int = 0, size: int | None = None):
        """View ``view`` of each image of ``pixels``, image ``i`` being the one at row ``rows[i]``.

        Parameters
        ----------
        pixels : numpy.ndarray or list of numpy.ndarray
            Decoded images, uint8 ``[n, H, W, 3]`` or a list of ``[H, W, 3]`` arrays.
        rows : array_like of int
            Each image's row (its position in the source or the cache): with ``view`` and ``seed``,
            all that its random choices depend on.
        view : int
            Which view (0, 1, …); views of one image differ.
        seed : int
            Seed of the whole set of views.
        size : int, optional
            Crop straight to ``size`` × ``size`` (the backbone's input size: one resampling instead
            of two, and the cost no longer grows with the source's resolution). None: each view
            keeps its image's size.

        Returns
        -------
        numpy.ndarray or list of numpy.ndarray
            uint8 views in the pixel format the backbone reads: an ``[n, h, w, 3]`` array when
            ``pixels`` is one or ``size`` is given, else a list.
        """
        # imported here: torchvision costs seconds to import, and most users of the pipeline never augment
        from torchvision.transforms.v2 import functional as F

        rows = np.asarray(rows).reshape(-1)
        if len(rows) != len(pixels):
            raise AugmentError(f"rows has {len(rows)} entries for {len(pixels)} images")
        if size is not None and int(size) < 1:
            raise AugmentError(f"size must be at least 1 pixel, got {size}")
        as_array = isinstance(pixels, np.ndarray) or size is not None
        if as_array and len(pixels) == 0:
            shape = pixels.shape[1:] if size is None else (int(size), int(size), 3)
            return np.empty((0, *shape), dtype=np.uint8)
        with _one_thread():
            views = [self._view(F, image, row, view, seed, size) for image, row in zip(pixels, rows)]
        if as_array:
            return torch.stack(views).numpy()
        return [v.contiguous().numpy() for v in views]

    def _view(self, F, image: np.ndarray, row, view: int, seed: int, size: int | None) -> torch.Tensor:
        """One view of one ``[H, W, C]`` image, as an ``[h, w, C]`` uint8 tensor.

        One image at a time: every view has its own crop box, angle and shift, and torchvision's
        functional ops take one set of parameters per call. ~0.5 ms an image (28 or 64 px), a few per
        cent of the backbone's forward; it also keeps each view independent of its batch."""
        # HWC → CHW without a copy (a read-only array is copied: torch warns on those)
        x = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
        height, width = x.shape[-2:]
        out_h, out_w = (height, width) if size is None else (int(size), int(size))
        p = self.params(row, view, seed, height, width)
        x = F.resized_crop(x, p["top"], p["left"], p["crop_height"], p["crop_width"], [out_h, out_w],
                           interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        if p["angle"] or p["shift"] != (0.0, 0.0):
            x = F.affine(x, angle=p["angle"], translate=[p["shift"][0] * out_w, p["shift"][1] * out_h],
                         scale=1.0, shear=[0.0, 0.0], interpolation=F.InterpolationMode.BILINEAR, fill=0.0)
        if p["flip"]:
            x = F.horizontal_flip(x)
        return x.permute(1, 2, 0)


@contextlib.contextmanager
def _one_thread():
    """Run torch ops on one intra-op thread meanwhile. Each op here works on one small image, and
    splitting it over threads costs more in synchronisation than it saves: 24 ms an image with two
    threads on a busy 2-core machine, 0.5 ms with one. A no-op in pipeline workers (one thread)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (area and log-aspect drawn uniformly, up to ten tries,
    else the centre), drawn from ``rng``: torchvision's own draws use torch's global generator,
    which would tie a view to whatever else the process drew before it."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # the centre, with the aspect ratio clamped into range (torchvision's fallback)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def _pair(name: str, value) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise AugmentError(f"{name} must be a pair of numbers (low, high), got {value!r}") from None
    return low, high


def _number(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AugmentError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise AugmentError(f"{name} must be finite, got {value!r}")
    return number


def check_views(views) -> int:
    """``views`` (how many views of each image) as an int, or an :class:`AugmentError` naming it."""
    if isinstance(views, (bool, np.bool_)) or not isinstance(views, (int, np.integer)) or views < 1:
        raise AugmentError(f"views must be an integer of at least 1, got {views!r}")
    return int(views)


def check_seed(seed) -> int:
    """``seed`` as an int, or an :class:`AugmentError` naming it."""
    return _index("seed", seed)


def _index(name: str, value) -> int:
    """A non-negative integer (numpy's SeedSequence takes nothing else)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise AugmentError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)
