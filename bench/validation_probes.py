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

``--ceiling``: instead, why no unsupervised code reaches 1.25x ITQ: mAP of float cosine ranking (no
hashing) on the raw features and on the neighbourhood embedding, beside 32-bit ITQ on each, then the
variants of the embedding that were tried (spectral embedding of the training graph, PCA whitening
before the graph, anchors that include the augmented views, view-averaged anchor graph) and codes
learned from pseudo-labels (k-means of the embedding, DPFAH's default trained on them), all scored as
held-out queries among the held-out images.

``--blocks``: instead, which backbone blocks the unsupervised defaults take their features from
(``feature_blocks``): float cosine, 32-bit ITQ on the raw features and UHGA's default profile on the
pooled head and on pooled outputs of middle blocks, alone and concatenated (measured, split 0,
UHGA: head 0.642, block 14 0.680, 10+14 0.686, 12+14 0.685, 8+10+12+14 0.681, 10+12+14 0.691;
ITQ 0.530 on the head, 0.567 on 10+12+14).

``--uhga-settings``: instead, UHGA's default profile on its block features (10, 12, 14) with one
setting changed at a time, 32 bits, held-out queries among held-out images (measured with the
float16 feature cache, issue 14's third pass; seed 0 / seed 1): default 0.684 / 0.658; 20 epochs
0.686 / –; neighbourhood k = 5 anchors 0.693 / 0.664, k = 3 0.694 / 0.656, k = 20 0.687 / 0.663;
``pairs`` weight 2 0.686 / –; calibration onto Beta(3, 3) 0.680 / 0.671, Beta(10, 10) 0.687 / 0.667.
Normalising the block features first (per-dimension z-scores, or z-scores then L2 per block) lowered
UHGA on seed 0 to 0.682 and 0.662 although it lifted ITQ on the embedding (0.679 → 0.691 / 0.701).

``--uhga-seeds``, ``--whiten``, ``--pooling`` (issue 14's fourth pass, block features 10, 12, 14, both
splits): UHGA's default against neighbourhood k = 5 over training seeds 0, 1, 2, and with the shared
``views`` term on the blocks' own cached views; the neighbourhood embedding of PCA-whitened features
(float ranking, 32-bit ITQ on it, UHGA on it); and other poolings of the blocks' feature maps (a 2 × 2
or 4 × 4 grid of block 10, max beside mean, block 7 added) by float ranking, ITQ on the raw pooled
features and ITQ on their embedding. Measured numbers are in bench/README.md.

``--student`` (issue 14's fifth pass, both splits, training seeds 0 and 1): UHGA's head on frozen block
features (``student`` off) against its student (the default: blocks 8–14 of the backbone and a new
head distilled from the head's codes on augmented views, hashindex/methods/student.py), both trained
by ``train_encoder`` on the 4,000 rows; the student encodes the held-out images from their pixels.
``--student --methods nrdh ucsh lagnh`` (the eighth pass) does the same for other methods' defaults,
each on the features its default trains on (LAGNH: the pooled head; its student tunes blocks 8–15 and
the head's convolution); ``--seeds`` picks the training seeds. Each student is its default's as it is
now: the eighth pass measured them with the blocks at lr 1e-4, the shared default then.

``--student-variants`` (issue 14's sixth pass, both splits, training seed 0): the default student
against variants of it, all distilled by ``student.distil`` from the same head: the head's soft codes
(its tanh outputs as bit probabilities) as targets instead of its bits; milder augmentation; a teacher
with the neighbourhood over 5 anchors; the default student's codes averaged with those of the
flipped image; a second teacher trained on the student's tuned block features, and a student of it.

``--student-settings`` (issue 14's ninth pass, both splits, ``--seeds``): UHGA's head distilled by
students that differ from the shared student defaults in the blocks' learning rate (3e-4, 1e-3, 3e-3
against 1e-4), 10 epochs or tuning from block 5, each from the same head. With ``--methods lagnh nrdh
ucsh`` (the tenth pass): each of those defaults' heads distilled with the blocks at lr 1e-4 and 1e-3
(``--backbone-lrs`` picks others); ``--train-images 1000`` trains heads and students on a seeded 1,000
of the 4,000 rows, as a small collection would. Measured numbers are in bench/README.md.

``--teachers`` (issue 14's seventh pass, both splits): several teachers for one student. UHGA's head at
training seeds 0–4, each with how well its sign codes keep the calibrated target it trained on (whether
that unsupervised objective could pick a seed); the consensus of seeds 0–2 (ITQ on their concatenated
codes); the student's and its teacher's codes summed at encoding; IMH + ITQ on PCA-whitened blocks as a
second, different teacher, its consensus with the head, and students of both. ``--teachers-protocol``
then checks the consensus student against the default on the protocol (training seeds 0–2).

``--mirror-average`` (issue 14's eleventh pass, both splits, ``--methods``, ``--seeds``): each method's
default with and without ``mirror_average``, its head trained on the mean of each training image's
features and its mirror image's, the student included; both trained by ``train_encoder``, at ``--bits``.

``--dpfah``: instead, DPFAH's default profile on its own (SimAM) features, with and without the 8
augmented views of each training image as extra labelled samples; scored as held-out queries among
the held-out images (both unseen, as the protocol's database mostly is) and among the training rows.

    python bench/validation_probes.py [--split-seed 0] [--dpfah | --uhga-views | --uhga-settings | --ceiling | --blocks]
    python bench/validation_probes.py [--uhga-seeds | --whiten | --pooling | --student | --student-variants | --teachers]  # both splits
    python bench/validation_probes.py --student --methods nrdh ucsh lagnh --seeds 0 1
    python bench/validation_probes.py --student-settings --seeds 0 1
    python bench/validation_probes.py --student-settings --methods lagnh nrdh ucsh --seeds 0 1 [--backbone-lrs 3e-4] [--train-images 1000]
    python bench/validation_probes.py --mirror-average --methods uhga nrdh ucsh --seeds 0 1 [--bits 16]
    python bench/validation_probes.py --teachers-protocol  # the protocol's queries: a check, never a choice
"""
from __future__ import annotations

import argparse
import functools

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


def validation_split(split_seed: int, spec: BackboneSpec = BackboneSpec("efficientnet-lite0", 64), views: bool = True):
    """Features and 8 cached views (None with ``views=False``) of the protocol's 5,000 training images
    (float32), their labels, and the seeded split: 1,000 held-out rows and the 4,000 to train on."""
    source = hashindex.open_source("fashion-mnist")
    _, train, _ = hashindex.protocol_split(source, seed=0)
    x = hashindex.cached_features(source.subset(train), spec).features.astype(np.float32)
    views = cached_views(source.subset(train), spec, views=8).views.astype(np.float32) if views else None
    held = np.sort(np.random.default_rng(split_seed).choice(len(x), 1000, replace=False))
    return x, views, source.labels[train], held, np.setdiff1d(np.arange(len(x)), held)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--dpfah", action="store_true", help="the DPFAH views probe only")
    parser.add_argument("--uhga-views", action="store_true", help="UHGA's default with the shared views term only")
    parser.add_argument("--ceiling", action="store_true", help="float-ranking ceilings and the embedding variants tried")
    parser.add_argument("--blocks", action="store_true", help="UHGA's default on the features of middle blocks")
    parser.add_argument("--uhga-settings", action="store_true", help="UHGA's default with one setting changed at a time")
    parser.add_argument("--uhga-seeds", action="store_true", help="UHGA's default against k = 5 over training seeds, "
                        "and with the views term, on block features (both splits)")
    parser.add_argument("--whiten", action="store_true", help="the embedding of PCA-whitened block features (both splits)")
    parser.add_argument("--pooling", action="store_true", help="other poolings of the blocks' feature maps (both splits)")
    parser.add_argument("--student", action="store_true", help="a method's head against its student (both splits, "
                        "training seeds 0 and 1)")
    parser.add_argument("--methods", nargs="+", default=["uhga"], help="--student, --student-settings: the methods "
                        "(default uhga)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="--student, --student-settings: the "
                        "training seeds")
    parser.add_argument("--student-variants", action="store_true", help="variants of UHGA's student (both splits)")
    parser.add_argument("--student-settings", action="store_true", help="a method's student with one of its "
                        "settings changed: the blocks' learning rate (UHGA: also epochs, first block); both splits, "
                        "--seeds, --methods")
    parser.add_argument("--backbone-lrs", nargs="+", type=float, default=list(OTHER_BACKBONE_LRS),
                        help="--student-settings, methods other than uhga: the blocks' learning rates (default 1e-4 1e-3)")
    parser.add_argument("--train-images", type=int, help="--student-settings: train on a seeded sample of this "
                        "many of the 4,000 training rows (held-out rows unchanged)")
    parser.add_argument("--teachers", action="store_true", help="several teachers for one student (both splits)")
    parser.add_argument("--mirror-average", action="store_true", help="each method's default with and without "
                        "mirror_average (both splits, --methods, --seeds)")
    parser.add_argument("--bits", type=int, default=32, help="--mirror-average: the code length (default 32)")
    parser.add_argument("--teachers-protocol", action="store_true", help="the consensus student against the default "
                        "on the protocol (training seeds 0, 1, 2)")
    args = parser.parse_args(argv)
    if args.teachers:
        return teachers()
    if args.teachers_protocol:
        return teachers_protocol()
    if args.student:
        return student(args.methods, args.seeds)
    if args.mirror_average:
        return mirror_average(args.methods, args.seeds, args.bits)
    if args.student_variants:
        return student_variants()
    if args.student_settings:
        return student_settings(args.methods, args.seeds, args.backbone_lrs, args.train_images)
    if args.uhga_seeds or args.whiten or args.pooling:
        return fourth_pass(args)
    if args.blocks:
        return blocks(args.split_seed)
    if args.uhga_settings:
        return uhga_settings(args.split_seed)
    if args.ceiling:
        return ceiling(args.split_seed)
    if args.dpfah:
        return dpfah_views(args.split_seed)
    if args.uhga_views:
        return uhga_views(args.split_seed)
    x, views, labels, held, fit_rows = validation_split(args.split_seed)
    x, views = torch.from_numpy(x), torch.from_numpy(views)
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


def float_map(q: torch.Tensor, labels: np.ndarray) -> float:
    """mAP@all of each row's ranking of the other rows by float cosine (no hashing, no ties)."""
    sims = F.normalize(q.double(), dim=1) @ F.normalize(q.double(), dim=1).T
    sims.fill_diagonal_(-np.inf)
    order = sims.argsort(1, descending=True)[:, :-1].numpy()
    relevant = labels[order] == labels[:, None]
    precision = relevant.cumsum(1) / np.arange(1, relevant.shape[1] + 1)
    return round(float(np.mean((precision * relevant).sum(1) / np.maximum(relevant.sum(1), 1))), 4)


def ceiling(split_seed: int) -> int:
    from hashindex.methods.targets import mutual_knn_graph

    x, views, labels, held, fit_rows = validation_split(split_seed)
    x, views = torch.from_numpy(x), torch.from_numpy(views)
    xt, lh = x[fit_rows], labels[held]

    def report(name, transform):
        head = create_method("itq", 32).fit(transform(xt).numpy())
        with torch.no_grad():
            codes = np.packbits((head(transform(x[held]).double()) >= 0).numpy().astype(np.uint8), axis=1)
        itq = evaluate(codes, codes, lh, lh, topks=(None,))["map@all"]
        print(f"{name}: float cosine {float_map(transform(x[held]), lh)}, 32-bit ITQ {itq:.4f}", flush=True)

    report("raw features", lambda a: a)
    nb = NeighbourhoodEmbedding().fit(xt)
    report("neighbourhood embedding (default)", nb.transform)
    anchors = F.normalize(xt, dim=1)
    graph = mutual_knn_graph(xt, nb.graph_k, nb.power).to_dense().double()
    eigenvalues, vectors = torch.linalg.eigh(graph)
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
    for m in (64, 128):  # (I − αS)⁻¹ restricted to the top m eigenvectors, α = 0.99
        spectral = (vectors[:, :m] / (1 - 0.99 * eigenvalues[:m])).float()
        report(f"spectral embedding, top {m} eigenvectors", lambda a: embed(a, anchors, spectral, nb.k))
    white = whitening(xt, 128, 0.1)
    nb_white = NeighbourhoodEmbedding().fit(white(xt))
    report("neighbourhood embedding of PCA-whitened features (128 d)", lambda a: nb_white.transform(white(a)))
    view_anchors = F.normalize(torch.cat([xt[:, None], views[fit_rows]], 1).reshape(-1, xt.shape[1]), dim=1)
    view_diffused = nb.diffused_[:, None].expand(-1, views.shape[1] + 1, -1).reshape(-1, nb.diffused_.shape[1])
    report("anchors include the 8 views of each training image", lambda a: embed(a, view_anchors, view_diffused, nb.k))
    averaged = F.normalize(torch.cat([anchors[:, None], F.normalize(views[fit_rows], dim=2)], 1).mean(1), dim=1)
    nb_views = NeighbourhoodEmbedding().fit(averaged)
    nb_views.anchors_ = anchors
    report("graph on view-averaged features", nb_views.transform)
    z = F.normalize(nb.transform(xt).double(), dim=1)
    for clusters in (10, 40):  # pseudo-labels: spherical k-means of the embedding
        centres = z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[:clusters]]
        for _ in range(50):
            assignment = (z @ centres.T).argmax(1)
            centres = F.normalize(torch.stack([z[assignment == c].mean(0) if (assignment == c).any() else centres[c]
                                               for c in range(clusters)]), dim=1)
        pseudo = assignment.numpy()
        purity = sum(np.bincount(labels[fit_rows][pseudo == c]).max() for c in np.unique(pseudo)) / len(pseudo)
        head = create_method("dpfah", 32).fit(xt.numpy(), pseudo)
        with torch.no_grad():
            codes = np.packbits((head(x[held]) >= 0).numpy().astype(np.uint8), axis=1)
        print(f"dpfah's default on {clusters} k-means pseudo-classes (purity {purity:.3f}): "
              f"{evaluate(codes, codes, lh, lh, topks=(None,))['map@all']:.4f}", flush=True)
    return 0


def blocks(split_seed: int) -> int:
    from hashindex.backbones import _entry

    tapped = (8, 10, 12, 14)
    x, _, labels, held, fit_rows = validation_split(split_seed)
    spec = BackboneSpec("efficientnet-lite0", 64, blocks=tapped)
    widths = [_entry(spec.name).block_dims[b] for b in tapped]
    columns = dict(zip(tapped, np.split(np.arange(sum(widths)), np.cumsum(widths)[:-1])))
    source = hashindex.open_source("fashion-mnist")
    _, train, _ = hashindex.protocol_split(source, seed=0)
    pooled = hashindex.cached_features(source.subset(train), spec).features.astype(np.float32)
    lh = labels[held]
    pack = lambda h: np.packbits((h >= 0).numpy().astype(np.uint8), axis=1)  # noqa: E731
    for name in ("head", "14", "10+14", "12+14", "10+12+14", "8+10+12+14"):
        f = x if name == "head" else pooled[:, np.concatenate([columns[int(b)] for b in name.split("+")])]
        scores = {}
        for method in ("itq", "uhga"):
            head = create_method(method, 32).fit(f[fit_rows])
            with torch.no_grad():
                codes = pack(head(torch.from_numpy(f[held]).double() if method == "itq" else torch.from_numpy(f[held])))
            scores[method] = evaluate(codes, codes, lh, lh, topks=(None,))["map@all"]
        print(f"features {name}: float cosine {float_map(torch.from_numpy(f[held]), lh)}, "
              f"32-bit ITQ {scores['itq']:.4f}, UHGA default {scores['uhga']:.4f}", flush=True)
    return 0


UHGA_SETTINGS = {
    "default": {}, "20 epochs": {"epochs": 20},
    "neighbourhood k 5": {"neighbourhood": {"k": 5}}, "neighbourhood k 3": {"neighbourhood": {"k": 3}},
    "neighbourhood k 20": {"neighbourhood": {"k": 20}},
    "pairs weight 2": {"loss_weights": {"pairwise": 1.0, "balance": 0.1, "pairs": 2.0}},
    "Beta(3, 3)": {"similarity": {"name": "calibrated", "a": 3.0, "b": 3.0}},
    "Beta(10, 10)": {"similarity": {"name": "calibrated", "a": 10.0, "b": 10.0}},
}


def uhga_settings(split_seed: int) -> int:
    _, _, labels, held, fit_rows = validation_split(split_seed)
    source = hashindex.open_source("fashion-mnist")
    _, train, _ = hashindex.protocol_split(source, seed=0)
    spec = BackboneSpec("efficientnet-lite0", 64, blocks=(10, 12, 14))
    f = hashindex.cached_features(source.subset(train), spec).features.astype(np.float32)
    for name, settings in UHGA_SETTINGS.items():
        head = create_method("uhga", 32, **settings).fit(f[fit_rows])
        with torch.no_grad():
            codes = np.packbits((head(torch.from_numpy(f[held])) >= 0).numpy().astype(np.uint8), axis=1)
        score = evaluate(codes, codes, labels[held], labels[held], topks=(None,))["map@all"]
        print(f"uhga default, {name}: held-out among held-out {score:.4f}", flush=True)
    return 0


def uhga_views(split_seed: int) -> int:
    x, views, labels, held, fit_rows = validation_split(split_seed)
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

    x, views, labels, held, fit_rows = validation_split(split_seed, method_backbone("dpfah", BackboneSpec("efficientnet-lite0", 64)))
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


BLOCKS = BackboneSpec("efficientnet-lite0", 64, blocks=(10, 12, 14))


def held_map(encode, f: np.ndarray, labels, held) -> float:
    """32-bit mAP@all of the held-out rows among themselves, codes from ``encode(features)``."""
    with torch.no_grad():
        return codes_map(encode(torch.from_numpy(f[held])), labels[held])


def codes_map(relaxed: torch.Tensor, labels) -> float:
    """mAP@all of images ranked among themselves by the signs of their relaxed codes."""
    codes = np.packbits((relaxed >= 0).numpy().astype(np.uint8), axis=1)
    return round(evaluate(codes, codes, labels, labels, topks=(None,))["map@all"], 4)


def itq_map(transform, f: np.ndarray, labels, held, fit_rows) -> float:
    """:func:`held_map` of 32-bit ITQ fitted on ``transform`` of the training rows."""
    head = create_method("itq", 32).fit(transform(torch.from_numpy(f[fit_rows])).numpy())
    return held_map(lambda a: head(transform(a).double()), f, labels, held)


def whitening(xt: torch.Tensor, dims: int, reg: float):
    """PCA whitening fitted on ``xt``: the top ``dims`` components, each divided by
    ``sqrt(variance + reg · top variance)``."""
    mean = xt.mean(0)
    _, singular, basis = torch.linalg.svd((xt - mean).double(), full_matrices=False)
    variance = singular ** 2 / len(xt)
    w = basis[:dims].T / (variance[:dims] + reg * variance[0]).sqrt()
    return lambda a: ((a.double() - mean.double()) @ w).float()


def block_maps() -> dict[int, torch.Tensor]:
    """Unpooled outputs of blocks 7, 10, 12 and 14 of EfficientNet-Lite0 at 64 px for the protocol's
    training images (4 × 4 maps for blocks 7 and 10, 2 × 2 for 12 and 14)."""
    from hashindex.backbones import load_backbone

    source = hashindex.open_source("fashion-mnist")
    _, train, _ = hashindex.protocol_split(source, seed=0)
    pixels = source.subset(train).read(np.arange(len(train))).pixels
    backbone = load_backbone(BackboneSpec("efficientnet-lite0", 64))
    model = backbone.net.model
    maps: dict[int, list] = {7: [], 10: [], 12: [], 14: []}
    with torch.inference_mode():
        for start in range(0, len(pixels), 256):
            x = model._swish(model._bn0(model._conv_stem(backbone.preprocess(pixels[start:start + 256]))))
            for i, block in enumerate(model._blocks[:15]):
                x = block(x, drop_connect_rate=0)
                if i in maps:
                    maps[i].append(x.float())
    return {b: torch.cat(v) for b, v in maps.items()}


def fourth_pass(args) -> int:
    """--uhga-seeds, --whiten and --pooling on block features 10, 12, 14, both splits."""
    if args.pooling:
        maps = block_maps()
        mean = {b: m.mean((2, 3)) for b, m in maps.items()}
        grid = lambda b, g: F.adaptive_avg_pool2d(maps[b], g).flatten(1)  # noqa: E731
        poolings = {
            "mean of 10, 12, 14 (the default)": [mean[10], mean[12], mean[14]],
            "2x2 grid of 10, mean of 12, 14": [grid(10, 2), mean[12], mean[14]],
            "4x4 grid of 10, mean of 12, 14": [grid(10, 4), mean[12], mean[14]],
            "mean and max of 10, 12, 14": [mean[10], mean[12], mean[14]] + [maps[b].amax((2, 3)) for b in (10, 12, 14)],
            "mean of 7, 10, 12, 14": [mean[7], mean[10], mean[12], mean[14]],
        }
        poolings = {name: torch.cat(parts, 1).numpy() for name, parts in poolings.items()}
    for split_seed in (0, 1):
        f, views, labels, held, fit_rows = validation_split(split_seed, BLOCKS, views=args.uhga_seeds)
        xt, lh = torch.from_numpy(f[fit_rows]), labels[held]
        if args.uhga_seeds:
            for name, settings in {"default": {}, "neighbourhood k 5": {"neighbourhood": {"k": 5}}}.items():
                scores = [held_map(create_method("uhga", 32, seed=seed, **settings).fit(f[fit_rows]), f, labels, held)
                          for seed in (0, 1, 2)]
                print(f"split {split_seed}, uhga default, {name}, training seeds 0/1/2: {scores}, "
                      f"mean {np.mean(scores):.4f}", flush=True)
            for weight in (0.02, 0.1):
                head = create_method("uhga", 32, loss_weights={"views": weight}).fit(f[fit_rows], views=views[fit_rows])
                print(f"split {split_seed}, uhga default + views term {weight}: {held_map(head, f, labels, held)}",
                      flush=True)
        if args.whiten:
            nb = NeighbourhoodEmbedding().fit(xt)
            print(f"split {split_seed}, embedding of the blocks: float {float_map(nb.transform(torch.from_numpy(f[held])), lh)}, "
                  f"itq {itq_map(nb.transform, f, labels, held, fit_rows)}", flush=True)
            for dims, reg in ((64, 0.1), (128, 0.1), (128, 0.01), (256, 0.01)):
                white = whitening(xt, dims, reg)
                nb = NeighbourhoodEmbedding().fit(white(xt))
                embedded = lambda a, nb=nb, white=white: nb.transform(white(a))  # noqa: E731
                print(f"split {split_seed}, embedding of whitened blocks ({dims} d, reg {reg}): float "
                      f"{float_map(embedded(torch.from_numpy(f[held])), lh)}, "
                      f"itq {itq_map(embedded, f, labels, held, fit_rows)}", flush=True)
            white = whitening(xt, 128, 0.01)
            scores = [held_map(lambda a, h=create_method("uhga", 32, seed=seed).fit(white(xt).numpy()): h(white(a)),
                               f, labels, held) for seed in (0, 1)]
            print(f"split {split_seed}, uhga default on whitened blocks (128 d, reg 0.01), seeds 0/1: {scores}", flush=True)
        if args.pooling:
            for name, pooled in poolings.items():
                nb = NeighbourhoodEmbedding().fit(torch.from_numpy(pooled[fit_rows]))
                print(f"split {split_seed}, {name} ({pooled.shape[1]} d): "
                      f"float {float_map(torch.from_numpy(pooled[held]), lh)}, "
                      f"itq {itq_map(lambda a: a, pooled, labels, held, fit_rows):.4f}, "
                      f"itq on the embedding {itq_map(nb.transform, pooled, labels, held, fit_rows):.4f}", flush=True)
    return 0


def student(methods=("uhga",), seeds=(0, 1)) -> int:
    """--student: each method's frozen-feature head (its default profile, ``student`` off) against its
    student (the default student settings), both trained by ``train_encoder`` on the same 4,000 rows."""
    return default_variants(methods, seeds, {"head": {"student": False}, "student": {"student": True}})


def mirror_average(methods=("uhga",), seeds=(0, 1), bits: int = 32) -> int:
    """--mirror-average (issue 14's eleventh pass): each method's default with and without
    ``mirror_average`` (training on the mean of each training image's features and its mirror's),
    student included, both trained by ``train_encoder`` on the same 4,000 rows."""
    return default_variants(methods, seeds, {"without": {"mirror_average": False}, "with": {"mirror_average": True}},
                            bits)


def default_variants(methods, seeds, variants: dict[str, dict], bits: int = 32) -> int:
    """Each method's default profile with each of ``variants`` (params over it), trained by
    ``train_encoder`` on the 4,000 rows of both splits at each training seed; prints the held-out
    images' mAP among themselves (an encoder with a student encodes them from pixels)."""
    from hashindex.build import FeatureSet, method_backbone

    source = hashindex.open_source("fashion-mnist")
    _, train, _ = hashindex.protocol_split(source, seed=0)
    for method in methods:
        spec = method_backbone(method, BackboneSpec("efficientnet-lite0", 64))
        for split_seed in (0, 1):
            f, _, labels, held, fit_rows = validation_split(split_seed, spec, views=False)
            fit_set = FeatureSet(f[fit_rows], np.ones(len(fit_rows), bool), source.ids[train[fit_rows]],
                                 labels[fit_rows], "", 0.0, spec)
            held_pixels = source.read(train[held]).pixels
            for seed in seeds:
                scores = {}
                for name, params in variants.items():
                    encoder = hashindex.train_encoder(source.subset(train[fit_rows]), method, bits, features=fit_set,
                                                      params=params, seed=seed)
                    codes = encoder.encode_pixels(held_pixels) if encoder.finetuned else encoder.encode_features(f[held])
                    scores[name] = round(evaluate(codes, codes, labels[held], labels[held], topks=(None,))["map@all"], 4)
                    scores[f"{name} train s"] = round(encoder.training["fit_seconds"])
                print(f"{method}, {bits} bits, split {split_seed}, training seed {seed}: {scores}", flush=True)
    return 0


@torch.no_grad()
def relaxed(head, features: np.ndarray) -> torch.Tensor:
    """A trained head's relaxed codes of feature rows."""
    return head(torch.from_numpy(np.asarray(features)))


def distilled(targets, features, pixels, augment=None, seed: int = 0, spec=None, **settings):
    """A student of the training codes ``targets`` that tunes the backbone ``spec`` (default: blocks
    10, 12, 14): (its relaxed codes of images, its tuned backbone). Its settings are the student the
    sixth to tenth passes compared against, so that their figures reproduce: the shared student
    defaults with the blocks at lr 1e-4 (the shared default until the tenth pass), ``settings`` over them."""
    from hashindex.augment import Augment
    from hashindex.backbones import load_backbone
    from hashindex.methods.student import distil, student_params

    tuned = load_backbone(spec or BLOCKS, device="cpu")
    head = distil(targets, features, lambda rows: pixels[rows], tuned,
                  **student_params({"backbone_lr": 1e-4, **settings}), seed=seed,
                  augment=augment or Augment())
    return lambda images: relaxed(head, tuned.features(images)), tuned


def consensus(codes: list[torch.Tensor], bits: int = 32, seed: int = 0):
    """The ``bits``-bit code that keeps the Hamming geometry of several codes of the same rows: ITQ on
    their concatenated signs. Returns the consensus of those rows, and the function that merges other
    rows' codes (the same teachers, in the same order) the same way."""
    join = lambda parts: torch.cat([torch.sign(c) for c in parts], 1).double()  # noqa: E731
    itq = create_method("itq", bits, seed=seed).fit(join(codes).numpy())
    merge = lambda parts: relaxed(itq, join(parts))  # noqa: E731
    return merge(codes).float(), merge


def whitened_itq(xt: torch.Tensor, seed: int = 0):
    """IMH + ITQ on PCA-whitened features (128 d, reg 0.01; the fourth pass's best whitening): a
    function from feature rows to relaxed 32-bit codes, fitted on ``xt``."""
    white = whitening(xt, 128, 0.01)
    nb = NeighbourhoodEmbedding().fit(white(xt))
    itq = create_method("itq", 32, seed=seed).fit(nb.transform(white(xt)).numpy())
    return lambda a: relaxed(lambda t: itq(nb.transform(white(t)).double()).float(), a)


def objective_fit(codes: torch.Tensor, target, rows: int = 1000) -> float:
    """Mean |cos(b_i, b_j) − target_ij| over training pairs i != j of sign codes ``codes``: how well
    the binary codes keep the calibrated target they were trained on (the ``pairs`` term, unrelaxed)."""
    b = F.normalize(torch.sign(codes).float(), dim=1)
    n, every, total = len(b), torch.arange(len(b)), 0.0
    for start in range(0, n, rows):
        block = every[start:start + rows]
        gap = (b[block] @ b.T - target(block, every)).abs()
        gap[torch.arange(len(block)), block] = 0
        total += float(gap.sum())
    return total / (n * (n - 1))


def student_variants() -> int:
    """--student-variants: the default student against variants of it, distilled from the same head."""
    from hashindex.augment import Augment

    source = hashindex.open_source("fashion-mnist")
    _, train, _ = hashindex.protocol_split(source, seed=0)
    mild = Augment(crop_scale=(0.8, 1.0), max_shift=0.05, rotate=5.0)

    for split_seed in (0, 1):
        f, _, labels, held, fit = validation_split(split_seed, BLOCKS, views=False)
        fit_pixels, held_pixels = source.read(train[fit]).pixels, source.read(train[held]).pixels
        score = functools.partial(codes_map, labels=labels[held])  # held-out images among themselves

        scores = {}
        for name, params in {"teacher": {}, "teacher k=5": {"neighbourhood": {"k": 5}}}.items():
            teacher = create_method("uhga", 32, seed=0, **params).fit(f[fit])
            scores[name] = score(relaxed(teacher, f[held]))
            soft = relaxed(teacher, f[fit])
            student, tuned = distilled(soft >= 0, f[fit], fit_pixels)
            scores[f"student of {name}"] = score(student(held_pixels))
            if params:
                continue
            scores["student, codes averaged with the flipped image's"] = score(
                student(held_pixels) + student(held_pixels[:, :, ::-1].copy()))
            scores["student of soft codes"] = score(distilled((1 + soft) / 2, f[fit], fit_pixels)[0](held_pixels))
            scores["student, milder augmentation"] = score(distilled(soft >= 0, f[fit], fit_pixels, mild)[0](held_pixels))
            tuned_fit, tuned_held = tuned.features(fit_pixels), tuned.features(held_pixels)
            second = create_method("uhga", 32, seed=0).fit(tuned_fit)
            scores["second teacher on the student's tuned features"] = score(relaxed(second, tuned_held))
            scores["student of the second teacher"] = score(
                distilled(relaxed(second, tuned_fit) >= 0, f[fit], fit_pixels)[0](held_pixels))
        print(f"split {split_seed}, training seed 0: {scores}", flush=True)
    return 0


STUDENT_SETTINGS = {
    "the student defaults (blocks' lr 1e-4, 6 epochs, from block 8)": {},
    "blocks' lr 3e-4": {"backbone_lr": 3e-4},
    "blocks' lr 1e-3": {"backbone_lr": 1e-3},
    "blocks' lr 3e-3": {"backbone_lr": 3e-3},
    "blocks' lr 1e-3, 10 epochs": {"backbone_lr": 1e-3, "epochs": 10},
    "blocks' lr 1e-3, from block 5": {"backbone_lr": 1e-3, "first_block": 5},
}
# the tenth pass: does UHGA's chosen learning rate carry over to the other methods' students?
# (--backbone-lrs picks other rates for them)
OTHER_BACKBONE_LRS = (1e-4, 1e-3)


def student_settings(methods=("uhga",), seeds=(0, 1), backbone_lrs=OTHER_BACKBONE_LRS,
                     train_images: int | None = None) -> int:
    """--student-settings (issue 14's ninth and tenth passes, both splits): each method's head (its
    default, ``student`` off) distilled by students that differ from the shared defaults in one or
    two settings, every student from the same head: UHGA's over :data:`STUDENT_SETTINGS`, the other
    methods' at each of ``backbone_lrs``, the blocks' learning rates (LAGNH's student tunes blocks
    8–15 and the head's convolution, as its default does). ``train_images``: train head and students
    on a seeded sample of that many of the 4,000 rows (a small collection), scored on the same
    held-out rows."""
    from hashindex.build import method_backbone

    source = hashindex.open_source("fashion-mnist")
    _, train, _ = hashindex.protocol_split(source, seed=0)
    for method in methods:
        spec = method_backbone(method, BackboneSpec("efficientnet-lite0", 64))
        settings_tried = STUDENT_SETTINGS if method == "uhga" else {
            f"blocks' lr {lr:g}": {"backbone_lr": lr} for lr in backbone_lrs}
        for seed in seeds:
            for split_seed in (0, 1):
                f, _, labels, held, fit = validation_split(split_seed, spec, views=False)
                if train_images:
                    fit = np.sort(np.random.default_rng(split_seed).choice(fit, train_images, replace=False))
                fit_pixels, held_pixels = source.read(train[fit]).pixels, source.read(train[held]).pixels
                teacher = create_method(method, 32, seed=seed).fit(f[fit])
                bits = relaxed(teacher, f[fit]) >= 0
                scores = {"the head (teacher)": codes_map(relaxed(teacher, f[held]), labels[held])}
                for name, settings in settings_tried.items():
                    student, _ = distilled(bits, f[fit], fit_pixels, seed=seed, spec=spec, **settings)
                    scores[name] = codes_map(student(held_pixels), labels[held])
                    print(f"  {method}, split {split_seed}, training seed {seed}, {name}: {scores[name]}", flush=True)
                print(f"{method}, split {split_seed}, training seed {seed}: {scores}", flush=True)
    return 0


def teachers() -> int:
    """--teachers (issue 14's seventh pass, both splits): several teachers for one student. Five
    training seeds of UHGA's head with how well their sign codes keep their calibrated target; the
    consensus of seeds 0–2 (ITQ on their concatenated codes); student and teacher codes summed at
    encoding; IMH + ITQ on whitened blocks as a second, different teacher, its consensus with the
    head, and students of both."""
    source = hashindex.open_source("fashion-mnist")
    _, train, _ = hashindex.protocol_split(source, seed=0)
    for split_seed in (0, 1):
        f, _, labels, held, fit = validation_split(split_seed, BLOCKS, views=False)
        fit_pixels, held_pixels = source.read(train[fit]).pixels, source.read(train[held]).pixels
        score = functools.partial(codes_map, labels=labels[held])  # held-out images among themselves
        scores, fit_codes, held_codes = {}, [], []
        for seed in range(5):
            method = create_method("uhga", 32, seed=seed)
            head = method.fit(f[fit])
            fit_codes.append(relaxed(head, f[fit]))
            held_codes.append(relaxed(head, f[held]))
            scores[f"teacher seed {seed} (objective fit)"] = (
                score(held_codes[-1]), round(objective_fit(fit_codes[-1], method.similarity_), 4))
        _, merge = consensus(fit_codes[:3])
        scores["consensus of teacher seeds 0-2"] = score(merge(held_codes[:3]))
        student, _ = distilled(fit_codes[0] >= 0, f[fit], fit_pixels)
        scores["student of teacher seed 0"] = score(student(held_pixels))
        scores["student + teacher codes summed"] = score(student(held_pixels) + held_codes[0])
        second = whitened_itq(torch.from_numpy(f[fit]))
        scores["IMH + ITQ on whitened blocks"] = score(second(f[held]))
        agreed, merge = consensus([second(f[fit]), fit_codes[0]])
        scores["consensus of it and teacher seed 0"] = score(merge([second(f[held]), held_codes[0]]))
        scores["student of IMH + ITQ on whitened blocks"] = score(distilled(second(f[fit]) >= 0, f[fit], fit_pixels)[0](held_pixels))
        scores["student of that consensus"] = score(distilled(agreed >= 0, f[fit], fit_pixels)[0](held_pixels))
        print(f"split {split_seed}: {scores}", flush=True)
    return 0


def teachers_protocol(seeds=(0, 1, 2)) -> int:
    """--teachers-protocol: the consensus student of --teachers (UHGA's head and IMH + ITQ on whitened
    blocks) against the default student on bench/compare.py's protocol (32 bits, mAP@all of the 1,000
    queries against the 69,000-image database, both encoded from pixels by the student). The check
    of a choice made on validation: nothing here chooses a setting."""
    source = hashindex.open_source("fashion-mnist")
    queries, train, database = hashindex.protocol_split(source, seed=0)
    f = hashindex.cached_features(source.subset(train), BLOCKS).features.astype(np.float32)
    train_pixels, query_pixels = source.read(train).pixels, source.read(queries).pixels
    database_pixels = source.read(database).pixels

    def protocol_map(student) -> float:
        pack = lambda images: np.packbits((student(images) >= 0).numpy().astype(np.uint8), axis=1)  # noqa: E731
        return round(evaluate(pack(query_pixels), pack(database_pixels), source.labels[queries],
                              source.labels[database], topks=(None,))["map@all"], 4)

    for seed in seeds:
        head_codes = relaxed(create_method("uhga", 32, seed=seed).fit(f), f)
        agreed, _ = consensus([whitened_itq(torch.from_numpy(f), seed=seed)(f), head_codes], seed=seed)
        scores = {name: protocol_map(distilled(codes >= 0, f, train_pixels, seed=seed)[0])
                  for name, codes in {"default student": head_codes, "consensus student": agreed}.items()}
        print(f"seed {seed}: {scores}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
