"""`hashindex update`: a changing folder of real images kept in step with its index, version by version."""
from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest

import hashindex
from hashindex import store
from hashindex.update import update


@pytest.fixture(scope="module")
def encoders(image_folder, client, cache_dir):
    return {m: hashindex.train_encoder(image_folder["path"], m, 32, client=client) for m in ("itq", "lsh")}


def _copy(image_folder, folder, ids) -> list[str]:
    for rel in ids:
        os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
        shutil.copy2(os.path.join(image_folder["path"], rel), os.path.join(folder, rel))
    return list(ids)


def _codes_by_id(index) -> dict[str, bytes]:
    rows = np.flatnonzero(index.searchable)
    return {index.ids[r]: index.codes[r].tobytes() for r in rows}


def _replace(image_folder, folder, rel, other):
    """Overwrite image ``rel`` with the content of ``other`` (another image: new size, new mtime)."""
    target = os.path.join(folder, rel)
    shutil.copyfile(os.path.join(image_folder["path"], other), target)
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_update_appends_reencodes_and_tombstones(image_folder, encoders, client, tmp_path):
    folder, out = str(tmp_path / "photos"), str(tmp_path / "photos.index")
    ids = image_folder["ids"]
    _copy(image_folder, folder, ids[:60])
    first = update(folder, encoders["itq"], out, client=client)
    assert first.action == "created" and first.added == 60 and len(first.index) == 60
    before = hashindex.open(out)

    _copy(image_folder, folder, ids[60:70])                 # 10 new
    for rel in ids[:5]:                                       # 5 removed
        os.remove(os.path.join(folder, rel))
    for rel, other in zip(ids[5:10], ids[200:205]):           # 5 changed
        _replace(image_folder, folder, rel, other)
    second = update(folder, encoders["itq"], out, client=client)
    assert (second.action, second.added, second.changed, second.removed, second.unchanged) == ("updated", 10, 5, 5, 50)

    index = hashindex.open(out)
    assert index.version == second.index.version != before.version
    assert len(index) == 70 and index.ntotal == 65 and int(index.removed.sum()) == 5
    # row positions are stable: the unchanged images kept their rows and codes
    assert np.array_equal(index.ids[:60], before.ids)
    kept = before.rows_of(ids[10:60])
    assert np.array_equal(index.rows_of(ids[10:60]), kept) and np.array_equal(index.codes[kept], before.codes[kept])
    # every live image has exactly the code a fresh build gives it; removed ones are gone from search
    fresh = hashindex.encode(folder, encoders["itq"], str(tmp_path / "fresh.index"), client=client)
    assert _codes_by_id(index) == _codes_by_id(fresh)
    with pytest.raises(store.StoreError, match="unknown id"):
        index.rows_of([ids[0]])
    _, rows = index.search(index.codes[index.rows_of([ids[7]])], 70)
    assert not np.isin(rows, before.rows_of(ids[:5])).any()
    # the reader that opened the old version still sees it, whole
    assert len(before) == 60 and before.search(before.codes[:1], 1)[1][0, 0] == 0
    listed = [v["name"] for v in index.info()["versions"]]
    assert listed == [index.version, before.version]


def test_update_with_nothing_to_do_publishes_nothing(image_folder, encoders, client, tmp_path):
    folder, out = str(tmp_path / "photos"), str(tmp_path / "photos.index")
    _copy(image_folder, folder, image_folder["ids"][:30])
    first = update(folder, encoders["itq"], out, client=client)
    again = update(folder, encoders["itq"], out, client=client)
    assert again.action == "unchanged" and again.unchanged == 30
    assert again.index.version == first.index.version and store.version_names(out) == [first.index.version]


def test_an_index_of_the_old_stamp_scheme_is_diffed_in_it_and_moves_to_the_new(image_folder, encoders, client,
                                                                                tmp_path):
    """Stamps were a blake2b hash per file (scheme 1) before they were mixed in numpy (scheme 2): an
    update of an old index re-encodes only what changed, and its new version holds today's stamps."""
    import zarr
    from hashindex.sources import STAMP_SCHEME, open_source
    folder, out = str(tmp_path / "photos"), str(tmp_path / "photos.index")
    ids = _copy(image_folder, folder, image_folder["ids"][:40])
    first = update(folder, encoders["itq"], out, client=client)
    source = open_source(folder)
    old = zarr.open_group(f"{out}/{first.index.version}", mode="r+")  # as an older hashindex wrote it
    assert old.attrs["stamp_scheme"] == STAMP_SCHEME == 2
    old["stamp"][:] = source.legacy_stamps()
    del old.attrs["stamp_scheme"]
    assert not (source.legacy_stamps() == source.stamps()).any()
    _replace(image_folder, folder, ids[3], ids[30])
    second = update(folder, encoders["itq"], out, client=client)
    assert (second.action, second.changed, second.added, second.unchanged) == ("updated", 1, 0, 39)
    new = zarr.open_group(f"{out}/{second.index.version}", mode="r")
    assert new.attrs["stamp_scheme"] == STAMP_SCHEME
    assert np.array_equal(new["stamp"][:], open_source(folder).stamps())
    assert update(folder, encoders["itq"], out, client=client).action == "unchanged"


def test_a_new_encoder_reencodes_everything(image_folder, encoders, client, tmp_path):
    folder, out = str(tmp_path / "photos"), str(tmp_path / "photos.index")
    _copy(image_folder, folder, image_folder["ids"][:40])
    update(folder, encoders["itq"], out, client=client)
    result = update(folder, encoders["lsh"], out, client=client)
    assert result.action == "reencoded" and result.index.encoder.id == encoders["lsh"].id
    fresh = hashindex.encode(folder, encoders["lsh"], str(tmp_path / "fresh.index"), client=client)
    assert _codes_by_id(result.index) == _codes_by_id(fresh)


def test_the_newest_versions_are_kept(image_folder, encoders, client, tmp_path):
    folder, out = str(tmp_path / "photos"), str(tmp_path / "photos.index")
    ids = image_folder["ids"]
    _copy(image_folder, folder, ids[:20])
    versions = [update(folder, encoders["itq"], out, keep=2, client=client).index.version]
    for step in range(3):
        _copy(image_folder, folder, ids[20 + 5 * step:25 + 5 * step])
        result = update(folder, encoders["itq"], out, keep=2, client=client)
        versions.append(result.index.version)
    assert len(set(versions)) == 4
    assert sorted(store.version_names(out)) == sorted(versions[-2:])
    assert hashindex.open(out).version == versions[-1] and len(hashindex.open(out)) == 35


def test_queries_during_publish_always_see_one_complete_version(image_folder, encoders, client, tmp_path):
    folder, out = str(tmp_path / "photos"), str(tmp_path / "photos.index")
    ids = image_folder["ids"]
    _copy(image_folder, folder, ids[:50])
    update(folder, encoders["itq"], out, client=client)
    seen, errors, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                index = hashindex.open(out)
                codes = index.codes
                assert len(codes) == len(index.ids) == index.attrs["count"]
                d, rows = index.search(codes[:2], 3)
                assert (d[:, 0] == 0).all()
                seen.add(len(index))
            except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                errors.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for step in range(3):
            _copy(image_folder, folder, ids[50 + 10 * step:60 + 10 * step])
            update(folder, encoders["itq"], out, keep=3, client=client)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert seen <= {50, 60, 70, 80} and len(seen) >= 2, seen


def test_cli_update_and_info_list_versions(image_folder, encoders, tmp_path):
    from test_pipeline import _cli
    folder, out = str(tmp_path / "photos"), str(tmp_path / "photos.index")
    ids = image_folder["ids"]
    _copy(image_folder, folder, ids[:30])
    encoder = encoders["itq"].save(tmp_path / "itq.encoder")
    args = ["update", "--encoder", encoder, "--source", folder, "--out", out, "--workers", "1"]
    first = _cli(*args)
    assert first.returncode == 0 and first.stdout.startswith("created: 30 added"), first.stderr
    os.remove(os.path.join(folder, ids[0]))
    second = _cli(*args)
    assert second.returncode == 0 and "updated: 0 added, 0 changed, 1 removed, 29 unchanged" in second.stdout
    info = _cli("info", out)
    assert info.returncode == 0 and "removed 1" in info.stdout
    listed = [line for line in info.stdout.splitlines() if line.startswith(("  * v-", "    v-"))]
    assert len(listed) == 2 and info.stdout.count("  * v-") == 1
    bad = _cli("update", "--encoder", encoder, "--source", folder, "--out", out, "--keep", "0")
    assert bad.returncode == 2 and "keep must be at least 1" in bad.stderr


def test_the_heaviest_chunks_start_first(image_folder, encoders, client, tmp_path):
    """An update's new images land in its last chunks; those tasks go to the workers first, so no
    large chunk runs alone at the end while the other workers idle (longest-processing-time order)."""
    from distributed import get_task_stream

    folder, out = str(tmp_path / "photos"), str(tmp_path / "photos.index")
    ids = image_folder["ids"]
    _copy(image_folder, folder, ids[:64])
    update(folder, encoders["itq"], out, chunk_rows=8, client=client)
    _copy(image_folder, folder, ids[64:80])                   # 16 new: the last two chunks, 8 images each
    _replace(image_folder, folder, ids[0], ids[200])          # 1 changed, in chunk 0
    with get_task_stream(client) as stream:
        result = update(folder, encoders["itq"], out, chunk_rows=8, client=client)
    assert (result.added, result.changed) == (16, 1)
    started = sorted((min(s["start"] for s in t["startstops"] if s["action"] == "compute"), t["key"])
                     for t in stream.data if str(t["key"]).startswith("updating"))
    assert len(started) == 3  # chunks 0–7 (1 image to encode) are one task, chunks 8 and 9 one each
    assert {key.rsplit("-", 1)[1] for _, key in started[:2]} == {"8", "9"}, started
    # the task over eight chunks wrote each of them: the update equals a fresh encode
    fresh = hashindex.encode(folder, encoders["itq"], str(tmp_path / "fresh.index"), chunk_rows=8, client=client)
    assert _codes_by_id(hashindex.open(out)) == _codes_by_id(fresh)
    assert hashindex.open(out, warm=False).attrs["run"]["tasks"] == 3


def test_an_update_groups_chunks_with_few_changes_into_one_task():
    """Each task encodes about a backbone batch: consecutive chunks with few changed images share a
    task (at most TASK_CHUNKS), a chunk with a batch of its own is a task alone; every chunk is in
    exactly one task, and each task's images lie in its rows."""
    from hashindex.update import TASK_CHUNKS, TASK_IMAGES, _plan
    rows_per_chunk, total = 1000, 1000 * 60 + 300
    rng = np.random.default_rng(0)
    changed = np.sort(rng.choice(1000 * 40, 20 * 40, replace=False))  # ~20 a chunk in chunks 0–39
    new = np.arange(1000 * 55, total)                                  # chunks 55–60: new images only
    positions = np.concatenate([changed, new])
    plan = _plan(total, rows_per_chunk, positions, positions + 7)
    covered = np.concatenate([np.arange(t.chunk, t.chunk + t.chunks) for t in plan])
    assert np.array_equal(covered, np.arange(61))                      # every chunk once, in order
    for t in plan:
        assert t.start == t.chunk * rows_per_chunk and t.stop == min(total, (t.chunk + t.chunks) * rows_per_chunk)
        assert ((t.positions >= t.start) & (t.positions < t.stop)).all()
        assert np.array_equal(t.source_rows, t.positions + 7) and 1 <= t.chunks <= TASK_CHUNKS
    heavy = [t for t in plan if t.chunk >= 55]
    assert [t.chunks for t in heavy] == [1] * 6 and [len(t.positions) for t in heavy] == [1000] * 5 + [300]
    light = [t for t in plan if t.chunk < 55]
    assert sum(len(t.positions) for t in light) == len(changed) and len(light) <= 8  # not 55 tasks
    # a light task closes once it has a batch or TASK_CHUNKS chunks; only the one before chunk 55 earlier
    assert all(len(t.positions) >= TASK_IMAGES or t.chunks == TASK_CHUNKS for t in light[:-1])
