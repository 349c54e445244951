"""Sources: recognition, ids, labels, splits, readers, rejects, list-file parsing, the protocol split."""
import os
import pickle

import numpy as np
import pytest

from hashindex import protocol_split
from hashindex.sources import (CifarSource, DigitsSource, FolderSource, IdxSource, ListFileSource, SourceError,
                               open_source, parse_list_file)


def test_fashion_mnist_source(fmnist):
    assert isinstance(fmnist, IdxSource) and len(fmnist) == 70_000
    assert fmnist.ids[0] == "train/00000" and fmnist.ids[60_000] == "test/00000"
    assert (fmnist.splits == "train").sum() == 60_000 and (fmnist.splits == "test").sum() == 10_000
    assert np.bincount(fmnist.labels).tolist() == [7000] * 10
    decoded = fmnist.read([0, 60_000])
    assert decoded.pixels.shape == (2, 28, 28, 3) and decoded.pixels.dtype == np.uint8 and decoded.ok.all()
    # grey expanded to RGB, identical channels, real content (not blank)
    assert (decoded.pixels[..., 0] == decoded.pixels[..., 2]).all() and decoded.pixels.std() > 20


def test_digits_source():
    src = open_source("digits")
    assert isinstance(src, DigitsSource) and len(src) == 1797 and src.labels.max() == 9
    assert src.read([0, 1]).pixels.max() <= 255


def test_folder_source_ids_and_rejects(image_folder):
    src = open_source(image_folder["path"])
    assert isinstance(src, FolderSource)
    assert len(src) == 302 and set(image_folder["ids"]) < set(src.ids)
    assert list(src.ids) == sorted(src.ids)  # stable order: sorted relative paths
    rows = np.flatnonzero(np.char.startswith(src.ids.astype(str), "broken/"))
    decoded = src.read(rows)
    assert not decoded.ok.any()
    assert {r.split(":")[0].split(" (")[0] for r in decoded.reasons} == {"empty file", "not an image"}


def test_list_file_source_relative_paths_and_labels(image_folder, tmp_path):
    ids = image_folder["ids"][:5]
    lines = [f"{i} " + " ".join("1" if c == lab else "0" for c in range(10))
             for i, lab in zip(ids, image_folder["labels"][:5])]
    listing = os.path.join(image_folder["path"], "train.txt")
    with open(listing, "w") as f:
        f.write("\n".join(lines) + "\n")
    src = open_source(listing)
    assert isinstance(src, ListFileSource) and list(src.ids) == ids
    assert src.labels.shape == (5, 10) and (src.labels.argmax(1) == image_folder["labels"][:5]).all()
    assert src.read(np.arange(5)).ok.all()
    # the same list elsewhere, with --root pointing at the images
    other = tmp_path / "elsewhere.txt"
    other.write_text("\n".join(lines))
    assert open_source(str(other), root=image_folder["path"]).read(np.arange(5)).ok.all()
    assert not open_source(str(other)).read(np.arange(5)).ok.any()  # wrong root: unreadable, not a crash
    os.remove(listing)


@pytest.mark.parametrize("text, message", [
    ("a.jpg 0 1\nb.jpg 0 1 1\n", "line 2: 3 labels, the first line has 2"),
    ("a.jpg 0 2\n", "line 1: label '2' is not 0 or 1"),
    ("\n# only a comment\n", "no image lines"),
])
def test_list_file_errors_name_the_line(text, message):
    with pytest.raises(SourceError, match=message):
        parse_list_file(text, "list.txt")


def test_list_file_without_labels_and_with_comments():
    ids, labels = parse_list_file("# header\nx/a.jpg\n\nx/b.png\n")
    assert ids == ["x/a.jpg", "x/b.png"] and labels is None


def test_cifar_batches_are_recognised(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, n in (("data_batch_1", 6), ("test_batch", 4)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    src = open_source(str(tmp_path))
    assert isinstance(src, CifarSource) and len(src) == 10
    assert list(src.splits).count("test") == 4 and src.ids[6] == "test_batch/00000"
    pixels = src.read([6]).pixels[0]
    raw = pickle.load(open(folder / "test_batch", "rb"))[b"data"][0]
    assert (pixels[:, :, 0].ravel() == raw[:1024]).all()  # channel-planar rows → HWC


@pytest.mark.parametrize("spec, message", [
    ("/no/such/place", "no such file or folder"),
])
def test_unknown_sources(spec, message):
    with pytest.raises(SourceError, match=message):
        open_source(spec)


def test_single_image_is_not_a_source(image_folder):
    with pytest.raises(SourceError, match="single image"):
        open_source(os.path.join(image_folder["path"], image_folder["ids"][0]))


def test_empty_folder(tmp_path):
    with pytest.raises(SourceError, match="no image files"):
        open_source(str(tmp_path))


def test_subset_reads_parent_rows(fmnist):
    sub = fmnist.subset([5, 60_001])
    assert list(sub.ids) == ["train/00005", "test/00001"]
    assert (sub.read([1]).pixels == fmnist.read([60_001]).pixels).all()
    assert sub.fingerprint() != fmnist.subset([5, 60_002]).fingerprint()


def test_protocol_split(fmnist):
    queries, train, database = protocol_split(fmnist, seed=0)
    assert len(queries) == 1000 and len(train) == 5000 and len(database) == 69_000
    assert (fmnist.splits[queries] == "test").all() and (fmnist.splits[train] == "train").all()
    assert np.bincount(fmnist.labels[queries]).tolist() == [100] * 10
    assert np.bincount(fmnist.labels[train]).tolist() == [500] * 10
    assert np.intersect1d(queries, database).size == 0 and np.isin(train, database).all()
    again = protocol_split(fmnist, seed=0)
    assert all((a == b).all() for a, b in zip((queries, train, database), again))
    assert not (protocol_split(fmnist, seed=1)[0] == queries).all()


def test_folder_lists_every_still_format_pillow_reads_and_extensions_narrow_it(tmp_path):
    from PIL import Image
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    saved = {"a.gif": "GIF", "b.jfif": "JPEG", "c.jpe": "JPEG", "d.ppm": "PPM", "e.tga": "TGA", "f.png": "PNG"}
    for name, fmt in saved.items():
        picture.save(tmp_path / name, format=fmt)
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_source(str(tmp_path))
    assert sorted(src.ids) == sorted(saved)
    decoded = src.read(np.arange(len(src)))
    assert decoded.ok.all() and all(p.shape == (20, 24, 3) for p in decoded.pixels)
    narrowed = open_source(str(tmp_path), extensions="PNG, .gif")
    assert list(narrowed.ids) == ["a.gif", "f.png"] and narrowed.fingerprint() != src.fingerprint()


@pytest.mark.parametrize("extensions, message", [("png,xyz", ".xyz not among the readable formats"),
                                                 (",", "none given")])
def test_bad_extensions_are_refused_by_name(tmp_path, extensions, message):
    with pytest.raises(SourceError, match=message):
        open_source(str(tmp_path), extensions=extensions)


def test_extensions_apply_to_folders_only():
    with pytest.raises(SourceError, match="extensions apply to folder sources; this is a digits source"):
        open_source("digits", extensions="png")


def test_file_stamps_move_with_size_or_mtime_and_only_for_that_file(tmp_path):
    """Stamps are per file and vectorised (scheme 2): touching or rewriting one file moves its stamp
    alone and the fingerprint with it; a missing file of a list gets 0. The scheme-1 stamps of the
    same listing are what indexes written before hold."""
    import hashlib
    from PIL import Image
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name)
    os.utime(tmp_path / "b.png", ns=(0, os.stat(tmp_path / "a.png").st_mtime_ns))  # equal mtime and size
    src = FolderSource(str(tmp_path))
    stamps, print_ = src.stamps(), src.fingerprint()
    assert stamps.dtype == np.uint64 and (stamps != 0).all() and stamps[0] == stamps[1] != stamps[2]
    st = os.stat(tmp_path / "b.png")
    os.utime(tmp_path / "b.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    touched = FolderSource(str(tmp_path))
    assert (touched.stamps() != stamps).tolist() == [False, True, False] and touched.fingerprint() != print_
    with open(tmp_path / "c.png", "ab") as f:
        f.write(b"\0")
    assert FolderSource(str(tmp_path)).stamps()[2] != stamps[2]
    legacy = touched.legacy_stamps()
    size, mtime = os.stat(tmp_path / "a.png").st_size, os.stat(tmp_path / "a.png").st_mtime
    assert legacy[0] == int.from_bytes(hashlib.blake2b(f"{size}:{mtime}".encode(), digest_size=8).digest(), "little")
    (tmp_path / "list.txt").write_text("a.png 1\nmissing.png 0\n")
    listed = ListFileSource(str(tmp_path / "list.txt"))
    assert listed.stamps()[1] == 0 and listed.stamps()[0] == touched.stamps()[0]
