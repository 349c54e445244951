"""``mirror_average`` (any method, head mode): the method trains on the mean of each training image's
features and its mirror image's, and encodes each image as it is. Real Fashion-MNIST images through
the real backbone."""
from __future__ import annotations

import numpy as np
import pytest

from hashindex.augment import mirror
from hashindex.backbones import BackboneSpec, load_backbone
from hashindex.build import FeatureSet, mirror_features, train_encoder
from hashindex.encoder import Encoder
from hashindex.methods import MethodError, create_method

SPEC = BackboneSpec("efficientnet-lite0", 64)


def test_mirror_flips_each_image_left_to_right_in_either_pixel_format(fmnist):
    pixels = fmnist.read(np.arange(4)).pixels
    once = mirror(pixels)
    assert once.shape == pixels.shape and np.array_equal(once[:, :, ::-1], pixels)
    assert not np.array_equal(once, pixels) and np.array_equal(mirror(once), pixels)
    assert all(np.array_equal(a, b) for a, b in zip(mirror(list(pixels)), once))


def test_the_mirror_features_are_the_networks_features_of_the_mirror_images(fmnist_features):
    pixels = fmnist_features["pixels"][:300]
    mirrored = mirror_features(lambda positions: pixels[positions], len(pixels), SPEC, batch_rows=128)
    np.testing.assert_allclose(mirrored, load_backbone(SPEC, device="cpu").features(mirror(pixels)), atol=1e-5)
    # a clothing image and its mirror differ to the network, so the average is a new training row
    assert np.abs(mirrored - fmnist_features["features"][:300]).mean() > 0.05 * np.abs(mirrored).mean()


def test_train_encoder_fits_on_the_average_and_encodes_each_image_as_it_is(fmnist, fmnist_features):
    data = fmnist_features
    train = fmnist.subset(data["rows"][:300])
    features = FeatureSet(data["features"][:300], np.ones(300, bool), train.ids, data["labels"][:300], "", 0.0, SPEC)
    encoder = train_encoder(train, "itq", 32, features=features, params={"mirror_average": True})
    assert encoder.training["params"]["mirror_average"] is True
    average = (data["features"][:300] + load_backbone(SPEC, device="cpu").features(mirror(data["pixels"][:300]))) / 2
    expected = Encoder(method="itq", bits=32, backbone=SPEC, head=create_method("itq", 32).fit(average))
    queries = data["query"]
    assert np.array_equal(encoder.encode_features(queries), expected.encode_features(queries))
    plain = train_encoder(train, "itq", 32, features=features)
    assert "mirror_average" not in plain.training["params"]
    assert not np.array_equal(plain.encode_features(queries), encoder.encode_features(queries))


def test_the_switch_is_off_by_default_on_by_request_and_misuse_is_a_clear_error(fmnist, fmnist_features):
    # no default turns it on: for UHGA it gained at 32 bits on the validation split but was mixed at 16
    # (issue 14's eleventh pass); the other defaults were not probed
    assert not any(create_method(name, 32).mirror_average for name in ("uhga", "nrdh", "lagnh", "ucsh", "dpfah", "itq"))
    assert create_method("uhga", 32, mirror_average=True).mirror_average
    assert create_method("uhga", 32, mirror_average=True).params()["mirror_average"] is True
    with pytest.raises(MethodError, match="mirror_average must be true or false"):
        create_method("nrdh", 32, mirror_average="yes")
    data = fmnist_features
    train = fmnist.subset(data["rows"][:100])
    features = FeatureSet(data["features"][:100], np.ones(100, bool), train.ids, data["labels"][:100], "", 0.0, SPEC)
    with pytest.raises(MethodError, match="mirror_average averages frozen features"):
        train_encoder(train, "uhga", 32, mode="finetune", features=features, params={"mirror_average": True})
