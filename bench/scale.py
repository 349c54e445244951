"""How the costs of a collection grow with it: encode, the nightly update and a crash-resume, at N
files (issue 15). A benchmark, never a test.

The collection is a real folder tree, built once per N and cached: files derived deterministically
from Fashion-MNIST's 70,000 images (each copy shifted, flipped, cropped, rotated a little, or saved
at another JPEG quality), JPEG and PNG mixed, 1,000 files a folder, two levels deep, as photo
archives are laid out, with a list file over the same files and one broken file in 20,000. Then,
with the CLI as a user runs it (ITQ 32 bits trained on the protocol's training features, 64 px,
a 2-worker LocalCluster, the default chunking):

- listing + fingerprinting the folder (``open_source``, ``fingerprint``, ``stamps``);
- ``hashindex encode``: wall time, img/s, Dask tasks and how busy they kept the workers (task
  seconds over the Dask run's wall × workers: the rest is the scheduler's share, start-up and the
  tail), index size, peak RSS of the client process and of each worker process (sampled every 0.2 s);
- the nightly ``hashindex update`` after 1 % new, 1 % modified and 1 % deleted files (on a
  hard-linked copy of the tree), against the full encode, and its result against a fresh encode of
  the changed folder, row for row (codes, validity, tombstones);
- queries on the index: a cold ``hashindex query --image`` in a fresh process, and the evaluation
  of 1,000 queries (files of the collection, encoded from a list file) against the whole index;
- crash and resume: the encode SIGKILLed (process group) at ~60 % of its tasks, rerun, against the
  uninterrupted run, and the arrays compared.

    python bench/scale.py [--sizes 10000 100000] [--root ~/.cache/hashindex/bench/scale]

Writes bench/results/scale.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FILES_PER_FOLDER = 1000
BROKEN_EVERY = 20_000


# ----------------------------------------------------------------------------- the collection
def _variant(image: np.ndarray, i: int):
    """Copy ``i // 70000`` of an image: the original first, then seeded shifts, flips, crops,
    rotations and JPEG qualities. Returns (PIL image, format, quality)."""
    from PIL import Image

    copy = i // 70_000
    rng = np.random.default_rng([i, 15])
    img = Image.fromarray(image)
    if copy:
        kind = copy % 4
        if kind == 0:
            img = Image.fromarray(np.roll(image, tuple(rng.integers(-3, 4, 2)), axis=(0, 1)))
        elif kind == 1:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif kind == 2:
            x, y = rng.integers(0, 5, 2)
            img = img.crop((x, y, x + 24, y + 24)).resize((28, 28), Image.Resampling.BILINEAR)
        else:
            img = img.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
    jpeg = i % 2 == 1
    return img, ("JPEG" if jpeg else "PNG"), int(rng.integers(70, 96))


def relative_path(i: int) -> str:
    leaf = i // FILES_PER_FOLDER
    return f"a{leaf // 100:03d}/b{leaf % 100:02d}/img_{i:07d}.{'jpg' if i % 2 else 'png'}"


def _write_block(args) -> int:
    root, start, stop = args
    from hashindex.sources import open_source

    fmnist = open_source("fashion-mnist")
    rows = np.arange(start, stop) % 70_000
    pixels = fmnist.read(rows).pixels
    for j, i in enumerate(range(start, stop)):
        path = Path(root) / relative_path(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        if i % BROKEN_EVERY == BROKEN_EVERY - 1:
            path.write_bytes(b"\xff\xd8\xff\xe0 truncated")  # a broken file, as real archives have
            continue
        img, fmt, quality = _variant(pixels[j][..., 0], i)
        img.save(path, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return stop - start


def build_collection(root: Path, n: int) -> Path:
    """The folder tree of ``n`` files (cached: a marker says it is complete) and its list file."""
    marker = root / ".complete"
    if marker.exists():
        if not list_file_is_current(root):  # collections cached before the list file was one-hot
            write_list_file(root, n)
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    started = time.perf_counter()
    blocks = [(str(root), s, min(n, s + 10_000)) for s in range(0, n, 10_000)]
    with Pool(os.cpu_count() or 2) as pool:
        done = 0
        for count in pool.imap_unordered(_write_block, blocks):
            done += count
            print(f"# collection {n:,}: {done:,} files written", flush=True)
    write_list_file(root, n)
    marker.write_text(json.dumps({"files": n, "seconds": round(time.perf_counter() - started, 1)}))
    return root


def write_list_file(root: Path, n: int) -> None:
    """``list.txt``: each file with its one-hot Fashion-MNIST label, the deep-hashing list format
    (``path 0 0 1 …``) that ``hashindex`` reads (a single class number per line is not that format)."""
    from hashindex.sources import open_source

    labels = open_source("fashion-mnist").labels[np.arange(n) % 70_000]
    rows = np.eye(10, dtype=np.int64)[labels]
    with open(root / "list.txt", "w") as f:
        f.writelines(f"{relative_path(i)} {' '.join(map(str, rows[i]))}\n" for i in range(n))


def list_file_is_current(root: Path) -> bool:
    with open(root / "list.txt") as f:
        return len(f.readline().split()) == 11


# ----------------------------------------------------------------------------- measuring a command
class PeakMemory:
    """Peak RSS of a process and of each of its descendants, sampled every 0.2 s."""

    def __init__(self, pid: int):
        import psutil
        self.root, self.peaks, self._stop = psutil.Process(pid), {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                try:
                    self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.2)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        client = self.peaks.pop(self.root.pid, 0)
        workers = sorted(self.peaks.values(), reverse=True)[:2]  # the two worker processes
        return {"client_mb": round(client / 2**20), "worker_mb": [round(w / 2**20) for w in workers]}


def cli(*args, kill_at: float | None = None, out: str | None = None) -> dict:
    """Run ``hashindex ARGS``; with ``kill_at``, SIGKILL its process group once that share of the
    version's tasks is done. Returns wall seconds, peak memory and whether it was killed."""
    import zarr

    from hashindex import store

    proc = subprocess.Popen([sys.executable, "-m", "hashindex.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    memory = PeakMemory(proc.pid)
    started, killed, progress = time.perf_counter(), False, None
    while proc.poll() is None:
        # watching the progress costs CPU the job needs: a poll every 0.1 s, reopening the group each
        # time, slowed the 1M encode it watched from 775 to 647 img/s (resume measured 1.12x); the
        # group is opened once and read every second
        if kill_at is not None and progress is None and os.path.isdir(out) and store.version_names(out):
            try:
                progress = zarr.open_group(f"{out}/{store.version_names(out)[0]}", mode="r")["chunk_done"]
            except Exception:  # noqa: BLE001 - half-created group
                pass
        if progress is not None and not killed and progress[:].mean() >= kill_at:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(1.0 if kill_at is not None else 0.1)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0 and not killed:
        raise RuntimeError(f"hashindex {' '.join(args)} failed: {stderr[-2000:]}")
    return {"seconds": round(seconds, 2), "killed": killed, **memory.stop(), "stdout": stdout[-500:]}


def folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def same_index(a_path: str, b_path: str) -> dict:
    """Row for row by id: every image of the fresh index ``b`` is in ``a`` (not removed) with equal
    code and validity, and ``a``'s removed rows are exactly the ids ``b`` does not have."""
    import hashindex

    a, b = hashindex.open(a_path, warm=False), hashindex.open(b_path, warm=False)
    live = ~a.removed
    a_rows = {i: r for r, i in enumerate(a.ids) if live[r]}
    b_ids = list(b.ids)
    rows = np.array([a_rows.get(i, -1) for i in b_ids])
    missing = int((rows < 0).sum())
    found = rows >= 0
    return {"missing": missing,
            "codes_equal": bool((a.codes[rows[found]] == b.codes[found]).all()),
            "valid_equal": bool((a.valid[rows[found]] == b.valid[found]).all()),
            "tombstones_equal": set(np.asarray(a.ids)[a.removed]) == set(a.ids) - set(b_ids)}


# ----------------------------------------------------------------------------- one size
def measure(n: int, root: Path, encoder: str, work: Path, fresh: bool = True, resume: bool = True) -> dict:
    import hashindex

    folder = build_collection(root / f"{n}", n)
    record = {"files": n}
    t = time.perf_counter()
    source = hashindex.open_source(str(folder))
    record["listing_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    source.fingerprint()
    source.stamps()
    record["fingerprint_s"] = round(time.perf_counter() - t, 2)

    index = str(work / "db.index")
    run = cli("encode", "--encoder", encoder, "--source", str(folder), "--out", index, "--workers", "2")
    built = hashindex.open(index, warm=False)
    chunk_rows = int(built.attrs.get("chunk_rows", 0) or 0)
    record["encode"] = {"seconds": run["seconds"], "img_s": round(n / run["seconds"], 1),
                        "client_mb": run["client_mb"], "worker_mb": run["worker_mb"],
                        "tasks": -(-n // chunk_rows) if chunk_rows else None, "chunk_rows": chunk_rows,
                        "index_mb": round(folder_bytes(index) / 2**20, 1),
                        "valid": int(built.attrs["valid"]), "rejected": int(built.attrs["rejected"]),
                        **_busy(built)}
    print(json.dumps({"files": n, "encode": record["encode"]}), flush=True)
    record["queries"] = measure_queries(folder, index, encoder, work)
    print(json.dumps({"files": n, "queries": record["queries"]}), flush=True)

    # the nightly update: 1 % new, 1 % modified, 1 % deleted, on a hard-linked copy of the tree
    changed = work / "changed"
    subprocess.run(["cp", "-al", str(folder), str(changed)], check=True)
    (changed / ".complete").unlink()
    rng = np.random.default_rng([n, 7])
    picks = rng.permutation(n)
    k = max(1, n // 100)
    deleted, modified = picks[:k], picks[k:2 * k]
    for i in deleted:
        (changed / relative_path(int(i))).unlink(missing_ok=True)
    from PIL import Image
    for i in modified:
        path = changed / relative_path(int(i))
        path.unlink(missing_ok=True)  # a new file, not a write through the hard link
        Image.fromarray(np.full((28, 28), int(i) % 255, np.uint8)).rotate(10).save(
            path, format="JPEG" if path.suffix == ".jpg" else "PNG")
    source_pixels = hashindex.open_source("fashion-mnist").read(np.arange(k) % 70_000).pixels
    for j in range(k):
        path = changed / "new" / f"n{j // FILES_PER_FOLDER:03d}" / f"new_{j:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(source_pixels[j][::-1, :, 0])).save(path)
    updated = str(work / "updated.index")
    shutil.copytree(index, updated)
    run = cli("update", "--encoder", encoder, "--source", str(changed), "--out", updated, "--workers", "2", "--json")
    counts = json.loads(run["stdout"][run["stdout"].index("{"):])
    record["update"] = {"seconds": run["seconds"], "share_of_encode": round(run["seconds"] / record["encode"]["seconds"], 4),
                        "added": counts["added"], "changed": counts["changed"], "removed": counts["removed"],
                        "client_mb": run["client_mb"], **_busy(hashindex.open(updated, warm=False))}
    if fresh:
        fresh_index = str(work / "fresh.index")
        cli("encode", "--encoder", encoder, "--source", str(changed), "--out", fresh_index, "--workers", "2")
        record["update"].update(same_index(updated, fresh_index))
    print(json.dumps({"files": n, "update": record["update"]}), flush=True)
    if not resume:
        return record

    # crash at ~60 % and resume
    resumed = str(work / "resumed.index")
    first = cli("encode", "--encoder", encoder, "--source", str(folder), "--out", resumed, "--workers", "2",
                kill_at=0.6, out=resumed)
    second = cli("encode", "--encoder", encoder, "--source", str(folder), "--out", resumed, "--workers", "2")
    a, b = hashindex.open(resumed, warm=False), built
    record["resume"] = {"killed": first["killed"], "killed_after_s": first["seconds"], "rerun_s": second["seconds"],
                        "total_over_uninterrupted": round((first["seconds"] + second["seconds"]) / record["encode"]["seconds"], 3),
                        "identical": bool(a.version == b.version and (a.codes == b.codes).all()
                                          and (a.valid == b.valid).all() and (a.ids == b.ids).all())}
    print(json.dumps({"files": n, "resume": record["resume"]}), flush=True)
    return record


def _busy(index) -> dict:
    """How busy the workers were during the version's Dask run (``run_chunks`` records it): task
    seconds over wall × workers. The rest is Dask's scheduling, worker start-up and the tail."""
    run = index.attrs.get("run") or {}
    return {"busy_share": run.get("busy_share"), "task_seconds": run.get("task_seconds"),
            "dask_wall_seconds": run.get("wall_seconds")}


def measure_queries(folder: Path, index: str, encoder: str, work: Path, n_queries: int = 1000) -> dict:
    """A cold ``hashindex query --image`` (a fresh process: imports, opening the index, encoding the
    image, searching) and the evaluation of 1,000 queries. The queries are files of the collection
    drawn at random, encoded from a list file into their own index with their labels; the folder
    index holds no labels, so the database's come from the collection's list file by id, and the
    evaluation runs what ``hashindex eval`` runs (``metrics.evaluate`` over the searchable rows)."""
    import hashindex
    from hashindex import metrics

    lines = (folder / "list.txt").read_text().splitlines()
    rng = np.random.default_rng(3)
    picked = [lines[i] for i in np.sort(rng.choice(len(lines), n_queries + 50, replace=False))]
    probe = folder / picked[0].split()[0]
    run = cli("query", index, "--image", str(probe), "-k", "10", "--json")
    record = {"cold_query_image_s": run["seconds"], "cold_query_client_mb": run["client_mb"]}
    query_list = work / "queries.txt"
    query_list.write_text("\n".join(picked) + "\n")
    queries_index = str(work / "queries.index")
    run = cli("encode", "--encoder", encoder, "--source", str(query_list), "--root", str(folder),
              "--out", queries_index, "--workers", "2")
    record["encode_queries_s"] = run["seconds"]
    started = time.perf_counter()
    database, queries = hashindex.open(index, warm=False), hashindex.open(queries_index, warm=False)
    listed = hashindex.open_source(str(folder / "list.txt"))
    order = np.argsort(listed.ids)
    db_labels = listed.labels[order[np.searchsorted(listed.ids[order], database.ids)]].argmax(1)
    qv, dv = np.flatnonzero(queries.searchable)[:n_queries], database.searchable
    result = metrics.evaluate(queries.codes[qv], database.codes[dv], queries.labels[qv].argmax(1), db_labels[dv],
                              topks=(None, 1000))
    record.update({"eval_queries": int(len(qv)), "eval_s": round(time.perf_counter() - started, 2),
                   "map@all": round(result["map@all"], 4), "map@1000": round(result["map@1000"], 4)})
    return record


def train_encoder(path: Path) -> str:
    import hashindex
    from hashindex.backbones import BackboneSpec

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        source = hashindex.open_source("fashion-mnist")
        _, train, _ = hashindex.protocol_split(source, seed=0)
        hashindex.train_encoder(source.subset(train), "itq", 32, backbone=BackboneSpec("efficientnet-lite0", 64)).save(path)
    return str(path)


def markdown(payload: dict) -> str:
    lines = [f"`python bench/scale.py` on {payload['machine']}: ITQ 32 bits, 64 px, 2-worker LocalCluster, the CLI "
             "as a user runs it. Update: after 1 % new, 1 % modified, 1 % deleted files (targets: ≤ 6 % of the "
             "full encode at 100k, ≤ 3 % at 1M). Resume: SIGKILL at ~60 % of the tasks, rerun (target ≤ 1.1×).", "",
             "Workers busy: the share of the Dask run (wall × workers) the workers spent in tasks; the rest is "
             "scheduling, worker start-up and the last tasks' tail.", "",
             "| files | listing s | fingerprint s | encode s | img/s | tasks | workers busy | index MB | client MB | worker MB | "
             "update s | update / encode | update = fresh encode | resume total / uninterrupted | resumed = uninterrupted | "
             "cold query --image s | eval 1,000 queries s (mAP@all) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        e, u, c = r["encode"], r["update"], r.get("resume")
        same = ("not run" if "missing" not in u else "yes" if u["missing"] == 0 and u["codes_equal"]
                and u["valid_equal"] and u["tombstones_equal"] else "**no**")
        resumed = ("not run", "not run") if c is None else (f"{c['total_over_uninterrupted']:.2f}×",
                                                              "yes" if c["identical"] else "**no**")
        lines.append(f"| {r['files']:,} | {r['listing_s']} | {r['fingerprint_s']} | {e['seconds']} | {e['img_s']} | "
                     f"{e['tasks']} | {f'{b:.0%}' if (b := e.get('busy_share')) is not None else 'not recorded'} | "
                     f"{e['index_mb']} | {e['client_mb']} | {' / '.join(map(str, e['worker_mb']))} | "
                     f"{u['seconds']} | {u['share_of_encode']:.1%} | {same} | {resumed[0]} | {resumed[1]} | "
                     + (f"{q['cold_query_image_s']} | {q['eval_s']} ({q['map@all']}) |" if (q := r.get("queries"))
                        else "not run | not run |"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    default_root = Path(os.environ.get("HASHINDEX_CACHE", Path.home() / ".cache" / "hashindex")) / "bench" / "scale"
    ap.add_argument("--root", type=Path, default=default_root)
    ap.add_argument("--out", default=str(HERE / "results" / "scale"))
    ap.add_argument("--no-fresh", action="store_true", help="skip the fresh encode the update is compared with")
    ap.add_argument("--no-resume", action="store_true", help="skip the crash-and-resume runs")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from machine import machine_info

    encoder = train_encoder(args.root / "itq32.encoder")
    out = Path(args.out)
    # rows of other sizes already measured are kept: a size can be (re)measured alone
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    rows = [r for r in previous.get("rows", []) if r["files"] not in args.sizes]
    for n in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.root) as work:
            record = measure(n, args.root, encoder, Path(work), fresh=not args.no_fresh, resume=not args.no_resume)
            record["command"] = "python bench/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
            rows.append(record)
    rows.sort(key=lambda r: r["files"])
    info = machine_info()
    payload = {"command": "python bench/scale.py [--sizes N …] (each row records its own)",
               "machine": f"{info.get('cpu', '?')}, {info.get('cores', os.cpu_count())} cores", "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    out.with_suffix(".md").write_text(markdown(payload))
    from hashindex.plots import plot_lines
    plot_lines({"encode s": {r["files"]: r["encode"]["seconds"] for r in rows},
                "update s": {r["files"]: r["update"]["seconds"] for r in rows},
                "worker peak MB": {r["files"]: max(r["encode"]["worker_mb"] or [0]) for r in rows},
                "client peak MB": {r["files"]: r["encode"]["client_mb"] for r in rows}},
               out.with_suffix(".png"), "Cost against collection size (2 workers, ITQ 32 bits)", "files", "s or MB",
               logy=True)
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
