"""UHGA on real Fashion-MNIST backbone features: it learns, beats LSH, and its encoder is a clean artifact."""
import numpy as np
import pytest
import torch

from conftest import assert_head_round_trip, held_out_map
from hashindex.backbones import BackboneSpec
from hashindex.methods import create_method
from hashindex.methods.targets import Cosine
from hashindex.methods.uhga import distance_statistics

# small batches keep the per-pair × per-bit attention network cheap on CPU
QUICK = {"profile": "head-cpu", "batch_size": 32}


@pytest.fixture(scope="module")
def trained(fmnist_features):
    method = create_method("uhga", 32, epochs=4, **QUICK)
    head = method.fit(fmnist_features["train"])
    return method, head


def test_loss_goes_down_and_beats_lsh(trained, fmnist_features):
    method, head = trained
    losses = [epoch["loss"] for epoch in method.history_]
    assert losses[-1] < 0.5 * losses[0]
    lsh = create_method("lsh", 32).fit(fmnist_features["train"])
    assert held_out_map(head, fmnist_features) > held_out_map(lsh, fmnist_features) + 0.03


def test_encoder_round_trip_and_batch_independence(trained, fmnist_features):
    assert_head_round_trip("uhga", trained[1], fmnist_features["query"])


def test_similarity_thresholds_exclude_the_diagonal():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mean, low, high = distance_statistics(Cosine().fit(x), len(x), chunk_rows=2)
    d = 1 - np.array([[1, 0, 0.5 ** 0.5], [0, 1, 0.5 ** 0.5], [0.5 ** 0.5, 0.5 ** 0.5, 1]])
    off = d[~np.eye(3, dtype=bool)]
    assert mean == pytest.approx(off.mean()) and low == pytest.approx(off.min()) and high == pytest.approx(off.max())


@pytest.fixture(scope="module")
def small(fmnist_features):
    return fmnist_features["train"][:256]


def test_plain_loss_ablation_trains(small):
    # gradient_attention false: the paper's "Ours" row; true is covered by the module fixture
    method = create_method("uhga", 16, epochs=3, gradient_attention=False, **QUICK)
    method.fit(small)
    assert method.history_[-1]["loss"] < method.history_[0]["loss"]
    attended = create_method("uhga", 16, epochs=3, **QUICK)
    attended.fit(small)
    assert attended.history_[-1]["loss"] < attended.history_[0]["loss"]
    assert "pairwise_after_step" in attended.history_[0]


def test_same_seed_same_codes_and_switching_off_the_loss(small):
    def codes(**params):
        method = create_method("uhga", 16, epochs=1, seed=3, **{**QUICK, **params})
        head = method.fit(small)
        with torch.inference_mode():
            return method, head(torch.from_numpy(small)).numpy() >= 0

    first, codes_a = codes()
    _, codes_b = codes()
    np.testing.assert_array_equal(codes_a, codes_b)
    off, _ = codes(loss_weights={"pairwise": 0})
    assert off.history_[0]["loss"] == 0.0 != first.history_[0]["loss"]


def test_even_attention_gives_half_of_each_pair_gradient():
    # ξ = ½ on both codes of every pair (Eq. 16–17 with y = 0): the attended derivative is half the
    # plain one for the pair terms, while a code's pair with itself keeps its full derivative
    from hashindex.methods.uhga import GradientAttention
    torch.manual_seed(0)
    method = create_method("uhga", 8, profile="paper")
    method.attention_ = GradientAttention()
    for p in method.attention_.parameters():
        torch.nn.init.zeros_(p)
    h = torch.randn(6, 8).tanh().requires_grad_()
    weight = (torch.rand(6, 6) > 0.3).float()
    weight = torch.maximum(weight, weight.T)
    target = torch.sign(torch.randn(6, 6))
    target = torch.triu(target) + torch.triu(target, 1).T
    plain, = torch.autograd.grad(method.pairwise_loss(h, weight, target), h)
    n, k = h.shape
    self_pair = 4 / (n * n * k) * torch.diagonal(weight * (h @ h.T / k - target))[:, None] * h
    attended = method.attended_code_gradient(h.detach(), weight, target)
    torch.testing.assert_close(attended - self_pair, 0.5 * (plain - self_pair))


# -- Algorithm 1: the virtual step is the optimizer's step ------------------------------------------
def _ready(data, **params):
    """A method set up on ``data`` (head, optimizer, φ at their initial state) without training."""
    method = create_method("uhga", 16, seed=5, **{"profile": "paper", "batch_size": 32, **params, "epochs": 0})
    method.fit(data)
    return method


def _theta(method):
    return torch.cat([p.detach().flatten() for p in method.head_.parameters()])


def test_attention_on_and_off_move_theta_differently(small):
    # same seed, same state, same batch, one step of plain SGD (the paper profile)
    batch = torch.arange(32)
    moves = {}
    for attention in (True, False):
        method = _ready(small[:32], gradient_attention=attention)
        start = _theta(method)
        method.train_step(batch, method.reference_[batch], None)
        moves[attention] = _theta(method) - start
    assert moves[False].norm() > 0 and moves[True].norm() > 0
    assert (moves[True] - moves[False]).norm() > 0.1 * moves[False].norm()


def test_a_meta_step_changes_phi(small):
    method = _ready(small[:32])
    before = [p.detach().clone() for p in method.attention_.parameters()]
    batch = torch.arange(32)
    out = method.train_step(batch, method.reference_[batch], None)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.attention_.parameters())
    assert any(p.grad.abs().max() > 0 for p in method.attention_.parameters())
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, method.attention_.parameters())]
    assert all(changed)
    assert out["pairwise_after_step"] < out["pairwise"]


def test_phi_has_two_hidden_layers_of_100(small):
    from hashindex.methods.uhga import GradientAttention
    method = _ready(small[:32])
    assert isinstance(method.attention_, GradientAttention)
    linear = [m for m in method.attention_.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(3, 100), (100, 100), (100, 1)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in method.attention_.modules()) == 2


LOOKAHEAD_CASES = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}),
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("kind, options", LOOKAHEAD_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_lookahead_is_the_step_torch_takes(kind, options):
    from hashindex.methods.uhga import optimizer_lookahead
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    # two param groups, the second at a tenth of the rate (as the backbone's in finetune mode)
    optimizer = kind([{"params": params[:1]}, {"params": params[1:], "lr": options["lr"] / 10}], **options)
    for _ in range(4):  # later steps read momentum buffers, moments and the step count
        grads = [torch.randn_like(p) for p in params]
        grads[0][0] = 0.0  # a zero gradient: Adam's √v at 0 on the first step must not give NaN
        leaves = [g.clone().requires_grad_() for g in grads]
        virtual = optimizer_lookahead(optimizer, params, leaves)
        assert all(v.grad_fn is not None for v in virtual)
        derivative = torch.autograd.grad(sum((v ** 3).sum() for v in virtual), leaves)
        assert all(torch.isfinite(d).all() for d in derivative)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        for p, v in zip(params, virtual):
            torch.testing.assert_close(p.detach(), v.detach(), rtol=0, atol=1e-6)


def test_lookahead_refuses_other_optimizers():
    from hashindex.methods import MethodError
    from hashindex.methods.uhga import optimizer_lookahead
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(MethodError, match="RMSprop"):
        optimizer_lookahead(torch.optim.RMSprop([p]), [p], [torch.ones(3)])
    with pytest.raises(MethodError, match="optimizer must be 'sgd' or 'adam'"):
        create_method("uhga", 16, profile="paper", optimizer="rmsprop", epochs=0).fit(np.eye(4, dtype=np.float32))


def _record_steps(monkeypatch, method):
    """Wrap the virtual step and the train step: after each real step, how far θ lies from θ⁺, how
    far θ⁺ is from θ before, and ``l(θ⁺)`` against the loss of the network as it now is."""
    from hashindex.methods import uhga
    lookahead = uhga.optimizer_lookahead
    virtual_steps, checks = [], []

    def recording(optimizer, params, grads):
        virtual = lookahead(optimizer, params, grads)
        virtual_steps.append((list(params), [p.detach().clone() for p in params],
                              [v.detach().clone() for v in virtual]))
        return virtual

    monkeypatch.setattr(uhga, "optimizer_lookahead", recording)
    train_step = method.train_step

    def checked(idx, x, y):
        out = train_step(idx, x, y)
        params, before, virtual = virtual_steps[-1]
        with torch.no_grad():
            h = method.head_(method.batch_features(idx))
            loss_now = float(method.pairwise_loss(h, *method.pair_targets(idx)))
        checks.append({"params": len(params),
                       "error": max(float((p.detach() - v).abs().max()) for p, v in zip(params, virtual)),
                       "moved": min(float((v - b).abs().max()) for b, v in zip(before, virtual)),
                       "moving": sum(not torch.equal(v, b) for b, v in zip(before, virtual)),
                       "after": (out["pairwise_after_step"], loss_now)})
        return out

    method.train_step = checked
    return checks


@pytest.mark.parametrize("params", [
    {"profile": "paper", "momentum": 0.9, "weight_decay": 1e-4},
    {"profile": "paper"},
    {"profile": "head-cpu", "weight_decay": 1e-4},
], ids=["sgd-momentum", "sgd", "adam"])
def test_real_step_lands_on_the_virtual_step(small, monkeypatch, params):
    # a narrower hash MLP and batches of 16 keep the 8 steps quick; the mechanism is the same
    method = create_method("uhga", 16, epochs=2, batch_size=16, hidden=128, **params)
    checks = _record_steps(monkeypatch, method)
    method.fit(small[:64])
    assert len(checks) == 8  # 4 batches × 2 epochs: Adam's moments and step count are well under way
    if params["profile"] == "head-cpu":
        assert int(method.optimizer_.state[method.head_.net[0].weight]["step"]) == 8
    for check in checks:
        assert check["moved"] > 0  # every parameter tensor takes a step
        assert check["error"] < 1e-6
        after, now = check["after"]
        assert after == pytest.approx(now, rel=1e-5, abs=1e-7)


def test_finetune_lookahead_covers_the_backbone(fmnist_features, monkeypatch):
    from hashindex.backbones import load_backbone
    backbone = load_backbone(BackboneSpec("efficientnet-lite0", 32), device="cpu")
    pixels = fmnist_features["pixels"][:16]
    features = backbone.features(pixels)
    method = create_method("uhga", 16, epochs=1, batch_size=8, hidden=128, profile="head-cpu")
    checks = _record_steps(monkeypatch, method)
    method.fit(features, images=lambda rows: pixels[rows], backbone=backbone)
    head_params = len(list(method.head_.parameters()))
    assert len(checks) == 2
    for check in checks:
        assert check["params"] > head_params + 10  # the backbone's tensors are in θ⁺ …
        assert check["moving"] > head_params + 10  # … and take a step there
        assert check["error"] < 1e-6
        # l(θ⁺) is the loss of the whole network after the real step: backbone and hash layers
        after, now = check["after"]
        assert after == pytest.approx(now, rel=1e-4, abs=1e-7)
