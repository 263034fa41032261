"""The frozen encoder's embeddings on disk: found again by content, never read under other weights, the same
numbers cold or warm, and never written for the strong views."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rsiseg.config import ConfigError, config_from_dict
from rsiseg.models.registry import build_model
from tests.models.test_pointsam import SIZE, batch, tiny_sam


def counted(model: torch.nn.Module) -> list[int]:
    """Counts the images the model's image encoder encodes."""
    seen: list[int] = []
    model.sam.image_encoder.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    return seen


def test_embeddings_are_read_again_by_content(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_sam(mode="supervised", embedding_cache=str(tmp_path / "cache"))).eval()
    seen = counted(model)
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, 80)]
    with torch.no_grad():
        cold = model.encode(images, cache=True).embeddings
        warm = model.encode(images[::-1], cache=True).embeddings
        plain = model.encode(images).embeddings
    assert sum(seen) == 2 + 2 and model.cache.hits == 2 and model.cache.misses == 2  # the plain call encodes
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert torch.equal(cold, warm.flip(0)) and torch.equal(cold, plain.half().float())

    with torch.no_grad():
        model.encode([images[0].flip(-1)], cache=True)  # another view: another entry
        state = model.state_dict()
        state["sam.image_encoder.neck.0.weight"] = state["sam.image_encoder.neck.0.weight"] * 2
        model.load_state_dict(state)  # other weights: nothing of the old encoder is read
        model.encode(images, cache=True)
    assert model.cache.misses == 2 + 1 + 2 and len(list((tmp_path / "cache").glob("*.pt"))) == 5


@pytest.mark.parametrize("mode", ["supervised", "self_training"])
def test_training_caches_the_views_that_recur(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_sam(mode=mode, embedding_cache=str(tmp_path / "cache"))).train()
    seen = counted(model)
    images, targets = batch()
    for _ in range(2):
        losses = model(images, targets)
        sum(losses.values()).backward()
    # supervised: the plain images, encoded once; self-training: the teacher's plain views once, and the
    # student's strong views (random noise, never seen again) every step, not cached
    expected = 2 if mode == "supervised" else 2 + 2 * 2
    assert sum(seen) == expected and model.cache.hits == 2
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_a_trained_encoder_is_refused(tmp_path: Path) -> None:
    raw = {"task": "prompted", "model": {"name": "pointsam_tiny", "num_classes": 1,
                                         "sam": {"trainable": "lora", "embedding_cache": str(tmp_path)}}}
    with pytest.raises(ConfigError, match="'model.sam.embedding_cache' caches a frozen encoder"):
        config_from_dict(raw)
