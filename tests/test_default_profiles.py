"""Every unsupervised method's default profile learns codes better than ITQ on the same features.

Each trains its default profile as shipped on 1,000 real Fashion-MNIST training images' features,
through the network the profile names (UHGA, NRDH and UCSH: pooled outputs of backbone blocks 10, 12
and 14; LAGNH: the pooled head), and is scored on 200 held-out training images, never on protocol
queries, against ITQ fitted to the same features. This is the head each default trains on frozen
features; the student every unsupervised default then distils from it is tested in test_student.py.
Without the embedding or the calibrated pair fit the defaults fall to ITQ or below
(bench/results/compare_64px.md's ablation rows), so losing either, or breaking the encoder's
anchors, turns this red.
"""
import pytest

from conftest import held_out_map
from hashindex.methods import create_method
from hashindex.methods.deep import load_config

UNSUPERVISED = ["uhga", "nrdh", "lagnh", "ucsh"]
MARGIN = 0.015


@pytest.mark.parametrize("method", UNSUPERVISED)
def test_default_profile_beats_itq_by_a_margin(method, method_features):
    hasher = create_method(method, 32)
    assert hasher.profile == load_config(method)["default_profile"] != "paper"
    data = method_features(method)  # the network the default trains on (UHGA, NRDH, UCSH: feature blocks)
    itq_map = held_out_map(create_method("itq", 32).fit(data["train"]), data)  # ITQ on the same features
    score = held_out_map(hasher.fit(data["train"]), data)
    assert score > itq_map + MARGIN, f"{method} default profile: mAP {score:.3f}, ITQ {itq_map:.3f}"


@pytest.mark.parametrize("method", UNSUPERVISED + ["dpfah"])
def test_finetune_mode_trains_the_paper_profile_unless_told(method):
    from hashindex.methods import METHODS
    assert METHODS[method].finetune_profile() == "paper"
