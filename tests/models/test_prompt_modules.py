"""The PROMPT prompt modules (LPM, GPM) and the learnable Fourier filter, on tiny CPU tensors."""

from __future__ import annotations

import pytest
import torch

from rsiseg.models.layers.fourier import FourierFilter
from rsiseg.models.prompt.gpm import GlobalToLocalPromptModule
from rsiseg.models.prompt.lpm import LocalPromptModule
from rsiseg.models.prompt.tokens import crop_boxes

DIM = 16


def random_boxes(count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, 4]`` valid xyxy boxes inside a ``height x width`` image."""
    xy = torch.rand(count, 2, generator=generator) * torch.tensor([width - 8.0, height - 8.0])
    wh = 4 + torch.rand(count, 2, generator=generator) * 4
    return torch.cat([xy, xy + wh], dim=1)


def tiny_gpm(bands: int) -> GlobalToLocalPromptModule:
    return GlobalToLocalPromptModule(bands, dim=DIM, global_size=32, global_patch=8, heads=2, blocks=2)


def build(kind: str, bands: int) -> torch.nn.Module:
    return LocalPromptModule(bands, dim=DIM) if kind == "lpm" else tiny_gpm(bands)


def test_fourier_filter_near_identity_at_init_and_exact_with_unit_weight() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 9)
    filt = FourierFilter(3, 12, 9)
    assert filt.weight.shape == (3, 12, 9 // 2 + 1, 2)
    out = filt(x)
    assert out.shape == x.shape and out.dtype == x.dtype and not out.is_complex()
    assert (out - x).abs().mean() < 0.1 * x.abs().mean()
    with torch.no_grad():
        filt.weight.zero_()
        filt.weight[..., 0] = 1.0
    torch.testing.assert_close(filt(x), x, atol=1e-5, rtol=1e-5)


def test_fourier_filter_keeps_dtype_and_rejects_other_sizes() -> None:
    filt = FourierFilter(2, 8, 8)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    assert filt(x).dtype == torch.float64
    with pytest.raises(ValueError, match="8x8"):
        filt(torch.randn(1, 2, 8, 10))


def test_crop_boxes_constant_region_order_and_linear_ramp() -> None:
    images = torch.zeros(2, 1, 32, 32)
    images[0, :, 4:28, 4:28] = 5.0
    images[1] = 2.0
    boxes = [torch.tensor([[8.0, 8.0, 24.0, 24.0]]), torch.tensor([[0.0, 0.0, 32.0, 32.0], [3.0, 5.0, 9.0, 20.0]])]
    crops = crop_boxes(images, boxes, 28)
    assert crops.shape == (3, 1, 28, 28)
    torch.testing.assert_close(crops[0], torch.full((1, 28, 28), 5.0))
    torch.testing.assert_close(crops[1:], torch.full((2, 1, 28, 28), 2.0))
    # A ramp equal to each pixel's centre x: the crop samples it at the centres of its own cells.
    ramp = (torch.arange(32.0) + 0.5).expand(1, 1, 32, 32)
    crop = crop_boxes(ramp, [torch.tensor([[4.0, 4.0, 18.0, 25.0]])], 7)[0, 0]
    expected = 4.0 + (torch.arange(7.0) + 0.5) * 14.0 / 7
    torch.testing.assert_close(crop, expected.expand(7, 7))


@pytest.mark.parametrize("kind", ["lpm", "gpm"])
@pytest.mark.parametrize("bands", [3, 4])
def test_output_shapes(kind: str, bands: int) -> None:
    gen = torch.Generator().manual_seed(1)
    module = build(kind, bands)
    assert module.grid == 7
    tokens = module.grid**2
    images = torch.rand(2, bands, 40, 48, generator=gen)
    for counts in [(0, 0), (1, 0), (0, 1), (3, 5)]:
        boxes = [random_boxes(n, 40, 48, gen) for n in counts]
        assert module(images, boxes).shape == (sum(counts), tokens, DIM)


def test_default_grids() -> None:
    assert LocalPromptModule(3).grid == 7
    gpm = GlobalToLocalPromptModule(3)
    assert (gpm.grid, gpm.global_grid) == (7, 14)
    assert gpm.encode_global(torch.rand(1, 3, 50, 70)).shape == (1, 196, 64)


@pytest.mark.parametrize("kind", ["lpm", "gpm"])
def test_gradient_reaches_every_parameter(kind: str) -> None:
    gen = torch.Generator().manual_seed(2)
    module = build(kind, 4)
    images = torch.rand(2, 4, 40, 48, generator=gen)
    out = module(images, [random_boxes(2, 40, 48, gen), random_boxes(3, 40, 48, gen)])
    # A random projection, not out.sum(): the sum of a LayerNorm output has no gradient before the norm.
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_gpm_boxes_see_only_their_own_image_global_tokens() -> None:
    gen = torch.Generator().manual_seed(3)
    gpm = tiny_gpm(3)
    images = torch.rand(2, 3, 40, 48, generator=gen)
    boxes = [random_boxes(2, 40, 48, gen), random_boxes(3, 40, 48, gen)]
    with torch.no_grad():
        global_tokens = gpm.encode_global(images)
        before = gpm(images, boxes, global_tokens)
        perturbed = global_tokens.clone()
        perturbed[1] += torch.randn(perturbed[1].shape, generator=gen)
        after = gpm(images, boxes, perturbed)
    torch.testing.assert_close(after[:2], before[:2])
    assert not torch.allclose(after[2:], before[2:])


def test_gpm_precomputed_global_tokens_match() -> None:
    gen = torch.Generator().manual_seed(4)
    gpm = tiny_gpm(4)
    images = torch.rand(2, 4, 40, 48, generator=gen)
    boxes = [random_boxes(1, 40, 48, gen), random_boxes(2, 40, 48, gen)]
    with torch.no_grad():
        torch.testing.assert_close(gpm(images, boxes, gpm.encode_global(images)), gpm(images, boxes))


@pytest.mark.parametrize("kind", ["lpm", "gpm"])
def test_non_overlapping_patches_are_rejected(kind: str) -> None:
    cls = LocalPromptModule if kind == "lpm" else GlobalToLocalPromptModule
    with pytest.raises(ValueError, match="model.prompt.patch_kernel"):
        cls(3, patch_kernel=4, patch_stride=4)


def test_gpm_rejects_bad_heads_and_global_patch() -> None:
    with pytest.raises(ValueError, match="model.prompt.heads"):
        GlobalToLocalPromptModule(3, dim=30, heads=4)
    with pytest.raises(ValueError, match="model.prompt.global_patch"):
        GlobalToLocalPromptModule(3, global_size=100, global_patch=16)
