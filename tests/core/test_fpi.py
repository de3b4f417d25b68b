"""FPI learns: trained only on normal images with synthetic patch blends, it finds MOOD outliers it
never saw, per pixel and per image, clearly above chance (a small 2D set, within CI's time)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from core.anomalies import OUTLIER_KINDS, mood_outlier
from core.methods import create_method


def smooth_discs(count, size=32, seed=0):
    """Smooth random textures inside a disc: 'anatomy' with a background, like a brain slice."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 1, size // 8, size // 8, generator=generator)
    images = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (0.45 * size) ** 2
    return images * disc, disc


def test_fpi_trained_on_normals_localises_unseen_outliers():
    torch.manual_seed(0)
    train, _ = smooth_discs(512)
    method = create_method("fpi", {"base": 8, "widen": 1, "depth": 8}).train()
    optimizer = torch.optim.Adam(method.parameters(), 2e-3)
    for _ in range(400):
        loss = method.training_step({"image": train[torch.randint(0, len(train), (32,))]})["model"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    method.eval()
    test, disc = smooth_discs(60, seed=1)
    rng = np.random.default_rng(0)
    images, masks, labels = [], [], []
    for i, image in enumerate(test):
        if i < 20:
            images.append(image), masks.append(torch.zeros_like(image, dtype=torch.bool)), labels.append(0)
            continue
        altered, mask = mood_outlier(image, OUTLIER_KINDS[i % len(OUTLIER_KINDS)], rng, foreground=disc,
                                     radius_range=(0.15, 0.3))
        images.append(altered), masks.append(mask.reshape(image.shape).bool()), labels.append(1)
    scores, pixels = method.score({"image": torch.stack(images)})
    assert pixels.shape == (60, 1, 32, 32) and float(pixels.min()) >= 0 and float(pixels.max()) <= 1
    assert roc_auc_score(labels, scores.numpy()) > 0.85
    assert roc_auc_score(torch.stack(masks).flatten().numpy(), pixels.flatten().numpy()) > 0.8


@pytest.mark.parametrize("mode", ["continuous", "discrete"])
def test_both_alpha_modes_train_and_score_in_unit_range(mode):
    torch.manual_seed(0)
    method = create_method("fpi", {"base": 4, "widen": 1, "depth": 6, "mode": mode})
    images, _ = smooth_discs(8)
    optimizer = torch.optim.Adam(method.parameters(), 3e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # the same blends each step: the loss on them must fall
        loss = method.training_step({"image": images, "image_b": images.flip(0)})["model"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    method.eval()
    scores, pixels = method.score({"image": images})
    assert scores.shape == (8,) and 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    head = method.model.head[-1].out_channels
    assert head == (5 if mode == "discrete" else 1)


def _partners_used(options: dict, monkeypatch):
    """One training step on 64 discs with aligned partners ``image + 1`` (outside [0, 1], so unlike any
    image of the batch or a zoom of one): (images, aligned partners, the partners the blend was given)."""
    import core.methods.fpi as fpi

    partners = []
    real = fpi.foreign_patch_interpolation
    monkeypatch.setattr(fpi, "foreign_patch_interpolation", lambda image, other, **kw: (partners.append(other),
                                                                                         real(image, other, **kw))[1])
    torch.manual_seed(0)
    method = create_method("fpi", {"base": 4, "widen": 1, "depth": 6, **options})
    images, _ = smooth_discs(64)
    aligned = images.flip(0) + 1
    method.training_step({"image": images, "image_b": aligned})
    return images, aligned, partners[0]


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_random_partner_share_mixes_aligned_and_random_partners(share, monkeypatch):
    images, aligned, partners = _partners_used({"random_partner_share": share}, monkeypatch)
    from_aligned = (partners == aligned).flatten(1).all(dim=1)
    from_batch = (partners == torch.roll(images, 1, dims=0)).flatten(1).all(dim=1)
    assert bool((from_aligned ^ from_batch).all())  # each item has exactly one of the two partners
    assert float(from_batch.float().mean()) == pytest.approx(share, abs=0.2)


def test_volume_score_is_the_mean_of_the_top_voxels():
    method = create_method("fpi", {"base": 4, "widen": 1, "depth": 6, "volume_top_fraction": 0.01})
    volume = np.zeros((10, 10, 10), np.float32)
    volume.flat[:10] = 1.0  # exactly the top 1 %
    volume.flat[10:20] = 0.5
    assert method.sample_score(volume) == pytest.approx(1.0)


def test_zoomed_copies_rescale_about_a_fixed_point_within_the_range():
    from core.anomalies import zoomed_copies

    size = 64
    ramp = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size).expand(16, 1, size, size) + 100
    assert torch.allclose(zoomed_copies(ramp, (1.0, 1.0)), ramp, atol=1e-3)
    torch.manual_seed(0)
    zoomed = zoomed_copies(ramp, (0.5, 2.0))
    for image in zoomed[:, 0]:
        valid = image > 50  # ~0 where the zoom reads outside the image (and a blend at its border)
        row = image[size // 2][valid[size // 2]][1:-1]
        slope = float((row[-1] - row[0]) / (len(row) - 1))  # 1 / s for the ramp x -> x + 100
        assert 0.5 - 1e-3 <= 1 / slope <= 2.0 + 1e-3
        # away from the zero border, a zoom of a horizontal ramp stays the same ramp in every row
        rows, cols = valid.all(dim=1), valid[size // 2]
        rows, cols = [torch.nn.functional.pad(m[:-2] & m[1:-1] & m[2:], (1, 1)) for m in (rows, cols)]
        assert torch.allclose(image[rows][:, cols], image[size // 2, cols].expand(int(rows.sum()), -1), atol=1e-3)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_zoomed_partner_share_takes_the_share_of_partners_from_the_item_itself(share, monkeypatch):
    images, aligned, partners = _partners_used({"zoomed_partner_share": share}, monkeypatch)
    from_aligned = (partners == aligned).flatten(1).all(dim=1)
    assert float((~from_aligned).float().mean()) == pytest.approx(share, abs=0.2)
    if share:
        zoomed = partners[~from_aligned]
        assert float(zoomed.max()) <= 1.0 and not torch.equal(zoomed, images[~from_aligned])


@pytest.mark.parametrize("views", [["flip_x"], ["flip_y"], ["shift"], ["flip_x", "shift"]])
def test_test_views_are_mapped_back_before_averaging(views, monkeypatch):
    """With a network that returns its input, every view mapped back is the image again (up to the
    replicated edge strip of a shift): the averaged map equals the image, so views add no displacement."""
    method = create_method("fpi", {"base": 4, "widen": 1, "depth": 6, "test_views": views}).eval()
    monkeypatch.setattr(type(method), "forward", lambda self, images: images)
    images, _ = smooth_discs(4, size=64)
    _, pixel = method.score({"image": images})
    inner = (slice(None), slice(None), slice(0, -2), slice(0, -2))  # shift: 64 // 32 = 2 replicated pixels
    assert torch.allclose(pixel[inner], images[inner], atol=1e-6)
    if "shift" not in views:
        assert torch.allclose(pixel, images, atol=1e-6)
