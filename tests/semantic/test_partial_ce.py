"""The focal, class-weighted partial cross-entropy against hand-computed values and torch's CE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rsiseg.models.semantic.partial_ce import partial_cross_entropy

# One image, two classes, three pixels in a row:
#   pixel 0: logits (0, 0)     -> p = (1/2, 1/2)
#   pixel 1: logits (ln 3, 0)  -> p = (3/4, 1/4)
#   pixel 2: unlabelled (255)
LOGITS = torch.tensor([[[[0.0, math.log(3.0), 5.0]], [[0.0, 0.0, -5.0]]]])  # [1, 2, 1, 3]
LABELS = torch.tensor([[[0, 1, 255]]])  # [1, 1, 3]


def test_hand_computed_plain_and_focal():
    # gamma 0: CE_0 = ln 2 = 0.693147, CE_1 = -ln(1/4) = ln 4 = 1.386294; mean = 1.039721
    assert partial_cross_entropy(LOGITS, LABELS, None, 0.0, 255).item() == pytest.approx(1.039721, abs=1e-5)
    # gamma 2: (1 - 1/2)^2 ln 2 = 0.173287, (1 - 1/4)^2 ln 4 = 0.779791; mean = 0.476539
    assert partial_cross_entropy(LOGITS, LABELS, None, 2.0, 255).item() == pytest.approx(0.476539, abs=1e-5)


def test_hand_computed_class_weights():
    weight = torch.tensor([1.0, 3.0])
    # gamma 0: (1 * 0.693147 + 3 * 1.386294) / (1 + 3) = 1.213008
    assert partial_cross_entropy(LOGITS, LABELS, weight, 0.0, 255).item() == pytest.approx(1.213008, abs=1e-5)
    # gamma 2: (1 * 0.173287 + 3 * 0.779791) / 4 = 0.628165
    assert partial_cross_entropy(LOGITS, LABELS, weight, 2.0, 255).item() == pytest.approx(0.628165, abs=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_gamma_zero_equals_torch_cross_entropy(weighted):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=generator)
    labels = torch.randint(0, 4, (2, 5, 6), generator=generator)
    labels[torch.rand(2, 5, 6, generator=generator) < 0.6] = 255
    weight = torch.tensor([0.5, 1.0, 2.0, 0.0]) if weighted else None
    expected = F.cross_entropy(logits, labels, weight=weight, ignore_index=255)
    assert partial_cross_entropy(logits, labels, weight, 0.0, 255).item() == pytest.approx(expected.item(), rel=1e-5)


def test_all_ignored_is_zero_with_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = partial_cross_entropy(logits, torch.full((1, 4, 4), 255), torch.ones(3), 2.0, 255)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_zero_weight_classes_only_is_zero():
    logits = torch.randn(1, 2, 2, 2, requires_grad=True)
    loss = partial_cross_entropy(logits, torch.zeros(1, 2, 2, dtype=torch.int64), torch.tensor([0.0, 1.0]), 0.0, 255)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="expected logits"):
        partial_cross_entropy(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 4, dtype=torch.int64))
