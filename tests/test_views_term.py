"""The shared ``views`` term: NT-Xent between the codes of a training image and those of one of its
cached augmented views, a term any deep method can weight in head mode."""
import os

import numpy as np
import pytest
import torch

from hashindex.augment import Augment
from hashindex.backbones import BackboneSpec, create_backbone
from hashindex.build import train_encoder
from hashindex.methods import create_method
from hashindex.methods.base import MethodError
from hashindex.methods.targets import view_contrast

ROWS = 300


@pytest.fixture(scope="module")
def views(fmnist_features):
    """Features of two augmented views of the first 300 training images, [300, 2, 1280]."""
    backbone = create_backbone("efficientnet-lite0", image_size=64)
    pixels = fmnist_features["pixels"][:ROWS]
    return np.stack([backbone.features(Augment()(pixels, np.arange(ROWS), view=v, seed=0, size=64))
                     for v in range(2)], 1)


def test_view_contrast_rewards_a_view_that_keeps_its_images_code():
    g = torch.Generator().manual_seed(0)
    codes = torch.tanh(3 * torch.randn(64, 32, generator=g))
    kept = codes + 0.1 * torch.randn(64, 32, generator=g)
    swapped = kept[torch.randperm(64, generator=g)]
    assert view_contrast(codes, kept) < 0.5 * view_contrast(codes, swapped)
    assert view_contrast(codes, codes, temperature=0.01) < 1e-3  # each partner found for certain
    torch.testing.assert_close(view_contrast(codes, kept), view_contrast(kept, codes))


def test_views_term_keeps_a_views_code_close_to_its_images(fmnist_features, views):
    x = fmnist_features["train"][:ROWS]
    method = create_method("uhga", 32, epochs=6, loss_weights={"views": 1.0})
    head = method.fit(x, views=views)
    assert method.uses_views and method.view_features_.shape[:2] == (ROWS, 2)
    # the views went through the neighbourhood embedding, as the features did
    assert method.view_features_.shape[2] == method.neighbourhood_.diffused_.shape[1]
    assert "views" in method.history_[0] and method.history_[-1]["views"] < 0.9 * method.history_[0]["views"]
    baseline = create_method("uhga", 32, epochs=6).fit(x)

    def own_rank(h):  # mean rank of a view's own image among the 300 by Hamming distance (ties: half)
        with torch.no_grad():
            images = torch.sign(h(torch.from_numpy(x)))
            ranks = []
            for v in range(2):
                d = (32 - torch.sign(h(torch.from_numpy(views[:, v]))) @ images.T) / 2
                own = d.diagonal()[:, None]
                ranks.append(((d < own).sum(1) + 0.5 * ((d == own).sum(1) - 1)).float().mean())
            return float(torch.stack(ranks).mean())
    # measured 26 against 43 without the term
    assert own_rank(head) < 0.8 * own_rank(baseline), (own_rank(head), own_rank(baseline))


@pytest.mark.parametrize("method", ["dpfah", "nrdh", "lagnh", "ucsh"])
def test_every_deep_method_takes_the_views_term(method, fmnist_features, views):
    x, y = fmnist_features["train"][:ROWS], fmnist_features["train_labels"][:ROWS]
    hasher = create_method(method, 16, epochs=1, loss_weights={"views": 0.5})
    hasher.fit(x, y if hasher.needs_labels else None, views=views)
    assert hasher.history_[0]["views"] > 0


def test_views_are_checked(fmnist_features, views):
    x = fmnist_features["train"][:ROWS]
    with pytest.raises(MethodError, match="needs augmented views"):
        create_method("uhga", 16, epochs=1, loss_weights={"views": 1.0}).fit(x)
    with pytest.raises(MethodError, match="no term of this profile uses them"):
        create_method("uhga", 16, epochs=1).fit(x, views=views)
    with pytest.raises(MethodError, match="no term of this profile uses them"):
        create_method("itq", 16).fit(x, views=views)
    with pytest.raises(MethodError, match=r"views must be \[n, V, d\]"):
        create_method("uhga", 16, epochs=1, loss_weights={"views": 1.0}).fit(x, views=views[:10])


def test_train_encoder_computes_the_views_it_trains_on(fmnist, cache_dir, client):
    small = fmnist.subset(np.sort(np.random.default_rng(7).choice(60_000, 64, replace=False)))
    spec = BackboneSpec("efficientnet-lite0", 32)
    params = {"epochs": 2, "view_count": 2, "loss_weights": {"views": 1.0}}
    encoder = train_encoder(small, "uhga", 16, backbone=spec, client=client, params=params)
    assert encoder.training["params"]["loss_weights"]["views"] == 1.0
    # through the network the profile trains on (UHGA's default: pooled blocks 10, 12, 14)
    assert encoder.backbone_spec.blocks == (10, 12, 14)
    assert any(name.startswith("efficientnet-lite0-b10.12.14-32px-2v") for name in os.listdir(os.path.join(cache_dir, "views")))
    with pytest.raises(MethodError, match="views term is for head mode"):
        train_encoder(small, "uhga", 16, backbone=spec, client=client, mode="finetune", params={**params, "profile": "paper"})
