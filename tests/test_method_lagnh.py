"""LAGNH on real EfficientNet-Lite0 features of Fashion-MNIST (short schedules)."""
import numpy as np
import pytest
import torch

from conftest import held_out_map
from hashindex.backbones import BackboneSpec, load_backbone
from hashindex.encoder import Encoder, pack_signs
from hashindex.methods import create_method
from hashindex.methods.lagnh import mean_squared_distance

SHORT = {"epochs": 10, "batch_size": 256, "anchors": 500}


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.unpackbits(a, axis=1) == np.unpackbits(b, axis=1)).mean())


@pytest.fixture(scope="module")
def trained(fmnist_features):
    method = create_method("lagnh", 32, profile="head-cpu", **SHORT)
    head = method.fit(fmnist_features["train"])
    return method, head


def test_trains_and_beats_lsh(trained, fmnist_features):
    method, head = trained
    assert method.history_[-1]["loss"] < method.history_[0]["loss"]
    assert method.tags_.shape == (1000, 1000) and (method.tags_.sum(1) >= 1).all()
    lsh = create_method("lsh", 32).fit(fmnist_features["train"])
    assert held_out_map(head, fmnist_features) > held_out_map(lsh, fmnist_features) + 0.05


def test_paper_profile_encodes_a_training_image_as_training_did(fmnist_features):
    """The GCN is trained with the graph operator that encodes: self + m nearest anchors (the paper's
    dense batch graph trained it for a near-uniform average that encoding never applies)."""
    method = create_method("lagnh", 32, profile="paper", epochs=8, batch_size=256, anchors=500)
    head = method.fit(fmnist_features["train"])
    encoder = Encoder(method="lagnh", bits=32, backbone=BackboneSpec(), head=head)
    alone = encoder.encode_features(fmnist_features["train"])
    assert _agreement(alone, pack_signs(method.training_codes())) >= 0.95
    # σ² "auto": the anchors' mean squared distance, the value training used at its last step
    assert float(head.sigma2) == pytest.approx(float(mean_squared_distance(head.anchor_features)), rel=1e-9)


def test_attention_weights_sum_to_one_over_an_images_concepts(trained, fmnist_features):
    method, head = trained
    x = torch.from_numpy(fmnist_features["query"]).double()
    tags = head.tags(x)
    with torch.no_grad():
        weights = head.attention(x, tags)
    assert torch.allclose(weights.sum(1), torch.ones(len(x), dtype=weights.dtype))
    assert (weights[tags == 0] == 0).all() and (weights[tags == 1] > 0).all()
    # more than one concept somewhere, so the softmax is not trivially 1
    assert (tags.sum(1) > 1).any()


def test_round_trip_and_independence(trained, fmnist_features):
    _, head = trained
    enc = Encoder(method="lagnh", bits=32, backbone=BackboneSpec("efficientnet-lite0", 64), head=head)
    back = Encoder.from_bytes(enc.to_bytes())
    assert set(back.head.kwargs) >= {"anchors", "neighbours"} and back.head.anchor_features.shape[0] == 500
    q = fmnist_features["query"]
    batch = enc.encode_features(q)
    assert np.array_equal(batch, back.encode_features(q))
    for i in (0, 7):
        assert np.array_equal(enc.encode_features(q[i:i + 1]), batch[i:i + 1])


def test_user_tags_reach_encoding(fmnist_features):
    """With user tags, encoding sees concepts too: a classifier fitted to the tags predicts them from
    the feature, and training's graph used those predictions, so a training image encodes as trained."""
    x, labels = fmnist_features["train"][:500], fmnist_features["train_labels"][:500]
    tags = np.zeros((len(x), 12), np.uint8)
    tags[np.arange(len(x)), labels] = 1                    # one tag per class …
    tags[np.arange(len(x)), 10 + (labels >= 5)] = 1        # … and a coarse one
    method = create_method("lagnh", 16, profile="paper", epochs=4, batch_size=128, anchors=200)
    head = method.fit(x, tags=tags)
    assert head.predict_tags and head.tag_rule == "sigmoid" and head.concept_embedding.shape == (12, 512)
    predicted = head.tags(torch.from_numpy(x)).numpy()
    assert (predicted == tags).all(1).mean() > 0.8
    encoder = Encoder(method="lagnh", bits=16, backbone=BackboneSpec(), head=head)
    assert _agreement(encoder.encode_features(x), pack_signs(method.training_codes())) >= 0.95
    # the concepts change the codes: an encoder told to use none encodes differently
    blind = Encoder.from_bytes(encoder.to_bytes())
    blind.head.predict_tags = False
    assert not np.array_equal(blind.encode_features(x), encoder.encode_features(x))


def test_finetune_training_sees_the_tags_of_the_trained_network(fmnist_features):
    """In finetune mode the graph's concepts come from the backbone being trained, as a new image's do."""
    pixels, x = fmnist_features["pixels"][:96], fmnist_features["features"][:96]
    backbone = load_backbone(BackboneSpec("efficientnet-lite0", 64), device="cpu")
    method = create_method("lagnh", 16, profile="paper", epochs=2, batch_size=32, anchors=48, lr=1e-3, backbone_lr_factor=1.0)
    head = method.fit(x, images=lambda rows: pixels[rows], backbone=backbone)
    tuned = torch.from_numpy(backbone.features(pixels))
    assert not torch.allclose(tuned, torch.from_numpy(x), atol=1e-3)
    anchors = method.anchor_rows_
    assert torch.equal(head.anchor_tags, head.tags(tuned[anchors].double()))
    codes = pack_signs(head(tuned))
    assert _agreement(codes, pack_signs(method.training_codes())) >= 0.95


def test_switch_seed_and_fusion(fmnist_features):
    x = fmnist_features["train"][:256]
    quick = {"epochs": 2, "batch_size": 128, "anchors": 100, "critic_every": 1}
    a = create_method("lagnh", 16, profile="head-cpu", **quick)
    a.fit(x)
    b = create_method("lagnh", 16, profile="head-cpu", **quick)
    b.fit(x)
    enc = [Encoder(method="lagnh", bits=16, backbone=BackboneSpec(), head=m.head_) for m in (a, b)]
    assert np.array_equal(enc[0].encode_features(x), enc[1].encode_features(x))
    off = create_method("lagnh", 16, profile="head-cpu", loss_weights={"semantic": 0.0}, **quick)
    off.fit(x)
    assert off.history_[0]["loss"] != a.history_[0]["loss"]
    semantic_only = create_method("lagnh", 16, profile="head-cpu", fusion=0.0, **quick)
    semantic_only.fit(x)
    assert np.isfinite(semantic_only.history_[-1]["loss"]) and np.isfinite(a.history_[-1]["loss"])
    assert not np.array_equal(Encoder(method="lagnh", bits=16, backbone=BackboneSpec(),
                                      head=semantic_only.head_).encode_features(x), enc[0].encode_features(x))
