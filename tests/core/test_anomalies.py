import numpy as np
import pytest
import torch

from core.anomalies import OUTLIER_KINDS, foreign_patch_interpolation, fpi_box, mood_outlier


def brain_like(shape, seed=0):
    """A smooth non-constant image, so every kind of outlier visibly changes it."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand((1, *[s // 4 for s in shape]), generator=generator)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return torch.nn.functional.interpolate(noise[None], size=shape, mode=mode, align_corners=False)[0]


@pytest.mark.parametrize("kind", OUTLIER_KINDS)
@pytest.mark.parametrize("shape", [(64, 64), (32, 40, 36)])
def test_outliers_change_voxels_only_inside_their_mask(kind, shape):
    image = brain_like(shape)
    out, mask = mood_outlier(image, kind, np.random.default_rng(1), radius_range=(0.15, 0.3))
    assert out.shape == image.shape and mask.shape == image.shape[1:] and mask.dtype == torch.bool
    changed = (out != image).any(0)
    assert not (changed & ~mask).any(), "voxels outside the mask changed"
    assert changed[mask].float().mean() > 0.5, "the outlier left most of its sphere untouched"


@pytest.mark.parametrize("kind", OUTLIER_KINDS)
def test_outliers_are_reproducible_from_the_seed(kind):
    image = brain_like((32, 32, 32))
    a, mask_a = mood_outlier(image, kind, np.random.default_rng(7))
    b, mask_b = mood_outlier(image, kind, np.random.default_rng(7))
    c, _ = mood_outlier(image, kind, np.random.default_rng(8))
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b) and not torch.equal(a, c)


def test_outlier_centres_fall_inside_the_foreground():
    image = brain_like((48, 48))
    foreground = torch.zeros(48, 48, dtype=torch.bool)
    foreground[30:40, 5:15] = True
    for seed in range(10):
        _, mask = mood_outlier(image, "uniform_addition", np.random.default_rng(seed), foreground=foreground)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        centre = (ys.float().mean(), xs.float().mean())
        assert 28 <= centre[0] <= 42 and 3 <= centre[1] <= 17


@pytest.mark.parametrize("shape", [(64, 64), (24, 64, 64)])
@pytest.mark.parametrize("discrete", [False, True])
def test_fpi_follows_the_formulas(shape, discrete):
    rng = np.random.default_rng(3)
    a, b = brain_like(shape, 1), brain_like(shape, 2)
    b[(slice(None),) + tuple(slice(0, s // 3) for s in shape)] = a[(slice(None),) + tuple(slice(0, s // 3) for s in shape)]
    for _ in range(20):
        box = fpi_box(shape, np.random.default_rng(rng.integers(1 << 30)))
        for size, part in zip(shape, box):
            width = part.stop - part.start
            assert 0 <= part.start < part.stop <= size and width <= 0.4 * size + 1
        out, label = foreign_patch_interpolation(a, b, rng, discrete=discrete, box=box)
        alpha = float(label.max()) if label.max() > 0 else None
        region = (slice(None), *box)
        inside = torch.zeros((1, *shape), dtype=torch.bool)
        inside[region] = True
        differs = (a != b).any(0, keepdim=True)
        if alpha is not None:
            if discrete:
                assert alpha in (0.25, 0.5, 0.75, 1.0)
            # label == alpha exactly inside the patch where A != B, zero elsewhere
            assert torch.all(label[inside & differs] == alpha)
            assert torch.all(label[~(inside & differs)] == 0)
            expected = (1 - alpha) * a[region] + alpha * b[region]
            assert torch.allclose(out[region], expected)
        assert torch.equal(out[~inside.expand_as(out)], a[~inside.expand_as(a)])
