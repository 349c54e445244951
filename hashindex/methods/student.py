"""The student: a method's trained codes distilled into the backbone's upper blocks and a fresh hash
layer, on augmented views of the training images. A stage any method's profile can add (``student``).

A head trained on frozen features (the teacher) encodes a new image through what those features
say about it, e.g. its nearest training anchors; it cannot learn what the frozen network missed.
The student fine-tunes the blocks from ``first_block`` on (to the last one the features come from),
with a hash layer ``d → hidden → k`` on the same features, to give every augmented view of a
training image its teacher's code (per-bit logistic loss against the teacher's bits). Blocks below
``first_block`` stay frozen, so their forward runs without gradients, and batch-norm statistics stay
the pretrained ones. Measured
on the validation split of the protocol's training images (bench/validation_probes.py
``--student``), the student's codes rank held-out images better than its teacher's.

The encoder then carries the fine-tuned backbone weights and the student's head (a plain
:class:`~hashindex.methods.common.MLPHead`): encoding stays per image, from pixels, with no anchors.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..augment import Augment
from .base import MethodError, switch_settings
from .common import MLPHead

# backbone_lr 1e-3: chosen on the validation split for UHGA's student (issue 14's ninth pass), and
# it gained for NRDH's too (tenth pass); UCSH's profile keeps 1e-4 (mixed there), LAGNH's takes 3e-4
# (at 1e-3 its pooled-head student collapsed when trained on 1,000 images)
DEFAULTS = {"epochs": 6, "first_block": 8, "lr": 1e-3, "backbone_lr": 1e-3, "batch_size": 64, "hidden": 1024}


def student_params(spec) -> dict | None:
    """A ``student`` config value as settings: None/False = off, True = :data:`DEFAULTS`, a dict =
    its keys over the defaults."""
    given = switch_settings("student", spec, tuple(DEFAULTS))
    if given is None:
        return None
    settings = {**DEFAULTS, **given}
    if int(settings["epochs"]) < 1 or int(settings["batch_size"]) < 2 or int(settings["first_block"]) < 0:
        raise MethodError(f"student: epochs >= 1, batch_size >= 2 and first_block >= 0 needed, got {spec}")
    return settings


def distil(teacher_bits: torch.Tensor, features: np.ndarray, images, backbone, *, epochs: int, first_block: int,
           lr: float, backbone_lr: float, batch_size: int, hidden: int, seed: int = 0,
           augment: Augment = Augment()) -> MLPHead:
    """Train ``backbone`` (in place, from ``first_block`` on) and a new head to give each training
    image's augmented views the teacher's code; returns the head, eval mode, on the CPU.

    teacher_bits
        ``[n, k]`` bool, the teacher's code of each training image (or floats in [0, 1]: the
        probability of each bit being 1, as soft targets).
    features
        ``[n, d]`` the frozen backbone's features of the same images: the head's input is
        standardised by their mean and deviation (folded into its first layer at the end).
    images
        Callable from row positions (0..n-1) to those images' decoded pixels.
    backbone
        An EfficientNet :class:`~hashindex.backbones.Backbone` (numbered blocks): with feature blocks,
        blocks ``first_block`` to the last pooled one train; on the pooled head, every block from
        ``first_block`` and the head's convolution.
    """
    n, bits = teacher_bits.shape
    if len(features) != n:
        raise MethodError(f"student: {len(features)} feature rows for {n} teacher codes")
    upper = backbone.block_parameters(int(first_block))
    device = backbone.device
    torch.manual_seed(seed)
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    mean, scale = x.mean(0).to(device), (x.std(0) + 1e-6).to(device)
    head = MLPHead([["linear", x.shape[1], int(hidden)], ["relu"], ["linear", int(hidden), bits], ["tanh"]]).to(device)
    logits_of = head.net[:-1]  # the loss takes the logits; the encoder's tanh keeps their signs
    for p in upper:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": head.parameters(), "lr": float(lr)},
                                  {"params": upper, "lr": float(backbone_lr)}])
    steps = int(epochs) * math.ceil(n / int(batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    target = teacher_bits.float().to(device)
    order = torch.Generator().manual_seed(seed)
    backbone.eval()  # batch-norm statistics stay the pretrained ones
    bar = tqdm(range(int(epochs)), desc=f"train student {bits} bits", file=sys.stderr, mininterval=1.0,
               dynamic_ncols=True)
    try:
        for epoch in bar:
            total = 0.0
            for rows in torch.randperm(n, generator=order).split(int(batch_size)):
                rows = rows.numpy()
                # one fresh view of each image per epoch, seeded by (seed, row, epoch)
                pixels = augment(images(rows), rows, view=epoch, seed=seed, size=backbone.spec.image_size)
                inputs = backbone.preprocess(pixels).contiguous(memory_format=torch.channels_last)
                loss = F.binary_cross_entropy_with_logits(logits_of((backbone(inputs).float() - mean) / scale),
                                                          target[torch.from_numpy(rows).to(device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(rows)
            bar.set_postfix(loss=f"{total / n:.4f}")
    finally:
        backbone.requires_grad_(False)
    with torch.no_grad():  # fold the standardisation into the first layer: a plain MLPHead remains
        first = head.net[0]
        first.bias -= first.weight @ (mean / scale)
        first.weight /= scale
    return head.eval().cpu()
