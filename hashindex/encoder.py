"""The encoder artifact: backbone spec + a trained hash head + config, saved as one safetensors file.

Loading needs no training state: the config names the head type registered in :data:`HEADS` and its
constructor arguments; the tensors fill it. The encoder id is a content hash of what the encoder
computes (backbone, preprocessing, head, weights), so two encoders with equal ids give equal codes.

The backbone spec says which network computes the features, the attention module DPFAH puts after
the stem included (``stem_attention``), whatever the mode. An encoder trained in finetune mode also
carries that network's trained weights (tensors named ``backbone/…``, marked by the config's
``tuned_backbone`` entry); a head-mode encoder uses the pretrained weights of its spec.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .backbones import (PRECISIONS, Backbone, BackboneError, BackboneSpec, check_precision, default_device,
                        load_backbone)
# the file's format, read without torch by encoder_file (a job's client needs only the id and bytes)
from .encoder_file import (BACKBONE_PREFIX as _BACKBONE_PREFIX, ENCODER_FORMAT_VERSION, METADATA_KEY,  # noqa: F401
                           TRAINING_PREFIX as _TRAINING_PREFIX, EncoderError, check_format, content_id,
                           is_legacy_layout, read_bytes, read_metadata)

ENCODE_BLOCK_ROWS = 4096
HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str):
    """Register a head class by name; its ``__init__`` kwargs are stored in the encoder config."""
    def wrap(cls):
        cls.head_type = name
        HEADS[name] = cls
        return cls
    return wrap


@register_head("linear")
class LinearHead(nn.Module):
    """``z = x W + b``; bit = ``z >= 0``. ITQ, LSH and PCA-style projections are all this."""

    def __init__(self, in_dim: int, bits: int):
        super().__init__()
        self.kwargs = {"in_dim": in_dim, "bits": bits}
        self.weight = nn.Parameter(torch.zeros(in_dim, bits, dtype=torch.float64), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(bits, dtype=torch.float64), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float64: projections near 0 must not flip with batch composition or BLAS blocking
        return x.to(torch.float64) @ self.weight + self.bias


def pack_signs(z: torch.Tensor | np.ndarray) -> np.ndarray:
    """Real-valued codes → packed uint8 bits, numpy.packbits order, bit 1 ⇔ z >= 0 (sign(0) = +1)."""
    if isinstance(z, torch.Tensor):
        z = z.detach().cpu().numpy()
    return np.packbits(z >= 0, axis=1)


class Encoder:
    """Maps images (or their backbone features) to packed binary codes, one image at a time."""

    def __init__(self, *, method: str, bits: int, backbone: BackboneSpec, head: nn.Module,
                 training: dict[str, Any] | None = None, device: torch.device | str | None = None,
                 backbone_state: dict[str, torch.Tensor] | None = None,
                 training_arrays: dict[str, np.ndarray] | None = None, precision: str = "fp32"):
        if bits % 8:
            raise EncoderError(f"bits must be a multiple of 8, got {bits}")
        if precision not in PRECISIONS:
            raise EncoderError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        # the backbone's arithmetic: part of the config, so encoders (and the indexes they build) at
        # different precisions have different ids and are never mixed
        self.precision = precision
        self.method, self.bits, self.backbone_spec = method, int(bits), backbone
        self.head = head.eval()
        self.training = training or {}
        # finetune mode: the trained backbone weights (None: the spec's pretrained weights)
        self.backbone_state = None if backbone_state is None else {
            k: v.detach().cpu().contiguous() for k, v in backbone_state.items()}
        # part of the training record, not of what the encoder computes (e.g. NRDH's stage-1 codes)
        self.training_arrays = {k: np.ascontiguousarray(v) for k, v in (training_arrays or {}).items()}
        self._backbone: Backbone | None = None
        self._device = torch.device(device) if device is not None else None

    # -- identity ------------------------------------------------------------------------------
    @property
    def finetuned(self) -> bool:
        return self.backbone_state is not None

    @property
    def config(self) -> dict:
        config = {
            "format_version": ENCODER_FORMAT_VERSION,
            "method": self.method,
            "bits": self.bits,
            "backbone": self.backbone_spec.to_dict(),
            "head": {"type": self.head.head_type, "kwargs": self.head.kwargs},
        }
        if self.finetuned:
            config["tuned_backbone"] = {"tensors": _BACKBONE_PREFIX}
        if self.precision != "fp32":  # absent at fp32, so encoders written before keep their ids
            config["precision"] = self.precision
        return config

    def _tensors(self) -> dict[str, torch.Tensor]:
        """What the encoder computes with: the head's and (fine-tuned) the backbone's weights."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        for k, v in (self.backbone_state or {}).items():
            tensors[_BACKBONE_PREFIX + k] = v
        return tensors

    @property
    def id(self) -> str:
        return _content_id(self.config, self._tensors())

    # -- encoding ------------------------------------------------------------------------------
    def with_precision(self, precision: str) -> "Encoder":
        """This encoder computing its backbone at ``precision`` ("fp32", "bf16" or "fp16"): a new
        encoder with its own id (the head stays float)."""
        if precision == self.precision:
            return self
        try:  # refused here, not in every worker: a precision this machine does not compute natively
            check_precision(precision, self._device or default_device())
        except BackboneError as exc:
            raise EncoderError(str(exc)) from None
        return Encoder(method=self.method, bits=self.bits, backbone=self.backbone_spec, head=self.head,
                       training=self.training, device=self._device, backbone_state=self.backbone_state,
                       training_arrays=self.training_arrays, precision=precision)

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            try:
                self._backbone = load_backbone(self.backbone_spec, device=self._device or default_device(),
                                               state=self.backbone_state, precision=self.precision)
            except BackboneError as exc:
                raise EncoderError(f"encoder {self.id}: {exc}") from None
            self.head.to(self._backbone.device)
        return self._backbone

    @torch.inference_mode()
    def encode_features(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Features of this encoder's backbone ``[n, d]`` → packed codes uint8 ``[n, bits/8]``.

        For a fine-tuned encoder these are not the pretrained backbone's (cached) features: use
        :meth:`encode_pixels`."""
        x = torch.as_tensor(features)
        device = next(self.head.parameters(), torch.empty(0)).device
        # in blocks: a head's working memory (LAGNH's anchor graph) stays bounded whatever n is
        return np.concatenate([pack_signs(self.head(x[i:i + ENCODE_BLOCK_ROWS].to(device).float()))
                               for i in range(0, len(x), ENCODE_BLOCK_ROWS)] or [np.zeros((0, self.bits // 8), np.uint8)])

    def encode_pixels(self, pixels, batch_size: int = 256) -> np.ndarray:
        """Decoded RGB images (array ``[n, H, W, 3]`` or list of arrays) → packed codes."""
        if len(pixels) == 0:
            return np.zeros((0, self.bits // 8), np.uint8)
        return self.encode_features(self.backbone.features(pixels, batch_size=batch_size))

    # -- persistence ---------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        meta = {"config": self.config, "id": self.id, "training": self.training,
                "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tensors = {**self._tensors(), **{_TRAINING_PREFIX + k: torch.from_numpy(v)
                                         for k, v in self.training_arrays.items()}}
        return st_save(tensors, metadata={METADATA_KEY: json.dumps(meta, default=str)})

    def save(self, path: str | os.PathLike) -> str:
        """Write the encoder file atomically (temp file + rename)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(self.to_bytes())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "encoder", device=None) -> "Encoder":
        from . import methods  # noqa: F401 - registers every method's head type

        try:
            tensors = st_load(data)
            meta = read_metadata(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure: not an encoder file
            raise EncoderError(f"{name}: not a hashindex encoder file ({type(exc).__name__}: {exc})") from None
        config = meta["config"]
        check_format(config, name)
        head_type = config["head"]["type"]
        if head_type not in HEADS:
            raise EncoderError(f"{name}: unknown head type {head_type!r}")
        head = HEADS[head_type](**config["head"]["kwargs"])
        def prefixed(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        backbone_state = prefixed(_BACKBONE_PREFIX)
        head.load_state_dict({k: v for k, v in tensors.items()
                              if not k.startswith((_BACKBONE_PREFIX, _TRAINING_PREFIX))})
        tuned = config.get("tuned_backbone")
        spec = dict(config["backbone"])  # a spec written before stem_attention existed: None
        legacy = is_legacy_layout(config)
        if legacy and tuned["stem_attention"] is not None:
            # files from before the stem attention moved into the spec kept it under tuned_backbone
            spec.setdefault("stem_attention", tuned["stem_attention"])
        enc = cls(method=config["method"], bits=config["bits"], backbone=BackboneSpec(**spec),
                  head=head, training=meta.get("training"), device=device,
                  backbone_state=backbone_state if tuned is not None else None,
                  training_arrays={k: v.numpy() for k, v in prefixed(_TRAINING_PREFIX).items()},
                  precision=config.get("precision", "fp32"))
        # a legacy fine-tuned file is checked against the config it was written with; loaded, it has
        # the id of today's layout (same network, same weights: same codes)
        if enc.id != meta["id"] and not (legacy and _content_id(config, enc._tensors()) == meta["id"]):
            raise EncoderError(f"{name}: content does not match its id {meta['id']} (corrupted file?)")
        return enc

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Encoder":
        return cls.from_bytes(read_bytes(path), name=os.fspath(path))

    def __repr__(self) -> str:
        tuned = ", fine-tuned" if self.finetuned else ""
        attention = self.backbone_spec.variant.replace("-", "+")
        precision = "" if self.precision == "fp32" else f", {self.precision}"
        return (f"Encoder(method={self.method!r}, bits={self.bits}, backbone={self.backbone_spec.name!r}{attention}@"
                f"{self.backbone_spec.image_size}px{tuned}{precision}, id={self.id})")


def _content_id(config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """The encoder id: a hash of the config and of every tensor it computes with."""
    return content_id(config, {name: tensor.numpy() for name, tensor in tensors.items()})
