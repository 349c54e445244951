"""The validation probes behind the 'frozen' profiles' settings (issue 14), on training images only.

The protocol's 5,000 training images are split (seeded) into 4,000 to train on and 1,000 held-out
queries, retrieved among the 4,000 (what ``train_encoder(validation=0.2)`` does). The protocol's
queries are never read. Prints 32-bit mAP@all of:

- ITQ on raw features and on the neighbourhood embedding over a grid of its settings;
- an SDC-style head (1280 → 1024 → 32, L1 fit of code cosines to the calibrated cosine of the
  embedding, quantisation and balance) on the embedding, as the shared ``pairs`` term trains it;
- the same head with augmented views (cached by ``cached_views``): views as extra inputs, or an
  NT-Xent term between the codes of an image and one of its views (CIBHash's τ = 0.3);
- ITQ on an embedding whose anchor graph is built from view-averaged anchor features.

``--uhga-views``: instead, UHGA's default profile with the shared ``views`` term (NT-Xent on the codes of
an image and of one of its 8 cached views) at weights 0, 0.02 and 0.1, scored as held-out queries among
the held-out images (measured 0.642, 0.646, 0.635: within noise or worse, so no default weights it).
DPFAH's default (``frozen``) measured 0.769 → 0.743 with views as extra samples.

``--dpfah``: instead, DPFAH's default profile on its own (SimAM) features, with and without the 8
augmented views of each training image as extra labelled samples; scored as held-out queries among
the held-out images (both unseen, as the protocol's database mostly is) and among the training rows.

    python bench/validation_probes.py [--split-seed 0] [--dpfah | --uhga-views]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import hashindex
from hashindex.backbones import BackboneSpec
from hashindex.build import cached_views
from hashindex.methods import create_method
from hashindex.methods.neighbourhood import NeighbourhoodEmbedding, embed
from hashindex.methods.targets import bit_balance, make_target, manifold_rank, pair_agreement
from hashindex.metrics import evaluate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--dpfah", action="store_true", help="the DPFAH views probe only")
    parser.add_argument("--uhga-views", action="store_true", help="UHGA's default with the shared views term only")
    args = parser.parse_args(argv)
    if args.dpfah:
        return dpfah_views(args.split_seed)
    if args.uhga_views:
        return uhga_views(args.split_seed)
    source = hashindex.open_source("fashion-mnist")
    _, train, _ = hashindex.protocol_split(source, seed=0)
    spec = BackboneSpec("efficientnet-lite0", 64)
    x = torch.from_numpy(hashindex.cached_features(source.subset(train), spec).features.astype(np.float32))
    views = torch.from_numpy(cached_views(source.subset(train), spec, views=8).views.astype(np.float32))
    labels = source.labels[train]
    rng = np.random.default_rng(args.split_seed)
    held = np.sort(rng.choice(len(x), 1000, replace=False))
    fit_rows = np.setdiff1d(np.arange(len(x)), held)
    xt = x[fit_rows]

    def score(encode) -> float:
        pack = lambda h: np.packbits((h >= 0).numpy().astype(np.uint8), axis=1)  # noqa: E731
        with torch.no_grad():
            return round(evaluate(pack(encode(x[held])), pack(encode(xt)), labels[held], labels[fit_rows],
                                  topks=(None,))["map@all"], 4)

    def itq_on(transform) -> float:
        head = create_method("itq", 32).fit(transform(xt).numpy())
        return score(lambda a: head(transform(a).double()).float())

    print("itq, raw features", itq_on(lambda a: a), flush=True)
    for settings in [{"graph_k": 10, "alpha": 0.9}, {}, {"graph_k": 10}, {"alpha": 0.9}, {"alpha": 0.99},
                     {"graph_k": 30}, {"k": 5}, {"k": 20}]:
        nb = NeighbourhoodEmbedding(**settings).fit(xt)
        print("itq, neighbourhood", settings or "(defaults: k 10, graph_k 20, alpha 0.95)", itq_on(nb.transform),
              flush=True)

    nb = NeighbourhoodEmbedding().fit(xt)
    z = nb.transform(xt)
    z_views = torch.stack([nb.transform(views[fit_rows][:, v]) for v in range(views.shape[1])], 1)

    def sdc_head(views_in: float = 0.0, nce: float = 0.0, tau: float = 0.3, epochs: int = 30) -> float:
        torch.manual_seed(0)
        target = make_target({"name": "calibrated"}).fit(z)
        head = torch.nn.Sequential(torch.nn.Linear(z.shape[1], 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 32))
        opt = torch.optim.Adam(head.parameters(), lr=3e-4)
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            order = torch.randperm(len(z), generator=g)
            for i in range(0, len(z), 256):
                idx = order[i:i + 256]
                inputs = z[idx]
                if views_in:
                    pick = torch.randint(z_views.shape[1], (len(idx),), generator=g)
                    use = torch.rand(len(idx), generator=g) < views_in
                    inputs = torch.where(use[:, None], z_views[idx, pick], inputs)
                h = torch.tanh(head(inputs))
                loss = pair_agreement(h, target(idx)) + 0.1 * (h.abs() - 1).pow(2).mean() + 0.1 * bit_balance(h)
                if nce:
                    pick = torch.randint(z_views.shape[1], (len(idx),), generator=g)
                    both = F.normalize(torch.cat([h, torch.tanh(head(z_views[idx, pick]))]), dim=1)
                    sims = (both @ both.T / tau).fill_diagonal_(-1e9)
                    n = len(idx)
                    loss = loss + nce * F.cross_entropy(sims, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        return score(lambda a: head(nb.transform(a)))

    print("sdc head on the embedding", sdc_head(), flush=True)
    print("  + views as inputs (half the rows)", sdc_head(views_in=0.5), flush=True)
    print("  + NT-Xent on views, weight 0.1", sdc_head(nce=0.1), flush=True)
    print("  + NT-Xent on views, weight 0.5", sdc_head(nce=0.5), flush=True)

    # anchors' graph from view-averaged features; a new image still ranks anchors by its own feature
    anchors = F.normalize(xt, dim=1)
    for n_views in (0, 4, 8):
        averaged = F.normalize(torch.cat([anchors[:, None], F.normalize(views[fit_rows][:, :n_views], dim=2)], 1)
                               .mean(1), dim=1)
        diffused = manifold_rank(averaged, 20, 0.95, 3.0).float()
        print(f"itq, anchor graph on {n_views} views averaged", itq_on(lambda a: embed(a, anchors, diffused, 10)),
              flush=True)
    return 0


def uhga_views(split_seed: int) -> int:
    source = hashindex.open_source("fashion-mnist")
    _, train, _ = hashindex.protocol_split(source, seed=0)
    spec = BackboneSpec("efficientnet-lite0", 64)
    x = hashindex.cached_features(source.subset(train), spec).features.astype(np.float32)
    views = cached_views(source.subset(train), spec, views=8).views.astype(np.float32)
    labels = source.labels[train]
    rng = np.random.default_rng(split_seed)
    held = np.sort(rng.choice(len(x), 1000, replace=False))
    fit_rows = np.setdiff1d(np.arange(len(x)), held)
    for weight in (0.0, 0.02, 0.1):
        method = create_method("uhga", 32, loss_weights={"views": weight})
        head = method.fit(x[fit_rows], views=views[fit_rows] if weight else None)
        with torch.no_grad():
            codes = np.packbits((head(torch.from_numpy(x[held])) >= 0).numpy().astype(np.uint8), axis=1)
        score = evaluate(codes, codes, labels[held], labels[held], topks=(None,))["map@all"]
        print(f"uhga default, views term weight {weight}: held-out among held-out {score:.4f}", flush=True)
    return 0


def dpfah_views(split_seed: int) -> int:
    from hashindex.build import method_backbone

    source = hashindex.open_source("fashion-mnist")
    _, train, _ = hashindex.protocol_split(source, seed=0)
    spec = method_backbone("dpfah", BackboneSpec("efficientnet-lite0", 64))
    x = hashindex.cached_features(source.subset(train), spec).features.astype(np.float32)
    views = cached_views(source.subset(train), spec, views=8).views.astype(np.float32)
    labels = source.labels[train]
    rng = np.random.default_rng(split_seed)
    held = np.sort(rng.choice(len(x), 1000, replace=False))
    fit_rows = np.setdiff1d(np.arange(len(x)), held)
    pack = lambda h: np.packbits((h >= 0).numpy().astype(np.uint8), axis=1)  # noqa: E731
    for n_views in (0, 8):
        feats = np.concatenate([x[fit_rows], views[fit_rows][:, :n_views].reshape(-1, x.shape[1])])
        head = create_method("dpfah", 32).fit(feats, np.concatenate([labels[fit_rows], np.repeat(labels[fit_rows], n_views)]))
        with torch.no_grad():
            codes_held, codes_fit = pack(head(torch.from_numpy(x[held]).double())), pack(head(torch.from_numpy(x[fit_rows]).double()))
        among_held = evaluate(codes_held, codes_held, labels[held], labels[held], topks=(None,))["map@all"]
        among_fit = evaluate(codes_held, codes_fit, labels[held], labels[fit_rows], topks=(None,))["map@all"]
        print(f"dpfah, {n_views} views as extra samples: held-out among held-out {among_held:.4f}, "
              f"among training rows {among_fit:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
