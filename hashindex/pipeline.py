"""The Dask graph that turns a source into rows of a Zarr version: one task per chunk of rows.

Each task decodes its chunk, runs the backbone (and the hash head), and writes its own Zarr region,
then marks the chunk done; a rerun skips done chunks, so a killed job resumes where it stopped and
ends with the same arrays as an uninterrupted run. The same code runs on a LocalCluster of worker
processes (the default) or on any cluster given its scheduler address.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from .backbones import BackboneSpec, default_device, load_backbone
from .encoder import Encoder
from .sources import Source

log = logging.getLogger(__name__)
DEFAULT_CHUNK_ROWS = 4096
MIN_CHUNK_ROWS = 256


def chunk_rows_for(n: int, chunk_rows: int | None = None) -> int:
    """Rows per task and Zarr chunk: the default, or fewer for small sources so that every worker of
    a small cluster gets work. Depends on ``n`` only, so a rerun resumes the same chunking."""
    if chunk_rows:
        return int(chunk_rows)
    return int(min(DEFAULT_CHUNK_ROWS, max(MIN_CHUNK_ROWS, -(-n // 8))))


# ----------------------------------------------------------------------------- transforms
# Built once per worker process and kept: loading a backbone costs far more than one chunk's forward.
_LOADED: dict[tuple, object] = {}


@dataclass(frozen=True)
class FeatureTransform:
    """Decoded pixels → float16 backbone features."""

    backbone: BackboneSpec
    batch_size: int = 256
    output = "features"

    def __call__(self, pixels) -> np.ndarray:
        return _backbone(self.backbone).features(pixels, self.batch_size).astype(np.float16)


@dataclass(frozen=True)
class CodeTransform:
    """Decoded pixels → packed codes, with the encoder read from the version being written."""

    location: str
    batch_size: int = 256
    output = "codes"

    def encoder(self) -> Encoder:
        key = ("encoder", self.location)
        if key not in _LOADED:
            data = zarr.open_group(self.location, mode="r")["encoder"][:].tobytes()
            _LOADED[key] = Encoder.from_bytes(data, name=f"{self.location}/encoder", device=worker_device())
        return _LOADED[key]

    def __call__(self, pixels) -> np.ndarray:
        return self.encoder().encode_pixels(pixels, batch_size=self.batch_size)


def _backbone(spec: BackboneSpec):
    key = ("backbone", spec)
    if key not in _LOADED:
        _LOADED[key] = load_backbone(spec, device=worker_device())
    return _LOADED[key]


def worker_device() -> torch.device:
    """CPU, or one GPU per worker: a LocalCluster names its workers 0, 1, …, which spreads them over
    the GPUs; elsewhere (named workers, plain processes) the default CUDA device."""
    device = default_device()
    if device.type != "cuda":
        return device
    try:
        from dask.distributed import get_worker
        return torch.device(f"cuda:{int(get_worker().name) % torch.cuda.device_count()}")
    except (ValueError, TypeError):
        return device


def _run_chunk(reader, transform, location: str, start: int, chunk_index: int, width: int, dtype: str,
               torch_threads: int) -> tuple[int, int]:
    """One task: decode → transform → write region → mark done. Returns (ok, rejected) counts."""
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    decoded = reader()
    n = len(decoded.ok)
    values = np.zeros((n, width), dtype=dtype)
    if decoded.ok.any():
        values[decoded.ok] = transform(decoded.pixels)
    group = zarr.open_group(location, mode="r+")
    stop = start + n
    group[transform.output][start:stop] = values
    group["valid"][start:stop] = decoded.ok
    group["reason"][start:stop] = np.asarray(decoded.reasons, dtype=object)
    group["chunk_done"][chunk_index] = 1
    return int(decoded.ok.sum()), int(n - decoded.ok.sum())


# ----------------------------------------------------------------------------- cluster
@contextlib.contextmanager
def dask_client(scheduler: str | None = None, *, n_workers: int | None = None, threads_per_worker: int = 1):
    """A distributed Client: to ``scheduler`` if given, else a fresh LocalCluster of worker processes."""
    from dask.distributed import Client, LocalCluster

    # the client process logs every nanny start/stop at INFO: keep only warnings
    logging.getLogger("distributed").setLevel(max(logging.WARNING, logging.getLogger().level))
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    n_workers = n_workers or max(1, min(os.cpu_count() or 1, torch.cuda.device_count() or os.cpu_count() or 1))
    with LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                      dashboard_address=None, silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
        yield client


def build_key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def run_chunks(client, source: Source, group: zarr.Group, location: str, transform, *,
               torch_threads: int = 1, desc: str = "encoding") -> dict:
    """Run every not-yet-done chunk of ``source`` into ``group`` on the cluster; returns counts."""
    from dask.distributed import as_completed

    rows = group.attrs["chunk_rows"]
    n = len(source)
    done = group["chunk_done"][:]
    todo = [c for c in range(len(done)) if not done[c]]
    width, dtype = group[transform.output].shape[1], str(group[transform.output].dtype)
    if len(todo) < len(done):
        log.info("resuming %s: %d of %d chunks already written", location, len(done) - len(todo), len(done))
    futures = []
    for c in todo:
        start, stop = c * rows, min(n, (c + 1) * rows)
        reader = source.reader(np.arange(start, stop, dtype=np.int64))
        futures.append(client.submit(_run_chunk, reader, transform, location, start, c, width, dtype,
                                     torch_threads, key=f"{desc}-{os.path.basename(location)}-{c}", pure=False))
    ok = rejected = 0
    with tqdm(total=n, initial=n - sum(min(n, (c + 1) * rows) - c * rows for c in todo), desc=desc,
              unit="img", file=sys.stderr, mininterval=1.0, dynamic_ncols=True) as bar:
        for future in as_completed(futures):
            good, bad = future.result()
            ok, rejected = ok + good, rejected + bad
            bar.update(good + bad)
    return {"chunks": len(done), "chunks_run": len(todo), "ok": ok, "rejected": rejected}
