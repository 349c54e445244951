"""Encoding a source into an index: the job behind ``hashindex encode`` (and the query-side
:func:`encode_images`).

The client of a build only schedules: it reads the encoder's id and bytes without torch
(:class:`~hashindex.encoder_file.EncoderFile`); the workers load the full encoder from the version.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from . import store
from .encoder_file import EncoderFile
from .index import Index
from .index import open as open_index
from .pipeline import CodeTransform, build_key, chunk_rows_for, job_client, run_chunks
from .sources import STAMP_SCHEME, open_source

if TYPE_CHECKING:
    from .encoder import Encoder

log = logging.getLogger(__name__)


def encoder_file(encoder: "Encoder | EncoderFile | str | os.PathLike") -> EncoderFile:
    """What a build needs of an encoder given as an Encoder, an EncoderFile or a path."""
    if isinstance(encoder, EncoderFile):
        return encoder
    if isinstance(encoder, (str, os.PathLike)):
        return EncoderFile.read(encoder)
    return EncoderFile.of(encoder)


def encode(source, encoder: "Encoder | EncoderFile | str", out: str, *, chunk_rows: int | None = None, client=None,
           scheduler: str | None = None, n_workers: int | None = None) -> Index:
    """Encode every image of ``source`` into a new version of the index at ``out`` and publish it.

    Rerunning after an interruption resumes the same build (same encoder, same source, same
    chunking) and skips its finished chunks. The previous version stays the visible one until
    the new one is complete.
    """
    src = open_source(source)
    enc = encoder_file(encoder)
    chunk_rows = chunk_rows_for(len(src), chunk_rows)
    fingerprint = src.fingerprint()  # hashes the whole listing of a folder source: once
    key = build_key("codes", enc.id, fingerprint, chunk_rows, len(src))
    version = f"v-{key}"
    location = f"{str(out).rstrip('/')}/{version}"
    started = time.perf_counter()
    group = store.create_version(
        location, ids=src.ids, chunk_rows=chunk_rows, labels=src.labels, output=("codes", enc.bits // 8, "uint8"),
        encoder_bytes=enc.to_bytes(), stamps=src.stamps(),
        attrs={"build_key": key, "bits": enc.bits, "encoder_id": enc.id, "encoder_config": enc.config,
               "stamp_scheme": STAMP_SCHEME,
               "source": src.describe(), "source_spec": src.spec(), "source_fingerprint": fingerprint})
    if not group.attrs.get("complete"):
        with job_client(client, scheduler, n_workers) as c:
            counts = run_chunks(c, src, group, location, CodeTransform(location), desc="encoding")
        group.attrs["run"] = counts  # the last run's tasks: how long, how busy the workers were
        summary = store.finish_version(group)
        log.info("encoded %s: %s in %.1f s", location, {**counts, **summary}, time.perf_counter() - started)
    store.write_pointer(str(out), version)
    return open_index(out, warm=False)


def encode_images(encoder: Encoder, paths: list[str]) -> np.ndarray:
    """Encode a few image files in this process (for queries); a bad file is an error naming it."""
    from .images import ImageError, decode_image
    pixels = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                pixels.append(decode_image(f.read()))
        except (ImageError, OSError) as exc:
            raise ImageError(f"{path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    return encoder.encode_pixels(pixels)
