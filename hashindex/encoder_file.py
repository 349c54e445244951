"""An encoder file read without torch: what a job's client needs to start an index build.

``hashindex encode`` and ``hashindex update`` only pass the encoder on: its id (to key the build and
compare it with the base's), its bit count and config (the version's attributes) and its bytes (the
workers load it from the version). Importing torch to learn these cost the client ~1.4 s of every
nightly update. :class:`EncoderFile` reads them from the safetensors header and checks the id against
the tensors with numpy; the full :class:`hashindex.encoder.Encoder` (torch) is built only where
encoding happens, or where the file needs it (:meth:`EncoderFile.read` falls back to it for a file
from before today's layout).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from .errors import HashindexError

ENCODER_FORMAT_VERSION = 1
METADATA_KEY = "hashindex_encoder"
BACKBONE_PREFIX = "backbone/"
TRAINING_PREFIX = "training/"


class EncoderError(HashindexError):
    """An encoder file that cannot be read or does not fit its use."""


def content_id(config: dict, arrays: dict) -> str:
    """The encoder id: a hash of the config and of every tensor it computes with (name → C-contiguous
    array, numpy or anything with the buffer protocol)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, array in sorted(arrays.items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()[:16]


def read_metadata(data: bytes) -> dict:
    """The hashindex record in a safetensors file's header (raises on anything else)."""
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8:8 + header_len])["__metadata__"][METADATA_KEY])


def check_format(config: dict, name: str) -> None:
    if config.get("format_version", 0) > ENCODER_FORMAT_VERSION:
        raise EncoderError(f"{name}: encoder format version {config['format_version']} is newer than "
                           f"this hashindex supports ({ENCODER_FORMAT_VERSION}); upgrade hashindex")


def is_legacy_layout(config: dict) -> bool:
    """A fine-tuned encoder written before the stem attention moved into the backbone spec kept it in
    ``tuned_backbone``; loaded, it has the id of today's layout, not the one its header records."""
    tuned = config.get("tuned_backbone")
    return isinstance(tuned, dict) and "stem_attention" in tuned


def read_bytes(path: str | os.PathLike) -> bytes:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise EncoderError(f"{path}: cannot read encoder ({exc.strerror})") from None


@dataclass(frozen=True)
class EncoderFile:
    """The identity of an encoder and its file's bytes: ``id``, ``bits``, ``method``, ``config`` and
    ``to_bytes()`` as :class:`~hashindex.encoder.Encoder` has them; ``load()`` gives the Encoder."""

    id: str
    config: dict
    data: bytes
    name: str = "encoder"

    @property
    def bits(self) -> int:
        return int(self.config["bits"])

    @property
    def method(self) -> str:
        return self.config["method"]

    def to_bytes(self) -> bytes:
        return self.data

    def load(self, device=None):
        """The full encoder (imports torch)."""
        return _full_encoder(self.data, self.name, device)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "EncoderFile":
        """Read and check an encoder file; errors name the file and what is wrong, as Encoder.load's."""
        name = os.fspath(path)
        return cls.from_bytes(read_bytes(path), name=name)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "encoder") -> "EncoderFile":
        from safetensors.numpy import load as load_arrays

        try:
            meta, arrays = read_metadata(data), load_arrays(data)
        except Exception:  # noqa: BLE001 - not parseable here (or a dtype numpy lacks)
            meta = None
        if meta is not None:
            check_format(meta["config"], name)
            computed = content_id(meta["config"], {k: v for k, v in arrays.items() if not k.startswith(TRAINING_PREFIX)})
            if computed == meta["id"] and not is_legacy_layout(meta["config"]):
                return cls(meta["id"], meta["config"], data, name)
        # unparseable, corrupted, or of an older layout: the full reader says why, or gives today's id
        return cls.of(_full_encoder(data, name), name)

    @classmethod
    def of(cls, encoder, name: str = "encoder") -> "EncoderFile":
        """The file of an Encoder (its bytes as ``Encoder.to_bytes`` writes them)."""
        return cls(encoder.id, encoder.config, encoder.to_bytes(), name)


def _full_encoder(data: bytes, name: str, device=None):
    """The torch :class:`~hashindex.encoder.Encoder` of an encoder file's bytes."""
    from .encoder import Encoder

    return Encoder.from_bytes(data, name=name, device=device)
