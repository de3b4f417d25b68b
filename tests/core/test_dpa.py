"""Deep Perceptual Autoencoder: the loss formula on a hand-checked example, the progressive-growing
fade-in, the layer schedule, and that it learns (trained on normals only, it scores unseen defects
above normals, with real ImageNet features from the wheel)."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from core.methods import create_method
from core.methods.dpa import relative_perceptual_l1
from core.schedule import StepState


def test_relative_perceptual_l1_by_hand():
    real = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]])
    fake = torch.tensor([[[[0.0, -2.0], [1.0, 1.0]]]])
    # |1-0| + |-2+2| + |3-1| + |0-1| = 4 over |1| + |-2| + |3| + |0| = 6
    torch.testing.assert_close(relative_perceptual_l1(real, fake), torch.tensor([4 / 6]))


def small(**options):
    torch.manual_seed(0)
    return create_method("dpa", {"resolution": 32, "base": 4, "max_channels": 16, "latent": 8,
                                 "net": "efficientnet_lite0", "weights": "none",
                                 "layers": ["reduction1", "reduction2"], **options}).eval()


def test_score_is_the_loss_on_normalised_features():
    method = small()
    images = torch.rand(3, 3, 32, 32)
    stats = method.statistics([{"image": images}])
    method.set_statistics(stats)
    features = method.features(images, ["reduction2"])["reduction2"]
    mean, std = stats["reduction2"]["mean"].view(1, -1, 1, 1), stats["reduction2"]["std"].view(1, -1, 1, 1)
    recon = method.autoencoder(images)
    expected = relative_perceptual_l1((features - mean) / std,
                                      (method.features(recon, ["reduction2"])["reduction2"] - mean) / std)
    scores, pixels = method.score({"image": images})
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pixels.mean(dim=(1, 2, 3)), scores, rtol=1e-3, atol=1e-4)


def test_windows_with_overlap_and_top_pooling_score_a_tile():
    """A 64 px tile for a 32 px model: the window scores, the highest of them the tile's; with half-window
    strides the 9 overlapping windows (the 4 side-by-side ones among them) and a map that averages them;
    'top' pools a window's highest share of positions on the whole map's scale (>= its mean)."""
    method = small(normalise=False)
    tiles = torch.rand(2, 3, 64, 64)
    corners = [(y, x) for y in (0, 32) for x in (0, 32)]
    windows = torch.stack([tiles[:, :, y:y + 32, x:x + 32] for y, x in corners], 1).flatten(0, 1)
    alone, alone_maps = method._score_windows(windows)
    scores, maps = method.score({"image": tiles})
    torch.testing.assert_close(scores, alone.view(2, 4).amax(1))
    for i, (y, x) in enumerate(corners):  # side by side: each window's own map in its place
        torch.testing.assert_close(maps[:, :, y:y + 32, x:x + 32], alone_maps.view(2, 4, 1, 32, 32)[:, i])
    method.config.window_stride = 16
    overlapping, averaged = method.score({"image": tiles})
    assert (overlapping >= scores - 1e-6).all() and averaged.shape == maps.shape  # 9 windows, the 4 among them
    torch.testing.assert_close(averaged[:, :, :16, :16], maps[:, :, :16, :16])  # a corner: one window covers it
    method.config.window_stride, method.config.image_pooling, method.config.pooling_top = None, "top", 0.25
    top, _ = method.score({"image": tiles})
    assert (top >= scores - 1e-6).all()


def test_statistics_are_required_when_normalising():
    method = small()
    with pytest.raises(RuntimeError, match="feature statistics"):
        method.score({"image": torch.rand(1, 3, 32, 32)})


def test_fade_in_starts_from_the_lower_resolution_path():
    method = small(normalise=False)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        faded = method.autoencoder(images, alpha=0.0)
        lower = method.autoencoder(F.avg_pool2d(images, 2), alpha=1.0)
        barely = method.autoencoder(images, alpha=1e-6)
        full = method.autoencoder(images, alpha=1.0)
        for module in (method.autoencoder.from_rgb["16"], method.autoencoder.to_rgb["16"]):
            for p in module.parameters():
                p.zero_()
        full_without_lower_path = method.autoencoder(images, alpha=1.0)
    torch.testing.assert_close(faded, F.interpolate(lower, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(barely, faded, rtol=1e-4, atol=1e-4)  # the fade starts smoothly
    torch.testing.assert_close(full_without_lower_path, full)       # and ends without the old path


def test_growing_loss_blends_the_two_layers_in_sync():
    method = small(normalise=False)
    assert [method._layer(r) for r in (8, 16, 32)] == ["reduction1", "reduction1", "reduction2"]
    images = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    with torch.no_grad():
        loss = method.training_step({"image": images}, StepState(resolution=32, alpha=0.25))["model"]
        recon = method.autoencoder(images, 0.25)
        new = method.perceptual(images, recon, "reduction2").mean()
        old = method.perceptual(F.avg_pool2d(images, 2), F.avg_pool2d(recon, 2), "reduction1").mean()
    torch.testing.assert_close(loss, 0.25 * new + 0.75 * old)
    with torch.no_grad():  # a stage below the target trains on downsampled images
        method.training_step({"image": images}, StepState(resolution=16, alpha=1.0))


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match="set the method's resolution"):
        small(normalise=False).autoencoder(torch.rand(1, 3, 48, 48))


def stripes(count, size=32, seed=0):
    """Oriented sinusoidal stripes with random phase and colour: a regular 'tissue' texture."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    phase = torch.rand(count, 1, 1, 1, generator=generator) * 6.28
    colour = 0.3 + 0.4 * torch.rand(count, 3, 1, 1, generator=generator)
    return (colour + 0.25 * torch.sin(xx * 0.8 + phase)).clamp(0, 1)


def with_defects(images, seed=1):
    generator = torch.Generator().manual_seed(seed)
    out, masks = images.clone(), torch.zeros(len(images), 1, *images.shape[-2:], dtype=torch.bool)
    for i in range(len(images)):
        y, x = torch.randint(4, images.shape[-1] - 14, (2,), generator=generator).tolist()
        out[i, :, y:y + 10, x:x + 10] = torch.rand(3, 10, 10, generator=generator)
        masks[i, :, y:y + 10, x:x + 10] = True
    return out, masks


def blobs(count, size=32, seed=0):
    """Smooth random colour fields: a low-frequency 'normal' texture an autoencoder can learn quickly."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, 4, 4, generator=generator)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def test_dpa_trained_on_normals_scores_defects_higher():
    torch.manual_seed(0)
    method = create_method("dpa", {"resolution": 32, "base": 8, "max_channels": 32, "latent": 64,
                                   "net": "efficientnet_lite0", "weights": "imagenet", "layers": ["reduction2"]})
    train = blobs(256)
    method.set_statistics(method.statistics([{"image": train[:64]}]))
    optimizer = torch.optim.Adam(method.autoencoder.parameters(), 1e-3)
    method.train()
    losses = []
    for _ in range(200):
        loss = method.training_step({"image": train[torch.randint(0, len(train), (32,))]})["model"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-20:]) < 0.8 * sum(losses[:20])  # reconstructions get perceptually closer
    method.eval()
    normal = blobs(30, seed=5)
    defective, masks = with_defects(blobs(30, seed=6))
    scores, maps = method.score({"image": torch.cat([normal, defective])})
    assert roc_auc_score([0] * 30 + [1] * 30, scores.numpy()) > 0.85
    assert maps[30:][masks].mean() > maps[30:][~masks].mean()  # the pixel map is higher on the defects


def test_larger_images_are_scored_window_by_window():
    method = small(normalise=False)
    images = torch.rand(2, 3, 64, 96)
    scores, maps = method.score({"image": images})
    assert maps.shape == (2, 1, 64, 96)
    window_scores, window_map = method.score({"image": images[:, :, 32:64, 64:96]})
    torch.testing.assert_close(maps[:, :, 32:64, 64:96], window_map)
    windows = [method.score({"image": images[:, :, y:y + 32, x:x + 32]})[0] for y in (0, 32) for x in (0, 32, 64)]
    torch.testing.assert_close(scores, torch.stack(windows, dim=1).amax(dim=1))
