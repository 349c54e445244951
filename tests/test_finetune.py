"""Finetune mode: every deep method trains the real backbone end to end on real images, on CPU.

Small on purpose (96 Fashion-MNIST images at 32 px, one or two epochs): these check the mechanics
a user relies on — the backbone's weights move, the encoder carries them, and encoding an image
later (alone, in a batch, through the Dask pipeline) gives the codes of the trained network.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import hashindex
from hashindex.backbones import BackboneError, BackboneSpec, load_backbone
from hashindex.build import train_encoder
from hashindex.encoder import Encoder
from hashindex.methods import MethodError
from hashindex.methods.dpfah import SimAM
from hashindex.sources import SourceError, read_tags

SPEC = BackboneSpec("efficientnet-lite0", 32)
DEEP = ["uhga", "dpfah", "nrdh", "lagnh", "ucsh"]


@pytest.fixture(scope="module")
def small(fmnist):
    rows = np.sort(np.random.default_rng(3).choice(60_000, 96, replace=False))
    return fmnist.subset(rows)


@pytest.fixture(scope="module")
def tuned(small, cache_dir, client):
    """One fine-tuned encoder per deep method (two epochs of batches of 32)."""
    return {m: train_encoder(small, m, 16, backbone=SPEC, mode="finetune", client=client,
                             params={"epochs": 2, "batch_size": 32}) for m in DEEP}


def _moved(encoder: Encoder) -> float:
    pretrained = load_backbone(SPEC, device="cpu").net.state_dict()
    return max(float((encoder.backbone_state[k].float() - v.float()).abs().max())
               for k, v in pretrained.items() if v.is_floating_point())


@pytest.mark.parametrize("method", DEEP)
def test_finetune_trains_the_backbone_and_the_encoder_carries_it(tuned, small, method):
    encoder = tuned[method]
    assert encoder.finetuned and encoder.training["mode"] == "finetune"
    assert _moved(encoder) > 0, "the backbone's weights did not change"
    pixels = small.read(np.arange(12)).pixels
    # what the pretrained backbone gives differs from the trained one
    pretrained = load_backbone(SPEC, device="cpu").features(pixels)
    assert not np.allclose(encoder.backbone.features(pixels), pretrained)
    # save/load bit for bit, and an image alone gets the same bits as in a batch
    again = Encoder.from_bytes(encoder.to_bytes())
    assert again.id == encoder.id and again.finetuned
    batch = again.encode_pixels(pixels)
    assert np.array_equal(batch, encoder.encode_pixels(pixels))
    alone = np.concatenate([again.encode_pixels(pixels[i:i + 1]) for i in range(len(pixels))])
    assert np.array_equal(alone, batch)


def test_finetuned_encoder_runs_unchanged_through_the_dask_pipeline(tuned, small, client, tmp_path):
    encoder = tuned["dpfah"]
    index = hashindex.encode(small, encoder, str(tmp_path / "idx"), client=client)
    assert index.encoder.id == encoder.id and index.encoder.finetuned
    assert np.array_equal(index.codes, encoder.encode_pixels(small.read(np.arange(len(small))).pixels))


def test_dpfah_puts_parameter_free_attention_after_the_stem(tuned):
    encoder = tuned["dpfah"]
    # the attention is part of the backbone spec, the one record of the network, in both modes
    assert encoder.backbone_spec == BackboneSpec("efficientnet-lite0", 32, stem_attention="simam")
    assert encoder.config["backbone"]["stem_attention"] == "simam" and "tuned_backbone" in encoder.config
    after_stem = encoder.backbone.net.after_stem
    assert isinstance(after_stem.module, SimAM)
    # the other methods fine-tune the plain backbone
    assert tuned["uhga"].backbone_spec.stem_attention is None and "stem_attention" not in tuned["uhga"].config["backbone"]
    assert isinstance(tuned["uhga"].backbone.net.after_stem, torch.nn.Identity)


def test_dpfah_on_resnet18_is_the_papers_network(tmp_path):
    import torchvision
    path = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    spec = BackboneSpec("resnet18", 32, str(path))
    net = load_backbone(replace(spec, stem_attention="simam"), device="cpu").net
    assert isinstance(net.maxpool[1].module, SimAM)  # X + SimAM(X) right after conv1/bn1/relu/maxpool
    plain = load_backbone(spec, device="cpu").net
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())
    with pytest.raises(BackboneError, match="unknown stem attention"):
        load_backbone(replace(spec, stem_attention="cbam"), device="cpu")
    with pytest.raises(BackboneError, match="no place for an attention module"):
        load_backbone(BackboneSpec("alexnet", 32, str(path), stem_attention="simam"), device="cpu")


def test_nrdh_saves_stage_one_representations_with_the_encoder(tuned, small):
    encoder = tuned["nrdh"]
    reps = encoder.training_arrays["node_representations"]
    assert reps.shape == (len(small), 16) and np.isfinite(reps).all()
    again = Encoder.from_bytes(encoder.to_bytes())
    assert np.array_equal(again.training_arrays["node_representations"], reps)
    assert again.id == encoder.id  # the record is not part of what the encoder computes


def test_baselines_have_no_finetune_mode(small, cache_dir):
    with pytest.raises(MethodError, match="no finetune mode"):
        train_encoder(small, "itq", 16, backbone=SPEC, mode="finetune", n_workers=1)
    with pytest.raises(MethodError, match="unknown training mode"):
        train_encoder(small, "itq", 16, backbone=SPEC, mode="full", n_workers=1)


def test_validation_split_is_carved_from_the_training_images(small, cache_dir, client):
    encoder = train_encoder(small, "itq", 16, backbone=SPEC, validation=0.25, client=client)
    assert encoder.training["images"] == 72 and encoder.training["validation"]["images"] == 24
    assert 0.0 < encoder.training["validation"]["map@all"] <= 1.0


def test_lagnh_trains_on_user_tags_from_a_file(small, cache_dir, client, tmp_path):
    tags = np.eye(10, dtype=np.uint8)[small.labels]
    path = tmp_path / "tags.txt"
    path.write_text("".join(f"{i} {' '.join(map(str, t))}\n" for i, t in zip(small.ids, tags)))
    read = read_tags(str(path), list(small.ids))
    assert np.array_equal(read, tags)
    encoder = train_encoder(small, "lagnh", 16, backbone=SPEC, tags=read, client=client, params={"profile": "paper", "epochs": 2})
    # encoding predicts the concepts with a classifier fitted to the user tags, as training's graph did
    assert encoder.head.predict_tags and encoder.head.tag_rule == "sigmoid"
    # an image the file does not list is an error naming it
    path.write_text("".join(f"{i} {' '.join(map(str, t))}\n" for i, t in zip(small.ids[1:], tags[1:])))
    with pytest.raises(SourceError, match=f"no tags for 1 of 96 images, e.g. '{small.ids[0]}'"):
        read_tags(str(path), list(small.ids))
