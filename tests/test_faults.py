"""Faults and bad input through the real pipeline: killed jobs and workers, read-only and full disks,
broken image files, damaged indexes, and fuzzed list files and query arguments."""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.datasets import load_sample_image

import hashindex
from hashindex import store
from hashindex.pipeline import dask_client
from hashindex.sources import SourceError, parse_list_file
from hashindex.update import update
from test_pipeline import _cli


@pytest.fixture(scope="module")
def itq(image_folder, client, cache_dir, tmp_path_factory):
    encoder = hashindex.train_encoder(image_folder["path"], "itq", 32, client=client)
    path = encoder.save(tmp_path_factory.mktemp("enc") / "itq.encoder")
    return encoder, str(path)


def _copy(image_folder, folder, ids):
    for rel in ids:
        os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
        shutil.copy2(os.path.join(image_folder["path"], rel), os.path.join(folder, rel))


def _arrays(index) -> dict:
    return {name: getattr(index, name) for name in ("codes", "ids", "valid", "removed")}


def _assert_same(a, b):
    for name, value in _arrays(a).items():
        assert np.array_equal(value, getattr(b, name)), name


def _wait_for_chunks(out: str, exclude: set, count: int, proc=None, timeout=240) -> bool:
    """True once a version folder not in ``exclude`` has ``count`` chunks done."""
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None):
        for name in set(store.version_names(out)) - exclude:
            try:
                if int(zarr.open_group(f"{out}/{name}", mode="r")["chunk_done"][:].sum()) >= count:
                    return True
            except Exception:  # noqa: BLE001 - the group may be half-created at this instant
                pass
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------------------- killed jobs and workers
def test_update_killed_with_sigkill_resumes_to_the_uninterrupted_result(image_folder, itq, client, tmp_path):
    folder, out = str(tmp_path / "photos"), str(tmp_path / "photos.index")
    ids = image_folder["ids"]
    _copy(image_folder, folder, ids[:100])
    base = hashindex.encode(folder, itq[0], out, chunk_rows=8, client=client)
    clean_out = str(tmp_path / "clean.index")
    shutil.copytree(out, clean_out)
    _copy(image_folder, folder, ids[100:260])
    for rel in ids[:10]:
        os.remove(os.path.join(folder, rel))

    cmd = ["update", "--encoder", itq[1], "--source", folder, "--out", out, "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "hashindex.cli", *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed = _wait_for_chunks(out, {base.version}, 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert killed and proc.returncode == -signal.SIGKILL, "the update finished before it could be killed"
    assert hashindex.open(out).version == base.version  # nothing half-done is visible

    resumed = _cli(*cmd, timeout=600)
    assert resumed.returncode == 0 and "updated: 160 added, 0 changed, 10 removed" in resumed.stdout, resumed.stderr
    clean = update(folder, itq[0], clean_out, client=client)
    _assert_same(hashindex.open(out), clean.index)
    assert hashindex.open(out).ntotal == 250


def test_a_worker_killed_mid_job_is_replaced_and_the_job_completes(image_folder, itq, client, tmp_path):
    reference = hashindex.encode(image_folder["path"], itq[0], str(tmp_path / "ref.index"), chunk_rows=8,
                                 client=client)
    out = str(tmp_path / "db.index")
    with dask_client(n_workers=2) as own:
        pids = own.run(os.getpid)
        result, errors = {}, []

        def job():
            try:
                result["index"] = hashindex.encode(image_folder["path"], itq[0], out, chunk_rows=8, client=own)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        thread = threading.Thread(target=job)
        thread.start()
        assert _wait_for_chunks(out, set(), 3), "the job never started"
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        killed_during_job = thread.is_alive()
        thread.join(timeout=600)
        assert not errors, errors
        assert killed_during_job, "the job finished before the worker was killed"
        assert victim not in own.run(os.getpid).values()  # the nanny started a new worker process
    _assert_same(result["index"], reference)


# ----------------------------------------------------------------------------- read-only and full disks
@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs we can fill or make read-only (needs root, as on the CI machines)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield str(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_read_only_output_is_a_clear_error_and_the_published_version_stays(image_folder, itq, client, tmp_path,
                                                                           small_disk):
    folder, out = str(tmp_path / "photos"), os.path.join(small_disk, "photos.index")
    _copy(image_folder, folder, image_folder["ids"][:40])
    base = hashindex.encode(folder, itq[0], out, client=client)
    _copy(image_folder, folder, image_folder["ids"][40:60])
    subprocess.run(["mount", "-o", "remount,ro", small_disk], check=True)
    with pytest.raises(store.StoreError, match=f"cannot write .*Read-only file system.*{base.version} is unchanged"):
        update(folder, itq[0], out, client=client)
    cli = _cli("update", "--encoder", itq[1], "--source", folder, "--out", out, "--workers", "1")
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1 and "Read-only" in cli.stderr
    again = hashindex.open(out)
    assert again.version == base.version and len(again) == 40
    assert again.search(again.codes[:1], 1)[0][0, 0] == 0


def test_full_disk_is_a_clear_error_and_a_rerun_with_space_completes(image_folder, itq, client, tmp_path, small_disk):
    folder, out = str(tmp_path / "photos"), os.path.join(small_disk, "photos.index")
    _copy(image_folder, folder, image_folder["ids"][:40])
    base = hashindex.encode(folder, itq[0], out, client=client)
    _copy(image_folder, folder, image_folder["ids"][40:100])
    free = os.statvfs(small_disk)
    filler = os.path.join(small_disk, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free.f_bavail * free.f_frsize - 64 * 1024))
    with pytest.raises(store.StoreError, match=f"No space left on device.*{base.version} is unchanged"):
        update(folder, itq[0], out, client=client)
    assert hashindex.open(out).version == base.version and len(hashindex.open(out)) == 40
    os.remove(filler)
    result = update(folder, itq[0], out, client=client)
    assert result.action == "updated" and result.added == 60 and len(hashindex.open(out)) == 100


@pytest.mark.parametrize("fails", ["copying", "dropping the parts"])
def test_an_interrupted_publish_of_the_task_chunks_is_finished_by_the_rerun(tmp_path, monkeypatch, fails):
    task_rows = 4096
    n = 2 * store.PUBLISHED_CHUNK_BYTES // 8 + 1234  # two published chunks and part of a third
    codes = np.random.default_rng(5).integers(0, 256, (n, 8), dtype=np.uint8)
    location = str(tmp_path / "v")
    group = store.create_version(location, ids=np.arange(n).astype(str), chunk_rows=task_rows,
                                 output=("codes", 8, "uint8"), attrs={"build_key": "k", "bits": 64})
    parts = store.task_arrays(group)
    assert parts.path.endswith(store.PARTS) and parts["codes"].chunks == (task_rows, 8)
    parts["codes"][:] = codes
    parts["valid"][: n - 7] = True
    parts["reason"][n - 7:] = "unreadable"

    def out_of_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    if fails == "copying":  # the second array's copy fails
        real = zarr.Group.create_array
        monkeypatch.setattr(zarr.Group, "create_array",
                            lambda self, name, **kw: out_of_space() if name == "valid" else real(self, name, **kw))
    else:
        monkeypatch.setattr(zarr.Group, "__delitem__", out_of_space)
    with pytest.raises(store.StoreError, match="No space left on device"):
        store.finish_version(group)
    monkeypatch.undo()
    if fails == "dropping the parts":  # and it had deleted some of them
        shutil.rmtree(os.path.join(location, store.PARTS, "codes"))
    group = zarr.open_group(location, mode="r+")
    assert not group.attrs.get("complete") and store.PARTS in group

    summary = store.finish_version(group)  # the rerun of the build
    assert summary["valid"] == n - 7 and summary["rejected"] == 7 and store.PARTS not in group
    published = store.published_chunk_rows(task_rows, 8, n)
    assert published % task_rows == 0 and published * 8 >= store.PUBLISHED_CHUNK_BYTES
    assert group["codes"].chunks == (published, 8) and group["valid"].chunks == (published,)
    assert np.array_equal(group["codes"][:], codes) and group["reason"][n - 1] == "unreadable"


# ----------------------------------------------------------------------------- bad images
def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_bad_images_through_the_real_pipeline(itq, client, tmp_path):
    """Each odd file is encoded correctly or recorded as a reject with its reason; the job finishes."""
    photo = Image.fromarray(load_sample_image("flower.jpg"))  # a real 427×640 photograph
    folder = tmp_path / "odd"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    cmyk = photo.convert("CMYK")
    sixteen = Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257))
    files = {
        "ok.jpg": _save(photo, "JPEG"),
        "zero.jpg": b"",
        "truncated.jpg": _save(photo, "JPEG")[:5000],
        "truncated.png": _save(photo, "PNG")[:5000],
        "text.jpg": b"this is a text file named like a jpeg\n",
        "bomb.png": _save(Image.new("1", (10_000, 10_000)), "PNG"),
        "cmyk.jpg": _save(cmyk, "JPEG"),
        "sixteen.png": _save(sixteen, "PNG"),
        "palette.png": _save(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "alpha.png": _save(photo.convert("RGBA"), "PNG"),
        "rotated.jpg": _save(photo, "JPEG", exif=exif.tobytes(), quality=95),
        "upright.png": _save(photo.transpose(Image.Transpose.ROTATE_270), "PNG"),
        "one.png": _save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "large.jpg": _save(photo.resize((6000, 4000)), "JPEG", quality=80),
        "vanishes.png": _save(photo, "PNG"),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9-latin1.png"), "wb") as f:
        f.write(_save(photo, "PNG"))
    source = hashindex.open_source(str(folder))
    os.remove(folder / "vanishes.png")  # listed, then gone before it is read: unreadable
    index = hashindex.encode(source, itq[0], str(tmp_path / "odd.index"), client=client)

    reasons = dict(index.rejects)
    expected = {"zero.jpg": "empty file", "truncated.jpg": "corrupt", "truncated.png": "corrupt",
                "text.jpg": "not an image", "bomb.png": "decompression bomb", "vanishes.png": "unreadable"}
    assert set(reasons) == set(expected), reasons
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
    good = set(index.ids[index.valid])
    assert good == {"ok.jpg", "cmyk.jpg", "sixteen.png", "palette.png", "alpha.png", "rotated.jpg",
                    "upright.png", "one.png", "large.jpg", "caf\\xe9-latin1.png"}
    # EXIF orientation applied: the rotated JPEG codes like the upright image (JPEG noise aside)
    rotated, upright = index.codes[index.rows_of(["rotated.jpg", "upright.png"])]
    assert np.unpackbits(rotated ^ upright).sum() <= 3
    assert index.attrs["valid"] == 10 and index.attrs["rejected"] == 6


# ----------------------------------------------------------------------------- bad queries and indexes
def test_damaged_indexes_are_one_clear_error(image_folder, itq, client, tmp_path):
    out = str(tmp_path / "db.index")
    index = hashindex.encode(image_folder["path"], itq[0], out, chunk_rows=64, client=client)
    code = index.codes[0].tobytes().hex()
    version_dir = os.path.join(out, index.version)
    chunk = next(os.path.join(root, f) for root, _, names in os.walk(os.path.join(version_dir, "codes"))
                 for f in names if "zarr.json" not in f)
    with open(chunk, "r+b") as f:
        f.write(b"\xff" * 7)
    result = _cli("query", out, "--code", code)
    assert result.returncode == 2 and "the 'codes' array" in result.stderr and "damaged" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1

    group = zarr.open_group(version_dir, mode="r+")
    group.attrs["format_version"] = 7
    result = _cli("info", out)
    assert result.returncode == 2 and "format version 7 is not supported" in result.stderr
    shutil.rmtree(version_dir)
    result = _cli("query", out, "--code", code)
    assert result.returncode == 2 and f"published version {index.version} is missing" in result.stderr
    os.remove(os.path.join(out, store.POINTER))
    result = _cli("query", out, "--code", code)
    assert result.returncode == 2 and "no index here" in result.stderr


# ----------------------------------------------------------------------------- fuzz
LIST_LINE = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.builds(lambda p, bits: " ".join([p, *bits]), st.from_regex(r"[a-z0-9_/\.]{1,12}", fullmatch=True),
              st.lists(st.sampled_from(["0", "1", "2", "x", "-1"]), max_size=5)))


@settings(max_examples=300, deadline=None)
@given(st.lists(LIST_LINE, max_size=12))
def test_list_file_parser_fuzz(lines):
    text = "\n".join(lines)
    try:
        ids, labels = parse_list_file(text, "fuzz.txt")
    except SourceError as exc:
        assert str(exc).startswith("fuzz.txt")
        return
    kept = [line.split() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert ids == [parts[0] for parts in kept]
    if labels is None:
        assert all(len(parts) == 1 for parts in kept)
    else:
        assert labels.shape == (len(kept), len(kept[0]) - 1) and set(np.unique(labels)) <= {0, 1}
        assert all(labels[i].tolist() == [int(b) for b in parts[1:]] for i, parts in enumerate(kept))


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = str(tmp_path_factory.mktemp("q") / "small.index")
    hashindex.write_index(path, rng.integers(0, 256, (50, 4), dtype=np.uint8), [f"img{i}" for i in range(50)])
    return path


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(code=st.one_of(st.text(max_size=12), st.binary(min_size=4, max_size=4).map(bytes.hex)),
       k=st.integers(-3, 80), radius=st.one_of(st.none(), st.integers(-3, 40)),
       ids=st.lists(st.sampled_from(["img0", "img49", "nope", ""]), min_size=1, max_size=3),
       by_id=st.booleans())
def test_query_arguments_fuzz(small_index, code, k, radius, ids, by_id, capsys):
    from hashindex.cli import main
    capsys.readouterr()  # hypothesis reuses the fixture: drop what earlier examples printed
    args = ["query", small_index, "-k", str(k), "--json"]
    args += (["--id", *ids] if by_id else ["--code", code])
    if radius is not None:
        args += ["--radius", str(radius)]
    try:
        status = main(args)
    except SystemExit as exc:  # argparse: an argument that looks like an option
        assert exc.code == 2
        return
    out, err = capsys.readouterr()
    assert status in (0, 2)
    if status == 2:
        assert err.startswith("hashindex: error: ") and len(err.strip().splitlines()) == 1
    else:
        import json
        for item in json.loads(out):
            distances = [hit["distance"] for hit in item["results"]]
            assert distances == sorted(distances)
            assert len(distances) == (min(k, 50) if radius is None else len(distances))
            assert radius is None or all(d <= radius for d in distances)
