"""The on-disk index: Zarr groups of packed codes, published atomically through a pointer file.

Layout of an index ``INDEX`` (a local folder or an fsspec URL)::

    INDEX/CURRENT             name of the published version (replaced atomically)
    INDEX/<version>/          one Zarr group per version:
        codes    uint8 [N, bits/8]   packed bits, numpy.packbits order, bit 1 ⇔ +1; raw, CRC32C per chunk
        ids      str   [N]           the source's name of each image (small chunks in shards)
        id_crc32 uint32 [N]          CRC32 of each id (UTF-8): finds an id's row without reading all ids
        valid    bool  [N]           False for rejected images
        reason   str   [N]           why a row was rejected ("" if valid)
        removed  bool  [N]           tombstones: images gone from the source since (never searched)
        stamp    uint64 [N]          per-image change stamp of the source (``hashindex update``)
        labels   int64 [N] or uint8 [N, C]   when the source has labels
        encoder  uint8 [nbytes]      the encoder file, so ``query --image`` needs nothing else
        chunk_done uint8 [n_chunks]  build bookkeeping: which tasks' rows are written (resume)
        parts/   codes, valid, reason in one chunk per task, while the version is being built
        attrs:   format, format_version, bits, count, chunk_rows, encoder_id, encoder_config, created, complete, …

A version is written in place under its own name while ``CURRENT`` still names the old one; readers
only ever follow ``CURRENT``, so a half-written version is never visible. Format version 2 added
``removed`` and ``stamp``; version 1 indexes read as having neither.

Chunks: each build task (``chunk_rows`` images) owns one chunk of the arrays it writes, so no two
tasks write the same object. A task's codes are small (4,096 64-bit codes: 32 KB), and zarr spends
~0.4 ms per chunk it reads whatever its size: a 10M-row index read in task chunks takes ~1 s. So when
the task chunks are small, tasks write into ``parts/`` and :func:`finish_version` copies those arrays
into chunks of whole tasks holding :data:`PUBLISHED_CHUNK_BYTES` (64-bit codes: 262,144 rows; 10M
read in ~0.08 s). Arrays written once at creation get those chunks from the start.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import uuid
import zlib
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from . import mih_tables
from .errors import HashindexError

if TYPE_CHECKING:
    import zarr

# zarr and fsspec (~0.2 s to import) are imported where used: opening a local index and answering
# from its stored MIH tables needs neither.

FORMAT = "hashindex"
FORMAT_VERSION = 2
POINTER = "CURRENT"
IDS_CHUNK, IDS_SHARD = 8192, 65536  # rows of the ids array per chunk and per shard file
PUBLISHED_CHUNK_BYTES = 1 << 21     # at least this much of the output array per chunk of a finished version
PARTS = "parts"                     # the group of task-chunked arrays while a version is built
TASK_ARRAYS = ("valid", "reason")   # what every task writes beside its output array
PROGRESS_ROWS = 1 << 20             # publishing this many rows or more shows a progress bar


class StoreError(HashindexError):
    """A missing, incomplete or unreadable index; the message names the path."""


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _now() -> str:
    # microseconds: versions are ordered by these stamps, and nightly tools may publish twice a second
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def local_path(location: str) -> str | None:
    """The filesystem path of a local location (a plain path or a file:// URL); None for other URLs."""
    location = str(location)
    if location.startswith("file://"):
        return location[len("file://"):]
    return None if "://" in location or "::" in location else location


def read_pointer(index: str) -> str | None:
    local = local_path(index)
    if local is not None:
        try:
            with open(_join(local, POINTER), "rb") as f:
                return f.read().decode().strip() or None
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
    import fsspec

    fs, path = fsspec.core.url_to_fs(index)
    try:
        return fs.cat_file(_join(path, POINTER)).decode().strip() or None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def write_pointer(index: str, version: str) -> None:
    """Point readers at ``version``: a rename on local disks, one object PUT on object stores."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(index)
    target = _join(path, POINTER)
    with writing(index, "publishing version " + version):
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "w") as f:
                    f.write(version + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            fs.pipe_file(target, (version + "\n").encode())


@contextlib.contextmanager
def writing(location: str, what: str):
    """Turn a failed write (read-only, full disk, no permission) into one clear error naming the place."""
    try:
        yield
    except OSError as exc:
        published = read_pointer(location.rsplit("/", 1)[0]) or read_pointer(location)
        kept = f"; the published version {published} is unchanged" if published else ""
        raise StoreError(f"{location}: cannot write ({exc.strerror or exc}) while {what}{kept}") from None


def create_version(location: str, *, ids: np.ndarray, chunk_rows: int, output: tuple[str, int, str],
                   labels: np.ndarray | None = None, encoder_bytes: bytes | None = None,
                   stamps: np.ndarray | None = None, removed: np.ndarray | None = None,
                   id_crc32: np.ndarray | None = None, attrs: dict | None = None) -> zarr.Group:
    """Create (or reopen, to resume) a Zarr group of rows not yet written.

    ``output`` is (array name, row width, dtype): ``("codes", bits // 8, "uint8")`` for an index
    version, ``("features", d, "float16")`` for a feature cache. ``id_crc32``: the ids' checksums
    where the caller has them (an update, from its base), else computed here.
    """
    import zarr

    attrs = dict(attrs or {})
    try:
        group = zarr.open_group(location, mode="r+")
        if group.attrs.get("build_key") == attrs.get("build_key") and output[0] in task_arrays(group):
            return group  # resume: same build, keep what is written
    except FileNotFoundError:  # zarr's GroupNotFoundError is one too
        pass
    with writing(location, "creating the version"):
        return _create(location, ids, chunk_rows, output, labels, encoder_bytes, stamps, removed, id_crc32, attrs)


def published_chunk_rows(task_rows: int, row_bytes: int, n: int) -> int:
    """Rows per chunk of a finished version: the fewest whole tasks holding PUBLISHED_CHUNK_BYTES of output."""
    tasks = max(1, -(-PUBLISHED_CHUNK_BYTES // max(1, task_rows * row_bytes)))
    return max(1, min(n, task_rows * tasks))


def id_checksums(ids) -> np.ndarray:
    """CRC32 of each id's UTF-8 bytes: 4 bytes a row that find an id without decoding every id."""
    return np.fromiter((zlib.crc32(str(i).encode()) for i in ids), dtype=np.uint32, count=len(ids))


def task_arrays(group: zarr.Group) -> zarr.Group:
    """The group holding the arrays build tasks write: ``parts/`` while it exists, else the version."""
    return group[PARTS] if PARTS in group else group


def _create(location, ids, chunk_rows, output, labels, encoder_bytes, stamps, removed, id_crc32, attrs) -> zarr.Group:
    import zarr

    n = len(ids)
    group = zarr.open_group(location, mode="w")
    rows = max(1, min(chunk_rows, n))
    name, width, dtype = output
    published = published_chunk_rows(rows, width * np.dtype(dtype).itemsize, n)
    tasks = group if published == rows else group.create_group(PARTS)
    # packed codes barely compress (learned ones by ~10%) and are read whole by every query process:
    # stored raw they read twice as fast; a CRC32C per chunk still turns damage into an error
    compressors = [zarr.codecs.Crc32cCodec()] if name == "codes" else "auto"
    tasks.create_array(name, shape=(n, width), dtype=dtype, chunks=(rows, width), fill_value=0,
                       compressors=compressors)
    tasks.create_array("valid", shape=(n,), dtype="bool", chunks=(rows,), fill_value=False)
    tasks.create_array("reason", shape=(n,), dtype=str, chunks=(rows,))
    # ids are written once, here, so their chunks need not be the tasks': small chunks in shards
    # let a query read the ids of its k results (~30 ms at 10M) without decoding 10 x 65,536 strings
    group.create_array("ids", shape=(n,), dtype=str, chunks=(IDS_CHUNK,), shards=(IDS_SHARD,))
    group["ids"][:] = np.asarray(ids, dtype=object)
    group.create_array("id_crc32", shape=(n,), dtype="uint32", chunks=(published,), fill_value=0)
    group["id_crc32"][:] = id_checksums(ids) if id_crc32 is None else id_crc32
    if labels is not None:
        group.create_array("labels", shape=labels.shape, dtype=labels.dtype, chunks=(published,) + labels.shape[1:])
        group["labels"][:] = labels
    if encoder_bytes is not None:
        enc = np.frombuffer(encoder_bytes, dtype=np.uint8)
        group.create_array("encoder", shape=enc.shape, dtype="uint8", chunks=enc.shape)
        group["encoder"][:] = enc
    group.create_array("removed", shape=(n,), dtype="bool", chunks=(published,), fill_value=False)
    if removed is not None and removed.any():
        group["removed"][:] = removed
    group.create_array("stamp", shape=(n,), dtype="uint64", chunks=(published,), fill_value=0)
    if stamps is not None:
        group["stamp"][:] = stamps
    n_chunks = max(1, -(-n // rows))
    group.create_array("chunk_done", shape=(n_chunks,), dtype="uint8", chunks=(1,), fill_value=0)
    group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                        "count": int(n), "chunk_rows": int(rows), "created": _now(), "complete": False,
                        **attrs})
    return group


def _publish_parts(group: zarr.Group) -> None:
    """Copy the task-chunked arrays of ``parts/`` into the version in published chunks, then drop them.

    Rerun safely after an interruption: the copies are redone until ``parts_published`` is set, and
    only then is ``parts/`` deleted. Memory: one published chunk at a time."""
    if not group.attrs.get("parts_published"):
        parts = group[PARTS]
        output = next(name for name in parts.array_keys() if name not in TASK_ARRAYS)
        n, row_bytes = parts[output].shape[0], parts[output].nbytes // max(1, parts[output].shape[0])
        rows = published_chunk_rows(int(group.attrs["chunk_rows"]), row_bytes, n)
        from tqdm.auto import tqdm  # here: a query process never needs it (~10 ms to import)

        names = (output, *TASK_ARRAYS)
        # ~0.5 s a million rows: a minute at 100M, so it shows progress like the encoding before it
        with tqdm(total=len(names) * n, desc="publishing", unit="row", unit_scale=True, file=sys.stderr,
                  mininterval=1.0, dynamic_ncols=True, disable=n < PROGRESS_ROWS) as bar:
            for name in names:
                src = parts[name]
                dst = group.create_array(name, shape=src.shape, dtype=src.dtype, chunks=(rows,) + src.shape[1:],
                                         fill_value=src.fill_value, compressors=src.compressors, overwrite=True)
                for start in range(0, n, rows):
                    dst[start:start + rows] = src[start:start + rows]
                    bar.update(min(rows, n - start))
        group.attrs["parts_published"] = True
    del group[PARTS]


def finish_version(group: zarr.Group) -> dict:
    """Publish the task-written arrays, count rows, rejects and tombstones, mark the version complete;
    returns the summary stored in its attrs."""
    if PARTS in group:
        with writing(str(group.store_path), "publishing the build's chunks"):
            _publish_parts(group)
    valid = group["valid"][:]
    removed = group["removed"][:] if "removed" in group else np.zeros(len(valid), bool)
    summary = {"valid": int((valid & ~removed).sum()), "rejected": int((~valid & ~removed).sum()),
               "removed": int(removed.sum()), "complete": True, "finished": _now()}
    if "codes" in group and mih_tables.worth_storing(summary["valid"], int(group["codes"].shape[1])):
        # before "complete": a reader never opens the version without the tables it will have
        codes = group["codes"][:]
        searchable = valid & ~removed
        mih_tables.write(str(group.store_path), codes if searchable.all() else codes[searchable])
    group.attrs.update(summary)
    return summary


def version_names(index: str) -> list[str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(index)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(os.path.basename(e.rstrip("/")) for e in entries if fs.isdir(e))


def list_versions(index: str) -> list[dict]:
    """Every version folder of an index with its state, newest first; ``current`` marks the published one."""
    import zarr

    current = read_pointer(index)
    versions = []
    for name in version_names(index):
        try:
            attrs = zarr.open_group(_join(index, name), mode="r").attrs.asdict()
        except Exception:  # noqa: BLE001 - a folder that is not (yet) a readable group
            attrs = {}
        versions.append({"name": name, "current": name == current, "complete": bool(attrs.get("complete")),
                         "created": attrs.get("created"), "finished": attrs.get("finished"),
                         "rows": attrs.get("count"), "valid": attrs.get("valid"), "removed": attrs.get("removed", 0),
                         "encoder_id": attrs.get("encoder_id"), "base_version": attrs.get("base_version")})
    return sorted(versions, key=lambda v: (v["finished"] or v["created"] or ""), reverse=True)


def prune_versions(index: str, keep: int) -> list[str]:
    """Delete complete versions beyond the newest ``keep`` (the published one always stays).

    Unfinished builds are left alone: a rerun resumes them. Readers that opened a deleted version
    lose it, so keep at least 2 when queries may run during an update."""
    import fsspec

    if keep < 1:
        raise StoreError(f"keep must be at least 1, got {keep}")
    complete = [v for v in list_versions(index) if v["complete"]]
    doomed = [v["name"] for v in complete[keep:] if not v["current"]]
    fs, path = fsspec.core.url_to_fs(index)
    for name in doomed:
        with writing(index, f"deleting old version {name}"):
            fs.rm(_join(path, name), recursive=True)
    return doomed


def resolve(path: str) -> tuple[str, str | None]:
    """Location of the Zarr group to read for ``path`` (an index folder or one version's group)."""
    version = read_pointer(path)
    if version is not None:
        return _join(path, version), version
    return path, None


class _Attributes(dict):
    """Read-only group attributes with zarr's ``asdict``."""

    def asdict(self) -> dict:
        return dict(self)


class LocalGroup:
    """A local version's group opened for reading: its attributes read from its ``zarr.json`` (the
    Zarr v3 group metadata) as plain JSON, zarr imported and the group opened only when an array is
    read. A query answered from stored MIH tables reads no array, so its process never imports zarr."""

    def __init__(self, location: str, attrs: dict):
        self.store_path, self.attrs = location, _Attributes(attrs)

    @cached_property
    def zarr_group(self) -> "zarr.Group":
        import zarr

        return zarr.open_group(self.store_path, mode="r")

    def __getitem__(self, name: str):
        return self.zarr_group[name]

    def __contains__(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.store_path, name, "zarr.json"))


def _local_group(location: str) -> LocalGroup | None:
    """A local Zarr v3 group's :class:`LocalGroup`, or None where ``location`` holds no such group."""
    try:
        with open(os.path.join(location, "zarr.json")) as f:
            meta = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        return None
    return LocalGroup(location, meta.get("attributes", {}))


def open_group(path: str) -> tuple["zarr.Group | LocalGroup", str | None]:
    location, version = resolve(path)
    local = local_path(location)
    group = None if local is None else _local_group(local)
    if group is None:
        import fsspec
        import zarr

        fs, inner = fsspec.core.url_to_fs(location)
        if not fs.exists(inner):
            raise StoreError(f"{path}: no index here" if version is None else
                              f"{path}: published version {version} is missing")
        try:
            group = zarr.open_group(location, mode="r")
        except FileNotFoundError:
            raise StoreError(f"{path}: no index here (no {POINTER} file and not a Zarr group)") from None
    attrs = group.attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path}: not a hashindex index (format attribute is {attrs.get('format')!r})")
    if attrs.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(f"{path}: index format version {attrs.get('format_version')} is not supported "
                          f"by this hashindex (reads up to {FORMAT_VERSION}); upgrade hashindex")
    if not attrs.get("complete"):
        raise StoreError(f"{path}: index is incomplete (a build that has not finished)")
    return group, version

