"""Every method's `paper` profile, as shipped, learns codes clearly better than random hyperplanes.

Each trains its paper settings (only the schedule shortened) on 1,000 real Fashion-MNIST training
features and is scored on 200 held-out images. A defect in a method's own mechanism (a graph trained
for one operator and applied with another, a loss that never reaches the codes) turns this red:
the margin over LSH is what a working method clears with room to spare here.
"""
import pytest

from conftest import held_out_map
from hashindex.methods import create_method

# the schedule only: epochs (and NRDH's stage-1 epochs) cut to fit the suite's budget
SHORT = {
    "uhga": {"epochs": 10},  # SGD lr 0.1 on a fresh head: clearly above LSH from about 10 epochs
    "dpfah": {"epochs": 10},
    "nrdh": {"epochs": 5, "node_epochs": 5},
    "lagnh": {"epochs": 20},
    "ucsh": {"epochs": 15},  # at the paper's lr 1e-5 a fresh layer needs ~15 epochs to leave LSH behind
}
MARGIN = 0.05


@pytest.fixture(scope="module")
def lsh_map(fmnist_features):
    return held_out_map(create_method("lsh", 32).fit(fmnist_features["train"]), fmnist_features)


@pytest.mark.parametrize("method", sorted(SHORT))
def test_paper_profile_beats_lsh_by_a_margin(method, fmnist_features, lsh_map):
    hasher = create_method(method, 32, profile="paper", **SHORT[method])
    labels = fmnist_features["train_labels"] if method == "dpfah" else None  # DPFAH is supervised
    head = hasher.fit(fmnist_features["train"], labels)
    score = held_out_map(head, fmnist_features)
    assert score > lsh_map + MARGIN, f"{method} paper profile: mAP {score:.3f}, LSH {lsh_map:.3f}"
