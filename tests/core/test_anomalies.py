import numpy as np
import pytest
import torch

from core.anomalies import FPI_ALPHAS, OUTLIERS, foreign_patch_interpolation, fpi_boxes, mood_outlier


def brain_like(shape, seed=0):
    """A smooth non-constant image, so every kind of outlier visibly changes it."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand((1, *[s // 4 for s in shape]), generator=generator)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return torch.nn.functional.interpolate(noise[None], size=shape, mode=mode, align_corners=False)[0]


@pytest.mark.parametrize("kind", list(OUTLIERS))  # MOOD's five and the other kinds
@pytest.mark.parametrize("shape", [(64, 64), (32, 40, 36)])
def test_outliers_change_voxels_only_inside_their_mask(kind, shape):
    image = brain_like(shape)
    out, mask = mood_outlier(image, kind, np.random.default_rng(1), radius_range=(0.15, 0.3))
    assert out.shape == image.shape and mask.shape == image.shape[1:] and mask.dtype == torch.bool
    changed = (out != image).any(0)
    assert not (changed & ~mask).any(), "voxels outside the mask changed"
    assert changed[mask].float().mean() > 0.5, "the outlier left most of its sphere untouched"


@pytest.mark.parametrize("kind", list(OUTLIERS))
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
    generator = torch.Generator().manual_seed(3)
    count = 16
    a = torch.stack([brain_like(shape, 1 + i) for i in range(count)])
    b = torch.stack([brain_like(shape, 100 + i) for i in range(count)])
    corner = (slice(None), slice(None)) + tuple(slice(0, s // 3) for s in shape)
    b[corner] = a[corner]  # where A == B the label must stay 0 even inside the patch
    start, stop = fpi_boxes(count, shape, generator)
    width = stop - start
    size = torch.tensor(shape)
    assert torch.all(start >= 0) and torch.all(stop <= size) and torch.all(width >= 1)
    assert torch.all(width <= 0.4 * size + 1)
    assert torch.all((width >= 0.1 * size - 1) | (stop == size) | (start == 0))  # only clipping shrinks a box
    out, label, alpha = foreign_patch_interpolation(a, b, discrete=discrete, boxes=(start, stop), generator=generator)
    if discrete:
        assert set(alpha.tolist()) <= set(FPI_ALPHAS)
    else:
        assert torch.all((alpha >= 0) & (alpha <= 1)) and len(set(alpha.tolist())) == count
    for i in range(count):
        region = tuple(slice(int(s0), int(s1)) for s0, s1 in zip(start[i], stop[i]))
        inside = torch.zeros((1, *shape), dtype=torch.bool)
        inside[(slice(None), *region)] = True
        differs = (a[i] != b[i]).any(0, keepdim=True)
        # label == alpha exactly inside the patch where A != B, zero elsewhere
        assert torch.all(label[i][inside & differs] == alpha[i])
        assert torch.all(label[i][~(inside & differs)] == 0)
        expected = (1 - alpha[i]) * a[i][(slice(None), *region)] + alpha[i] * b[i][(slice(None), *region)]
        assert torch.allclose(out[i][(slice(None), *region)], expected)
        assert torch.equal(out[i][~inside.expand_as(out[i])], a[i][~inside.expand_as(a[i])])


def test_fpi_box_sizes_and_centres_cover_the_stated_ranges():
    start, stop = fpi_boxes(20000, (100, 200), torch.Generator().manual_seed(0))
    width, centre = (stop - start).float(), (start + stop).float() / 2
    size = torch.tensor([100.0, 200.0])
    unclipped = (start > 0) & (stop < size)
    fraction = width[unclipped[:, 1], 1] / 200
    assert 0.095 <= fraction.min() and fraction.max() <= 0.405 and 0.23 < fraction.mean() < 0.27
    assert 0.08 <= (centre[:, 0] / 100).min() and (centre[:, 0] / 100).max() <= 0.92
