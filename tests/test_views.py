"""Augmented views of real images, cached through the real backbone by a real Dask LocalCluster."""
import numpy as np
import pytest
import zarr

from hashindex.augment import Augment, AugmentError
from hashindex.backbones import BackboneSpec, create_backbone
from hashindex.build import cached_views
from hashindex.pipeline import ViewTransform

VIEWS, SEED = 3, 5


@pytest.fixture(scope="module")
def rows(fmnist):
    """48 real Fashion-MNIST images spread over the training set."""
    return np.sort(np.random.default_rng(2).choice(60_000, 48, replace=False))


@pytest.fixture(scope="module")
def small(fmnist, rows):
    return fmnist.subset(rows)


@pytest.fixture(scope="module")
def pixels(small):
    return small.read(np.arange(len(small))).pixels


@pytest.fixture(scope="module")
def built(small, client, tmp_path_factory):
    """The views of ``small`` cached in 16-row tasks (three tasks on two workers)."""
    cache = str(tmp_path_factory.mktemp("views"))
    return cache, cached_views(small, views=VIEWS, seed=SEED, cache_dir=cache, chunk_rows=16, client=client)


def _mean_abs(a, b) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=(1, 2, 3))


def test_views_of_an_image_differ_from_each_other_and_from_the_plain_image(pixels):
    augment, index = Augment(), np.arange(len(pixels))
    seen = [augment(pixels, index, view=v, seed=SEED) for v in range(4)]
    assert all(s.shape == pixels.shape and s.dtype == np.uint8 for s in seen)  # the same pixel format
    for v in range(4):
        assert (_mean_abs(seen[v], pixels) > 1).all(), v
        for w in range(v):
            assert (_mean_abs(seen[v], seen[w]) > 1).all(), (v, w)
    # a list of images (a folder source's format) stays a list, each image its own size
    listed = augment(list(pixels[:4]), index[:4], view=0, seed=SEED)
    assert isinstance(listed, list) and (np.stack(listed) == seen[0][:4]).all()


def test_views_are_reproducible_and_independent_of_the_batch(pixels):
    augment, index = Augment(), np.arange(len(pixels))
    first = augment(pixels, index, view=1, seed=SEED, size=64)
    assert first.shape == (len(pixels), 64, 64, 3)
    assert (augment(pixels, index, view=1, seed=SEED, size=64) == first).all()
    # another batch, another order: each image's view depends on its row, view and seed only
    order = np.random.default_rng(0).permutation(len(pixels))[:20]
    assert (augment(pixels[order], index[order], view=1, seed=SEED, size=64) == first[order]).all()
    assert (augment(pixels[7:8], index[7:8], view=1, seed=SEED, size=64) == first[7:8]).all()
    # a different seed, view or row draws a different view
    assert (_mean_abs(augment(pixels, index, view=1, seed=SEED + 1, size=64), first) > 1).all()
    assert (_mean_abs(augment(pixels, index, view=2, seed=SEED, size=64), first) > 1).all()
    assert (_mean_abs(augment(pixels, index + 1000, view=1, seed=SEED, size=64), first) > 1).all()


def test_cached_views_equal_the_backbone_features_of_the_augmented_images(built, pixels, small):
    _, cached = built
    assert cached.views.shape == (len(small), VIEWS, 1280) and cached.views.dtype == np.float16
    assert cached.valid.all() and (cached.labels == small.labels).all() and cached.seed == SEED
    net = create_backbone("efficientnet-lite0", image_size=64)
    augment, index = Augment(), np.arange(len(pixels))
    for v in range(VIEWS):
        direct = net.features(augment(pixels, index, view=v, seed=SEED, size=64))
        np.testing.assert_allclose(cached.views[:, v].astype(np.float32), direct, rtol=1e-2, atol=1e-2)
    plain = net.features(pixels)
    assert not np.allclose(cached.views[:, 0].astype(np.float32), plain, rtol=1e-2, atol=1e-2)


def test_cached_views_do_not_depend_on_the_chunking_and_are_reused(built, small, client):
    cache, cached = built
    again = cached_views(small, views=VIEWS, seed=SEED, cache_dir=cache, chunk_rows=16, client=client)
    assert again.seconds == 0 and again.location == cached.location and (again.views == cached.views).all()
    other = cached_views(small, views=VIEWS, seed=SEED, cache_dir=cache, chunk_rows=20, client=client)
    assert other.location != cached.location and other.seconds > 0
    # same pixels in other batches: the features agree to float16 precision
    np.testing.assert_allclose(other.views.astype(np.float32), cached.views.astype(np.float32), rtol=1e-2, atol=1e-2)


def test_a_different_seed_caches_different_views_and_a_killed_build_resumes(small, client, tmp_path):
    tiny = small.subset(np.arange(16))
    cache = str(tmp_path)
    first = cached_views(tiny, views=2, seed=0, cache_dir=cache, chunk_rows=8, client=client)
    other = cached_views(tiny, views=2, seed=1, cache_dir=cache, chunk_rows=8, client=client)
    assert other.location != first.location
    assert np.abs(other.views.astype(np.float32) - first.views.astype(np.float32)).mean(axis=(1, 2)).min() > 0.01
    # as if killed after its first task: chunk 1 not done, the version incomplete
    group = zarr.open_group(first.location, mode="r+")
    group["views"][8:16] = 0
    group["views"][0:8] = 7  # a done chunk, which the rerun must leave alone
    group["chunk_done"][1] = 0
    group.attrs["complete"] = False
    resumed = cached_views(tiny, views=2, seed=0, cache_dir=cache, chunk_rows=8, client=client)
    assert resumed.location == first.location and resumed.seconds > 0
    assert (resumed.views[:8] == 7).all() and (resumed.views[8:] == first.views[8:]).all()


@pytest.mark.parametrize("kwargs, name", [
    ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
    ({"crop_scale": (0.5, 1.2)}, "crop_scale"),
    ({"crop_scale": (0.9, 0.5)}, "crop_scale"),
    ({"crop_scale": 0.5}, "crop_scale"),
    ({"crop_ratio": (0.0, 1.0)}, "crop_ratio"),
    ({"max_shift": -0.1}, "max_shift"),
    ({"max_shift": 0.7}, "max_shift"),
    ({"rotate": -5}, "rotate"),
    ({"flip": "yes"}, "flip"),
])
def test_bad_augment_parameters_are_errors_naming_them(kwargs, name):
    with pytest.raises(AugmentError, match=name):
        Augment(**kwargs)


def test_bad_view_counts_and_seeds_are_errors_naming_them(pixels):
    for views in (0, -1, 1.5):
        with pytest.raises(AugmentError, match="views"):
            cached_views("digits", views=views)
        with pytest.raises(AugmentError, match="views"):
            ViewTransform(BackboneSpec(), views=views)
    with pytest.raises(AugmentError, match="seed"):
        cached_views("digits", seed=-1)
    with pytest.raises(AugmentError, match="augment"):
        cached_views("digits", augment={"flip": False})
    with pytest.raises(AugmentError, match="view"):
        Augment()(pixels[:2], [0, 1], view=-1)
    with pytest.raises(AugmentError, match="rows"):
        Augment()(pixels[:2], [0], view=0)
