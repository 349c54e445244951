"""The Dask graph that turns a source into rows of a Zarr version: one task per chunk of rows.

Each task decodes its chunk, runs the backbone (and the hash head), and writes its own Zarr region,
then marks the chunk done; a rerun skips done chunks, so a killed job resumes where it stopped and
ends with the same arrays as an uninterrupted run. The same code runs on a LocalCluster of worker
processes (the default) or on any cluster given its scheduler address.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import dask
import numpy as np
import zarr
from tqdm.auto import tqdm

from .sources import Source
from . import store

# torch and the modules built on it are imported where a worker runs a transform: the client of
# `hashindex encode` and `update` only schedules, and importing torch cost it ~1.4 s a job
if TYPE_CHECKING:
    import torch

    from .augment import Augment
    from .backbones import BackboneSpec
    from .encoder import Encoder

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


def _default_augment() -> Augment:
    from .augment import Augment

    return Augment()


@dataclass(frozen=True)
class CodeTransform:
    """Decoded pixels → packed codes, with the encoder read from the version being written."""

    location: str
    batch_size: int = 256
    output = "codes"

    def encoder(self) -> Encoder:
        from .encoder import Encoder

        key = ("encoder", self.location)
        if key not in _LOADED:
            data = zarr.open_group(self.location, mode="r")["encoder"][:].tobytes()
            _LOADED[key] = Encoder.from_bytes(data, name=f"{self.location}/encoder", device=worker_device())
        return _LOADED[key]

    def __call__(self, pixels) -> np.ndarray:
        return self.encoder().encode_pixels(pixels, batch_size=self.batch_size)


@dataclass(frozen=True)
class ViewTransform:
    """Decoded pixels → float16 backbone features of ``views`` augmented views of each image.

    Returns ``[n, views · d]``, view-major (view ``v`` of a row in columns ``v·d … (v+1)·d``), the
    2-D row layout every version array has; :func:`hashindex.build.cached_views` reads it back as
    ``[N, views, d]``. View ``v`` of the image at row ``r`` is ``augment(…, view=v, seed=seed)`` of
    that row, cropped straight to the backbone's input size: it depends on ``(seed, r, v)`` only.
    """

    backbone: BackboneSpec
    augment: Augment = field(default_factory=_default_augment)
    views: int = 8
    seed: int = 0
    batch_size: int = 256
    output = "views"
    takes_rows = True  # _run_chunk passes each image's row: the views are seeded by it

    def __post_init__(self):  # checked here, in the client, rather than in every task
        from .augment import check_seed, check_views

        check_views(self.views)
        check_seed(self.seed)

    @property
    def width(self) -> int:
        """Columns of the output array: ``views · d``."""
        from .backbones import feature_dim

        return self.views * feature_dim(self.backbone)

    def __call__(self, pixels, rows) -> np.ndarray:
        net = _backbone(self.backbone)
        out = np.empty((len(rows), self.views, net.feature_dim), dtype=np.float16)
        for view in range(self.views):  # one batch of augmented pixels at a time: memory of one view
            seen = self.augment(pixels, rows, view=view, seed=self.seed, size=self.backbone.image_size)
            out[:, view] = net.features(seen, self.batch_size)
        return out.reshape(len(rows), -1)


def _backbone(spec: BackboneSpec):
    from .backbones import load_backbone

    key = ("backbone", spec)
    if key not in _LOADED:
        _LOADED[key] = load_backbone(spec, device=worker_device())
    return _LOADED[key]


def worker_device() -> torch.device:
    """CPU, or one GPU per worker: a LocalCluster names its workers 0, 1, …, which spreads them over
    the GPUs; elsewhere (named workers, plain processes) the default CUDA device."""
    import torch

    from .backbones import default_device

    device = default_device()
    if device.type != "cuda":
        return device
    try:
        from dask.distributed import get_worker
        return torch.device(f"cuda:{int(get_worker().name) % torch.cuda.device_count()}")
    except (ValueError, TypeError):
        return device


@dataclass(frozen=True)
class ChunkTask:
    """One task's rows: Zarr chunks ``chunk`` to ``chunk + chunks − 1`` span rows ``[start, stop)`` of
    the version. ``positions`` are the rows it (re)computes from the source (None: all of them, in
    source order); its other rows are copied from version ``base`` (an update) or left empty."""

    chunk: int
    start: int
    stop: int
    source_rows: np.ndarray
    positions: np.ndarray | None = None
    chunks: int = 1  # an update groups chunks with few changed rows: one batch of images a task


def _run_chunk(reader, transform, location: str, task: ChunkTask, base: str | None, width: int, dtype: str,
               torch_threads: int) -> tuple[int, int]:
    """One task: decode → transform → write the chunk's region → mark it done. Returns (ok, rejected,
    seconds the task ran)."""
    started = time.perf_counter()
    n = task.stop - task.start
    values = np.zeros((n, width), dtype=dtype)
    valid = np.zeros(n, dtype=bool)
    reasons = np.full(n, "", dtype=object)
    if base is not None:  # rows kept from the base version
        old = zarr.open_group(base, mode="r")
        keep = max(0, min(task.stop, old[transform.output].shape[0]) - task.start)
        if keep:
            values[:keep] = old[transform.output][task.start:task.start + keep]
            valid[:keep] = old["valid"][task.start:task.start + keep]
            if not valid[:keep].all():
                # only rejected rows have a reason; reading one decodes the whole published chunk
                # of strings (512k rows, ~55 ms), which every task of a 1M update paid for nothing
                reasons[:keep] = old["reason"][task.start:task.start + keep]
    ok = rejected = 0
    if reader is not None:
        import torch  # here: a task that only copies base rows needs none of it

        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        decoded = reader()
        local = np.arange(n) if task.positions is None else task.positions - task.start
        if decoded.ok.any():
            # a transform that seeds by row (ViewTransform) also gets the version rows of the images
            seeded = (task.start + local[decoded.ok],) if getattr(transform, "takes_rows", False) else ()
            values[local[decoded.ok]] = transform(decoded.pixels, *seeded)
        values[local[~decoded.ok]] = 0
        valid[local] = decoded.ok
        reasons[local] = np.asarray(decoded.reasons, dtype=object)
        ok, rejected = int(decoded.ok.sum()), int((~decoded.ok).sum())
    group = zarr.open_group(location, mode="r+")
    rows = store.task_arrays(group)
    with store.writing(location, f"writing rows {task.start}–{task.stop}"):
        rows[transform.output][task.start:task.stop] = values
        rows["valid"][task.start:task.stop] = valid
        rows["reason"][task.start:task.stop] = reasons
        group["chunk_done"][task.chunk:task.chunk + task.chunks] = 1
    return ok, rejected, time.perf_counter() - started


# ----------------------------------------------------------------------------- cluster
def worker_environment() -> dict:
    """Environment for worker processes, set before they start (glibc reads it once).

    Dask runs tasks on a pool thread, and glibc gives each thread its own malloc arena; a non-main
    arena returns freed pages to the OS at once, so every backbone batch faulted its activations
    back in (millions of page faults, ~11 s of system time per 8,192 images, the forward at 0.6×
    its speed in the client). One arena removes that. Workers of an external cluster need the
    same variable: ``MALLOC_ARENA_MAX=1 dask worker …``."""
    return {**dask.config.get("distributed.nanny.pre-spawn-environ"), "MALLOC_ARENA_MAX": 1}


def _warn_about_worker_malloc(client) -> None:
    try:
        settings = client.run(os.environ.get, "MALLOC_ARENA_MAX")
    except Exception:  # noqa: BLE001 - a worker that cannot answer is the scheduler's business
        return
    slow = sorted(w for w, value in settings.items() if value != "1")
    if slow:
        log.warning("%d worker(s) run without MALLOC_ARENA_MAX=1 (e.g. %s): the backbone may encode ~40%% slower; "
                    "start them with MALLOC_ARENA_MAX=1 in their environment", len(slow), slow[0])


def gpu_count() -> int:
    """torch's count of GPUs, without importing torch (a second of a job's start) on a machine with
    no GPU driver's device files, where that count is 0."""
    if "torch" not in sys.modules and not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/kfd"):
        return 0
    import torch

    return torch.cuda.device_count()


@contextlib.contextmanager
def job_client(client=None, scheduler: str | None = None, n_workers: int | None = None):
    """``client`` if given, else :func:`dask_client` for the duration of the block."""
    if client is not None:
        yield client
    else:
        with dask_client(scheduler, n_workers=n_workers) as new:
            yield new


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, *, n_workers: int | None = None, threads_per_worker: int = 1):
    """A distributed Client: to ``scheduler`` if given, else a fresh LocalCluster of worker processes."""
    from dask.distributed import Client, LocalCluster

    # the client process logs every nanny start/stop at INFO: keep only warnings
    logging.getLogger("distributed").setLevel(max(logging.WARNING, logging.getLogger().level))
    if scheduler:
        with Client(scheduler) as client:
            _warn_about_worker_malloc(client)
            yield client
        return
    n_workers = n_workers or max(1, min(os.cpu_count() or 1, gpu_count() or os.cpu_count() or 1))
    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environment()}):
        # no dashboard, and its HTTP endpoint on a free port: the default 8787 warns "already in use"
        # in every job that runs beside another
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"},
                               silence_logs=logging.WARNING)
    client = Client(cluster)
    try:
        yield client
    finally:
        _close_quietly(client, cluster)


_TEARDOWN_LOGGERS = ("distributed", "tornado")


def _silence_teardown_logs() -> None:
    """Connection errors while a cluster closes (a heartbeat that meets a closed scheduler logs a
    CommClosedError traceback) are expected then; a nightly log must not show them."""
    for name in _TEARDOWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _close_quietly(client, cluster) -> None:
    # the work is written and published by now: a slow shutdown (an overloaded machine) must not
    # turn a finished job into a failed one, nor print tracebacks into its log
    try:  # logging.disable pickles by reference to the standard library: no worker imports anything
        client.run(logging.disable, logging.CRITICAL, wait=True)
    except Exception:  # noqa: BLE001 - workers that are already gone need no silencing
        pass
    levels = {name: logging.getLogger(name).level for name in _TEARDOWN_LOGGERS}
    _silence_teardown_logs()
    try:
        for close in (client.close, cluster.close):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - timeouts and comm errors while tearing down
                log.warning("Dask cluster shutdown: %s: %s", type(exc).__name__, exc)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def build_key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def full_plan(n: int, chunk_rows: int) -> list[ChunkTask]:
    """Every chunk of a fresh build: chunk c computes source rows ``[c·R, (c+1)·R)``."""
    return [ChunkTask(c, start, min(n, start + chunk_rows), np.arange(start, min(n, start + chunk_rows)))
            for c, start in enumerate(range(0, max(n, 1), chunk_rows))]


def run_chunks(client, source: Source, group: zarr.Group, location: str, transform, *,
               plan: list[ChunkTask] | None = None, base: str | None = None,
               torch_threads: int = 1, desc: str = "encoding") -> dict:
    """Run every not-yet-done task of ``plan`` (default: the whole source) into ``group`` on the
    cluster; returns counts. Each task owns its Zarr chunks, so no two tasks write the same object."""
    from dask.distributed import as_completed

    plan = plan if plan is not None else full_plan(len(source), group.attrs["chunk_rows"])
    done = group["chunk_done"][:]
    todo = [t for t in plan if not done[t.chunk:t.chunk + t.chunks].all()]
    output = store.task_arrays(group)[transform.output]
    width, dtype = output.shape[1], str(output.dtype)
    if len(todo) < len(plan):
        log.info("resuming %s: %d of %d chunks already written", location, len(plan) - len(todo), len(plan))
    futures = []
    started = time.perf_counter()
    # heaviest first (longest-processing-time order): an update's new images all land in its last
    # chunks, and a 1,000-image chunk started last kept one of two workers busy alone for 2.3 s of a
    # 4.2 s run at 100k files; a fresh build's chunks are equal and keep their order. Both the order
    # and the priority count: the scheduler hands a task to an idle worker as soon as it arrives
    for task in sorted(todo, key=lambda t: -len(t.source_rows)):
        reader = source.reader(task.source_rows) if len(task.source_rows) else None
        futures.append(client.submit(_run_chunk, reader, transform, location, task, base, width, dtype,
                                     torch_threads, key=f"{desc}-{os.path.basename(location)}-{task.chunk}",
                                     pure=False, priority=len(task.source_rows)))
    total = sum(len(t.source_rows) for t in plan)
    ok = rejected = 0
    busy = 0.0
    with tqdm(total=total, initial=total - sum(len(t.source_rows) for t in todo), desc=desc, unit="img",
              file=sys.stderr, mininterval=1.0, dynamic_ncols=True) as bar:
        for future in as_completed(futures):
            good, bad, seconds = future.result()
            ok, rejected, busy = ok + good, rejected + bad, busy + seconds
            bar.update(good + bad)
    # how much of the run the workers spent in tasks: the rest is Dask's scheduling and transfers,
    # worker start-up and waiting for the last task (bench/scale.py reports it)
    workers = len(client.scheduler_info().get("workers", {})) or 1
    wall = time.perf_counter() - started
    return {"chunks": sum(t.chunks for t in plan), "chunks_run": sum(t.chunks for t in todo), "tasks": len(todo),
            "ok": ok, "rejected": rejected,
            "wall_seconds": round(wall, 2), "task_seconds": round(busy, 2), "workers": workers,
            "busy_share": round(busy / max(wall * workers, 1e-9), 4)}
