"""Real images through the real EfficientNet-Lite0, scheduled by a real Dask LocalCluster, into Zarr."""
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

import hashindex
from hashindex import store
from hashindex.indexing import encode_images
from hashindex.pipeline import dask_client


@pytest.fixture(scope="module")
def trained(image_folder, client, cache_dir, tmp_path_factory):
    """ITQ trained on the image folder (features cached with Dask) and the folder encoded into an index."""
    out = tmp_path_factory.mktemp("run")
    encoder = hashindex.train_encoder(image_folder["path"], "itq", 32, client=client)
    encoder_path = encoder.save(out / "itq.encoder")
    index = hashindex.encode(image_folder["path"], encoder, str(out / "db.index"), chunk_rows=64, client=client)
    return {"encoder": encoder, "encoder_path": str(encoder_path), "index": index, "out": out}


def test_index_holds_every_image_and_records_rejects(trained, image_folder):
    index = trained["index"]
    assert len(index) == 302 and index.ntotal == 300 and index.bits == 32
    assert index.attrs["valid"] == 300 and index.attrs["rejected"] == 2
    assert dict(index.rejects) == {"broken/empty.jpg": "empty file (0 bytes)",
                                   "broken/notes.png": "not an image (unrecognised format)"}
    assert index.attrs["encoder_id"] == trained["encoder"].id
    assert index.encoder.id == trained["encoder"].id  # the stored copy is the same encoder
    # the run's record: every chunk ran as a task, and the workers' task time fits in the run
    run = index.attrs["run"]
    assert run["chunks"] == run["chunks_run"] == 5 and run["ok"] == 300 and run["workers"] >= 1
    assert 0 < run["task_seconds"] <= run["wall_seconds"] * run["workers"] and 0 < run["busy_share"] <= 1


def test_pipeline_codes_equal_in_process_codes(trained, image_folder):
    index = trained["index"]
    rows = index.rows_of(image_folder["ids"][:40])
    paths = [os.path.join(image_folder["path"], i) for i in image_folder["ids"][:40]]
    assert (encode_images(trained["encoder"], paths) == index.codes[rows]).all()


def test_query_by_image_finds_itself(trained, image_folder):
    index = trained["index"]
    path = os.path.join(image_folder["path"], image_folder["ids"][7])
    distances, rows = index.search(encode_images(index.encoder, [path]), 5)
    assert distances[0, 0] == 0 and image_folder["ids"][7] in set(index.ids[rows[0][distances[0] == 0]])
    # neighbours are mostly the same class: the codes carry meaning
    classes = [i.split("/")[0] for i in index.ids[index.search(index.codes[index.valid], 10)[1].ravel()]]
    own = np.repeat([i.split("/")[0] for i in index.ids[index.valid]], 10)
    assert (np.array(classes) == own).mean() > 0.5


def test_feature_cache_is_reused(image_folder, client, cache_dir):
    first = hashindex.cached_features(image_folder["path"], client=client)
    again = hashindex.cached_features(image_folder["path"], client=client)
    assert again.seconds == 0 and first.location == again.location
    assert (first.features == again.features).all() and again.features.dtype == np.float16
    assert again.valid.sum() == 300


def test_rerun_of_a_finished_build_reuses_it(trained, image_folder, client):
    index = trained["index"]
    again = hashindex.encode(image_folder["path"], trained["encoder"], index.path, chunk_rows=64, client=client)
    assert again.version == index.version and (again.codes == index.codes).all()


def test_old_version_stays_visible_until_the_new_one_is_complete(trained, tmp_path, fmnist, client):
    path = str(tmp_path / "idx")
    first = hashindex.encode(fmnist.subset(np.arange(40)), trained["encoder"], path, client=client)
    # a second build, started but not finished: readers still see the first
    store.create_version(f"{path}/v-unfinished", ids=np.array(["a", "b"], dtype=object), chunk_rows=2,
                         output=("codes", 4, "uint8"), attrs={"build_key": "x", "bits": 32})
    assert hashindex.open(path).version == first.version
    second = hashindex.encode(fmnist.subset(np.arange(40, 80)), trained["encoder"], path, client=client)
    assert hashindex.open(path).version == second.version != first.version
    assert first.search(first.codes[:1], 1)[0][0, 0] == 0  # an already-open reader keeps working
    with pytest.raises(store.StoreError, match="incomplete"):
        hashindex.open(f"{path}/v-unfinished")


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "hashindex.cli", *args], capture_output=True, text=True, **kw)


def test_resume_after_sigkill_gives_the_same_index(trained, image_folder, tmp_path):
    """Kill a real `hashindex encode` (and its Dask workers) mid-way, rerun it, compare with a clean run."""
    killed = str(tmp_path / "killed.index")
    cmd = [sys.executable, "-m", "hashindex.cli", "encode", "--encoder", trained["encoder_path"],
           "--source", image_folder["path"], "--out", killed, "--chunk-rows", "8", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, done = time.time() + 240, 0
    while time.time() < deadline and proc.poll() is None:
        versions = [v for v in store.version_names(killed)] if os.path.isdir(killed) else []
        if versions:
            try:
                done = int(zarr.open_group(f"{killed}/{versions[0]}", mode="r")["chunk_done"][:].sum())
            except Exception:  # noqa: BLE001 - the group may be half-created at this instant
                done = 0
            if done >= 2:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert store.read_pointer(killed) is None  # nothing published
    with pytest.raises(store.StoreError):
        hashindex.open(killed)

    resumed = _cli(*cmd[3:], timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    clean = str(tmp_path / "clean.index")
    cmd[cmd.index(killed)] = clean
    assert _cli(*cmd[3:], timeout=600).returncode == 0
    a, b = hashindex.open(killed), hashindex.open(clean)
    assert a.version == b.version
    for name in ("codes", "valid", "ids"):
        assert (getattr(a, name) == getattr(b, name)).all(), name
    assert a.rejects == b.rejects and a.attrs["valid"] == 300


def test_cli_query_info_and_errors(trained, image_folder):
    index = trained["index"]
    image = os.path.join(image_folder["path"], image_folder["ids"][3])
    out = _cli("query", index.path, "--image", image, "-k", "3")
    assert out.returncode == 0 and image_folder["ids"][3] in out.stdout and "d=0" in out.stdout
    info = _cli("info", index.path)
    assert info.returncode == 0 and "rejected 2" in info.stdout and index.version in info.stdout
    for args, message in [
        (("query", index.path, "--code", "abcd"), "has 16 bits, the index has 32"),
        (("query", index.path, "--code", "zzzzzzzz"), "not hexadecimal"),
        (("query", index.path, "--id", "nope.png"), "unknown id 'nope.png'"),
        (("query", index.path, "--id", image_folder["ids"][0], "-k", "0"), "-k must be at least 1"),
        (("query", index.path, "--id", image_folder["ids"][0], "--radius", "-1"), "--radius must be 0 or more"),
        (("query", "/no/such/index", "--code", "00000000"), "no index here"),
        (("encode", "--encoder", "/no/encoder", "--source", "digits", "--out", "/tmp/x"), "cannot read encoder"),
        (("train", "--method", "itq", "--source", "/no/such/dir", "--out", "/tmp/x"), "no such file or folder"),
        (("train", "--method", "itq", "--source", "digits", "--backbone", "resnet18", "--out", "/tmp/x"),
         "needs a local weights file"),
    ]:
        result = _cli(*args)
        assert result.returncode == 2, args
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_local_workers_start_with_one_malloc_arena(client):
    # without it the backbone ran at 0.6x its speed inside a worker (bench/encode_throughput.py)
    assert set(client.run(os.environ.get, "MALLOC_ARENA_MAX").values()) == {"1"}


def test_an_external_cluster_without_one_malloc_arena_is_warned_about(caplog, monkeypatch):
    from dask.distributed import LocalCluster

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)  # Dask's nannies copy it into this process
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with caplog.at_level(logging.WARNING, logger="hashindex.pipeline"):
            with dask_client(cluster.scheduler_address) as external:
                assert len(external.scheduler_info()["workers"]) == 1
    assert "MALLOC_ARENA_MAX=1" in caplog.text


def test_a_job_beside_another_cluster_starts_and_closes_without_noise(tmp_path):
    """A cluster's console output is the job's own: no "port 8787 in use" warning when another job
    holds it, and nothing from the teardown."""
    script = tmp_path / "job.py"
    script.write_text(
        "import socket\n"
        "from hashindex.pipeline import dask_client\n"
        "if __name__ == '__main__':\n"
        "    other = socket.socket(); other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "    try:\n        other.bind(('', 8787)); other.listen()\n"
        "    except OSError:\n        pass  # held by another job already: the same situation\n"
        "    with dask_client(n_workers=2) as client:\n"
        "        assert client.submit(sum, [1, 2]).result() == 3\n"
        "    print('done')\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "done"
    assert run.stderr == "", run.stderr


def test_cli_query_show_writes_a_contact_sheet_of_the_results(trained, image_folder, tmp_path):
    from PIL import Image

    from hashindex.plots import SHEET_CAPTION, SHEET_PAD, SHEET_TILE

    index = trained["index"]
    assert index.attrs["source_spec"] == {"kind": "folder", "location": image_folder["path"]}
    query = os.path.join(image_folder["path"], image_folder["ids"][3])
    sheet = tmp_path / "sheet.png"
    out = _cli("query", index.path, "--image", query, "-k", "4", "--show", str(sheet))
    assert out.returncode == 0, out.stderr
    picture = np.asarray(Image.open(sheet).convert("RGB")).astype(int)
    cell_w, cell_h = SHEET_TILE + 2 * SHEET_PAD, SHEET_TILE + SHEET_CAPTION + 2 * SHEET_PAD
    assert picture.shape == (cell_h, 5 * cell_w, 3)  # one row: the query and its 4 results

    def thumbnail(c):  # the image area of tile c
        return picture[SHEET_PAD:SHEET_PAD + SHEET_TILE, c * cell_w + SHEET_PAD:c * cell_w + SHEET_PAD + SHEET_TILE]

    # Fashion-MNIST's 28 px images are scaled up 4x into the 112 px tiles: the query tile is its image
    want = np.asarray(Image.open(query).convert("RGB").resize((SHEET_TILE, SHEET_TILE), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(thumbnail(0) - want).mean() < 8
    # the first result is the query itself (distance 0); every result tile holds a picture
    assert np.abs(thumbnail(1) - want).mean() < 8
    assert all(thumbnail(c).std() > 20 for c in range(1, 5))
    by_id = _cli("query", index.path, "--id", *image_folder["ids"][:2], "-k", "2", "--show", str(tmp_path / "two.png"))
    assert by_id.returncode == 0 and Image.open(tmp_path / "two.png").size == (3 * cell_w, 2 * cell_h)
