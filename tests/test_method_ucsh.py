"""UCSH on real Fashion-MNIST backbone features: it learns, beats LSH, and its encoder is a clean artifact."""
import numpy as np
import pytest
import torch

from conftest import assert_head_round_trip, held_out_map
from hashindex.methods import MethodError, create_method
from hashindex.methods.ucsh import UCSH, hadamard, hadamard_targets, kmeans, left_half_gaussian_threshold

QUICK = {"profile": "head-cpu"}


@pytest.fixture(scope="module")
def trained(fmnist_features):
    method = create_method("ucsh", 32, epochs=8, **QUICK)
    head = method.fit(fmnist_features["train"])
    return method, head


def test_loss_goes_down_and_beats_lsh(trained, fmnist_features):
    method, head = trained
    losses = [epoch["loss"] for epoch in method.history_]
    assert losses[-1] < losses[0]
    lsh = create_method("lsh", 32).fit(fmnist_features["train"])
    assert held_out_map(head, fmnist_features) > held_out_map(lsh, fmnist_features) + 0.03


def test_encoder_round_trip_and_batch_independence(trained, fmnist_features):
    assert_head_round_trip("ucsh", trained[1], fmnist_features["query"])


def test_hadamard_targets_are_orthogonal_columns():
    h = hadamard(16)
    assert torch.equal(h @ h.T, 16 * torch.eye(16))
    targets = hadamard_targets(10, 32)  # order 32 ≥ max(10, 32)
    assert targets.shape == (10, 32)
    assert torch.equal(targets @ targets.T, 32 * torch.eye(10))
    assert torch.equal(hadamard_targets(10, 8), hadamard(16)[:8, :10].T)


def test_kmeans_and_threshold_helpers():
    rng = np.random.default_rng(0)
    blobs = torch.from_numpy(np.concatenate([rng.normal(c, 0.1, (50, 2)) for c in (0.0, 5.0)])).float()
    _, assignment = kmeans(blobs, 2, iterations=10, generator=torch.Generator().manual_seed(0))
    assert len(set(assignment[:50].tolist())) == 1 and len(set(assignment[50:].tolist())) == 1
    assert assignment[0] != assignment[50]
    distances = torch.from_numpy(np.abs(rng.normal(0.0, 1.0, 20000))) + 0.5
    # peak near 0.5, left side is empty: the threshold sits at the peak
    assert left_half_gaussian_threshold(distances) == pytest.approx(0.5, abs=0.1)


@pytest.fixture(scope="module")
def small(fmnist_features):
    return fmnist_features["train"][:300]


def test_same_seed_same_codes_and_each_term_switches_off(small):
    def run(**params):
        method = create_method("ucsh", 16, epochs=1, seed=5, **{**QUICK, **params})
        head = method.fit(small)
        with torch.inference_mode():
            return method, head(torch.from_numpy(small)).numpy() >= 0

    full, codes_a = run()
    _, codes_b = run()
    np.testing.assert_array_equal(codes_a, codes_b)
    for term in UCSH.loss_names:
        off, _ = run(loss_weights={term: 0})
        assert off.history_[0]["loss"] != full.history_[0]["loss"], term


# -- issue #13: the learning-rate schedule, the cluster count, the threshold and the targets -------
class LinearBackbone(torch.nn.Module):
    """Stands in for a Backbone in finetune mode: its 'pixels' are the pretrained features and its
    ``net`` one linear layer (initialised to the identity), so fit takes the finetune path of the
    shared skeleton, backbone parameter group included, in milliseconds."""

    def __init__(self, d):
        super().__init__()
        self.net = torch.nn.Linear(d, d)
        with torch.no_grad():
            self.net.weight.copy_(torch.eye(d))
            self.net.bias.zero_()

    def preprocess(self, pixels):
        return torch.as_tensor(pixels)

    def forward(self, x):
        return self.net(x)


class RecordingUCSH(UCSH):
    """UCSH that notes each parameter group's learning rate as an epoch starts (after the decay)."""

    def on_epoch_start(self, epoch, x, y):
        super().on_epoch_start(epoch, x, y)
        self.lrs_ = getattr(self, "lrs_", []) + [[group["lr"] for group in self.optimizer_.param_groups]]


def test_step_decay_keeps_the_backbone_factor_and_fires_at_the_configured_epoch(fmnist_features):
    x = np.ascontiguousarray(fmnist_features["train"][:96, :64])  # small, so the run takes a second
    lr, factor, decay = 1e-3, 0.25, 0.1
    method = RecordingUCSH(16, profile="paper", epochs=5, lr=lr, backbone_lr_factor=factor,
                           lr_decay_every=2, lr_decay=decay)
    method.fit(x, images=lambda rows: x[rows], backbone=LinearBackbone(x.shape[1]))
    assert method.finetuning  # the skeleton's finetune path: head group + backbone group
    assert len(method.optimizer_.param_groups) == 2
    # epochs 0-1 at the initial rates, 2-3 decayed once, 4 twice; the backbone at factor x the head
    # every epoch
    for epoch, (head_lr, backbone_lr) in enumerate(method.lrs_):
        step = decay ** (epoch // 2)
        assert head_lr == pytest.approx(lr * step, rel=1e-9), epoch
        assert backbone_lr == pytest.approx(lr * factor * step, rel=1e-9), epoch
        assert backbone_lr / head_lr == pytest.approx(factor, rel=1e-9), epoch
    assert method.lrs_[1][0] == method.lrs_[0][0] and method.lrs_[2][0] < method.lrs_[1][0]
    # head mode: one group, the same steps
    head_only = RecordingUCSH(16, profile="paper", epochs=3, lr=lr, lr_decay_every=1, lr_decay=0.5)
    head_only.fit(x)
    assert [lrs for (lrs,) in head_only.lrs_] == pytest.approx([lr, lr * 0.5, lr * 0.25], rel=1e-9)
    # lr_decay_every 0: no decay
    flat = RecordingUCSH(16, profile="head-cpu", epochs=2)
    flat.fit(x)
    assert flat.lrs_ == [[flat.lr], [flat.lr]]


def _multi_hot(labels, rng):
    """A multi-label matrix (its class plus a random second label) made from single labels."""
    y = np.zeros((len(labels), 12), np.uint8)
    y[np.arange(len(labels)), labels] = 1
    y[np.arange(len(labels)), rng.integers(0, 12, len(labels))] = 1
    return y


def test_cluster_count_follows_the_label_kind_and_labels_never_supervise(fmnist_features):
    x, labels = fmnist_features["train"][:300], fmnist_features["train_labels"][:300]
    rng = np.random.default_rng(0)

    def run(y=None, **params):
        method = create_method("ucsh", 32, epochs=1, seed=3, **{**QUICK, **params})
        head = method.fit(x, y)
        with torch.inference_mode():
            return method, head(torch.from_numpy(x)).numpy()  # real outputs: any influence shows

    assert create_method("ucsh", 32).config["n_clusters"] == "auto"
    none, codes_none = run()
    single, codes_single = run(labels)
    multi, codes_multi = run(_multi_hot(labels, rng))
    other_multi, codes_other_multi = run(_multi_hot(labels[::-1].copy(), rng))
    for method, n in ((none, 10), (single, 10), (multi, 30), (other_multi, 30)):
        assert method.n_clusters_ == n and method.targets_.shape == (n, 32)
        assert method.centers_.shape[0] == n and int(method.cluster_of_.max()) < n
        assert method.params()["n_clusters"] == "auto" and method.params()["n_clusters_used"] == n
    assert len(set(multi.cluster_of_.tolist())) > 10  # K-means really ran with 30 centroids
    # the labels' values never reach the loss: same kind of labels, bit-identical training
    np.testing.assert_array_equal(codes_single, codes_none)
    np.testing.assert_array_equal(codes_other_multi, codes_multi)
    assert not np.array_equal(codes_multi >= 0, codes_none >= 0)  # 30 targets instead of 10 change the codes
    # an integer overrides, whatever the labels
    fixed, _ = run(_multi_hot(labels, rng), n_clusters=7)
    assert fixed.n_clusters_ == 7 and fixed.targets_.shape == (7, 32)
    with pytest.raises(MethodError, match="n_clusters must be a positive integer or 'auto'"):
        run(n_clusters="many")


def test_half_gaussian_threshold_falls_between_the_modes():
    # SSDH's picture: a large mode of dissimilar pairs (the histogram's peak) and, left of it, a
    # small mode of similar pairs
    rng = np.random.default_rng(0)
    similar = rng.normal(0.3, 0.05, 2000)
    dissimilar = rng.normal(1.0, 0.05, 18000)
    threshold = left_half_gaussian_threshold(torch.from_numpy(np.concatenate([similar, dissimilar])))
    # peak m1 ≈ 1.0; σ1² = the mean squared distance to it of everything left of it:
    # (0.45·0.05² + 0.1·(0.7² + 0.05²)) / 0.55 → σ1 ≈ 0.30, d_t = m1 − 2σ1 ≈ 0.39
    left = np.concatenate([similar, dissimilar[dissimilar < 1.0]])
    expected = 1.0 - 2.0 * np.sqrt(((left - 1.0) ** 2).mean())
    assert threshold == pytest.approx(expected, abs=0.04)  # the peak is a histogram bin's centre
    assert 0.3 < threshold < 1.0
    assert (similar < threshold).mean() > 0.9  # the similar pairs count as similar…
    assert (dissimilar < threshold).mean() < 0.001  # …the dissimilar ones do not


def test_half_gaussian_threshold_on_real_distances_picks_mostly_same_class_pairs(fmnist_features):
    x = torch.from_numpy(fmnist_features["train"])
    labels = fmnist_features["train_labels"]
    d = 1.0 - torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    off = ~torch.eye(len(x), dtype=torch.bool)
    threshold = left_half_gaussian_threshold(d[off])
    below = ((d < threshold) & off).numpy()
    same = labels[:, None] == labels[None, :]
    assert 0.001 < below[off.numpy()].mean() < 0.2  # a minority of pairs, not none
    assert same[below].mean() > 3 * same[off.numpy()].mean()  # ~0.57 against a base rate of 0.10


@pytest.mark.parametrize("n_clusters, bits, order", [(10, 16, 16), (10, 32, 32), (10, 64, 64), (30, 32, 32)])
def test_hadamard_targets_are_columns_of_a_hadamard_matrix_of_the_right_order(n_clusters, bits, order):
    targets = hadamard_targets(n_clusters, bits)  # order 2^m ≥ max(N, k)
    h = hadamard(order)
    assert torch.equal(h @ h.T, order * torch.eye(order))  # a Hadamard matrix
    assert targets.shape == (n_clusters, bits)
    assert set(targets.unique().tolist()) == {-1.0, 1.0}
    for c in range(n_clusters):
        assert torch.equal(targets[c], h[:bits, c])  # the first k entries of column c
    assert torch.equal(targets @ targets.T, bits * torch.eye(n_clusters))  # mutually orthogonal


def test_cluster_loss_pulls_each_kmeans_cluster_to_its_own_hadamard_column(fmnist_features):
    x = fmnist_features["train"][:300]
    # the cluster term alone: codes must move to their cluster's target
    method = create_method("ucsh", 32, epochs=6, lr=1e-3, **QUICK,
                           loss_weights={"pairwise": 0, "reconstruction": 0, "kl": 0, "separate": 0})
    head = method.fit(x)
    assert method.n_clusters_ == 10 and torch.equal(method.targets_, hadamard_targets(10, 32))
    with torch.inference_mode():
        bits = torch.where(head(torch.from_numpy(x)) >= 0, 1.0, -1.0)
    assignment = method.cluster_of_
    assert len(set(assignment.tolist())) >= 5
    agreement = (bits == method.targets_[assignment]).float().mean()
    assert agreement > 0.93, float(agreement)  # 0.5 for codes unrelated to their cluster's target
    # each cluster's mean code lies along its own column, nearly orthogonal to the other columns
    clusters = assignment.unique()
    means = torch.stack([bits[assignment == c].mean(0) for c in clusters])
    overlap = means @ method.targets_[clusters].T / 32
    assert torch.equal(overlap.argmax(1), torch.arange(len(clusters)))
    assert overlap.diagonal().mean() > 0.85
    off = overlap[~torch.eye(len(clusters), dtype=torch.bool)]
    assert off.abs().mean() < 0.1
