"""StyleGAN2's parts against definitions: FIR resampling, modulated convolution (fused and split) against
a per-sample reference, the networks' shapes and gradients at several resolutions, R1 and path length on
cases with a known answer, ADA's operations and the direction p moves in."""

import math

import pytest
import torch
import torch.nn.functional as F

from core.ada import GROUPS, AugmentPipe, adjusted_p
from core.methods import create_method
from core.methods.stylegan2 import path_lengths, r1_penalty
from core.nets.ops import resampled_conv2d, setup_filter, upfirdn2d, upsample2d
from core.nets.stylegan2 import Discriminator, Generator, MinibatchStd, modulated_conv2d

SMALL = {"channel_base": 256, "channel_max": 32, "z_dim": 16, "w_dim": 16, "mapping_layers": 2}


def test_upfirdn2d_is_the_textbook_upsample_filter_downsample():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6)
    f = setup_filter()
    out = upfirdn2d(x, f, up=2, down=1, pad=(2, 1, 2, 1), gain=4)
    # by hand: zeros between samples, zero padding, a true 2-D convolution with the outer-product filter
    z = torch.zeros(2, 3, 10, 12)
    z[:, :, ::2, ::2] = x
    z = F.pad(z, (2, 1, 2, 1))
    kernel = (torch.outer(f, f) * 4).flip(0, 1).expand(3, 1, 4, 4)
    torch.testing.assert_close(out, F.conv2d(z, kernel, groups=3))
    assert upfirdn2d(x, f, down=2, pad=(1, 1, 1, 1)).shape == (2, 3, 2, 3)
    # a constant stays constant away from the borders (the filter's gain is right)
    flat = upsample2d(torch.ones(1, 1, 8, 8), f)
    torch.testing.assert_close(flat[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12))


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("resample", ["none", "up", "down"])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_fused_and_split_equal_the_per_sample_reference(kernel, resample, demodulate):
    torch.manual_seed(1)
    f = setup_filter()
    x, weight, styles = torch.randn(3, 4, 8, 8), torch.randn(5, 4, kernel, kernel), torch.randn(3, 4)
    up, down = resample == "up", resample == "down"
    expected = []
    for n in range(3):  # the paper's eq. 1-3, one sample at a time, convolution after resampling
        w = weight * styles[n].view(1, 4, 1, 1)
        if demodulate:
            w = w / (w.square().sum((1, 2, 3), keepdim=True) + 1e-8).sqrt()
        sample = x[n:n + 1]
        if up:
            out = F.conv2d(upsample2d(sample, f), w, padding=kernel // 2)
        elif down:
            out = resampled_conv2d(sample, w, f, down=True, padding=kernel // 2)
        else:
            out = F.conv2d(sample, w, padding=kernel // 2)
        expected.append(out)
    expected = torch.cat(expected)
    border = kernel // 2 if up else 0  # up: the transposed convolution keeps what zero padding drops there
    inner = (slice(None), slice(None), slice(border, expected.shape[2] - border), slice(border, expected.shape[3] - border))
    for fused in (True, False):
        got = modulated_conv2d(x, weight, styles, up=up, down=down, padding=kernel // 2, resample_filter=f,
                               demodulate=demodulate, fused=fused)
        assert got.shape == expected.shape
        torch.testing.assert_close(got[inner], expected[inner], rtol=1e-4, atol=1e-4)


def test_demodulation_gives_unit_variance_outputs():
    torch.manual_seed(2)
    x = torch.randn(8, 64, 16, 16)
    out = modulated_conv2d(x, torch.randn(32, 64, 3, 3), torch.randn(8, 64) * 5, padding=1)
    assert abs(out[..., 1:-1, 1:-1].std().item() - 1) < 0.1  # whatever the styles' scale


@pytest.mark.parametrize("resolution", [8, 16, 32, 64])
def test_networks_have_the_right_shapes_and_every_parameter_learns(resolution):
    torch.manual_seed(resolution)
    g = Generator(resolution, 16, 16, 2, channel_base=256, channel_max=32)
    d = Discriminator(resolution, channel_base=256, channel_max=32)
    assert g.num_ws == 2 * int(math.log2(resolution)) - 2
    z = torch.randn(4, 16)
    images = g(z)
    assert images.shape == (4, 3, resolution, resolution) and torch.isfinite(images).all()
    logits = d(images)
    assert logits.shape == (4, 1)
    logits.sum().backward()
    for name, p in [*g.named_parameters(), *d.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="32x32 images"):
        Discriminator(32, channel_base=256, channel_max=32)(torch.zeros(1, 3, 64, 64))


def test_mapping_truncation_and_noise_modes():
    torch.manual_seed(3)
    g = Generator(16, 16, 16, 2, channel_base=256, channel_max=32).eval()
    z = torch.randn(4, 16)
    g.mapping(z, update_w_avg=True)
    ws = g.mapping(z, psi=0.0)
    torch.testing.assert_close(ws, g.mapping.w_avg.expand_as(ws))  # ψ = 0: the average w
    torch.testing.assert_close(g(z, noise_mode="const"), g(z, noise_mode="const"))
    for layer in g.modules():
        if hasattr(layer, "noise_strength"):
            layer.noise_strength.data.fill_(1.0)
    assert not torch.equal(g(z, noise_mode="random"), g(z, noise_mode="random"))


def test_minibatch_std_groups_any_batch():
    x = torch.randn(6, 4, 4, 4)
    out = MinibatchStd(4)(x)  # 6 is not a multiple of 4: groups of 3
    assert out.shape == (6, 5, 4, 4)
    same = MinibatchStd(4)(torch.ones(4, 4, 4, 4))
    assert same[:, 4].abs().max() < 1e-3  # identical samples: no spread


def test_r1_penalty_on_known_discriminators():
    reals = torch.randn(5, 3, 4, 4, requires_grad=True)
    a = torch.randn(3, 4, 4)
    linear, _ = r1_penalty(lambda x: (x * a).sum((1, 2, 3)), reals)
    torch.testing.assert_close(linear, a.square().sum())  # ∇ = a for every sample
    quadratic, _ = r1_penalty(lambda x: 0.5 * x.square().sum((1, 2, 3)), reals)
    torch.testing.assert_close(quadratic, reals.detach().square().sum((1, 2, 3)).mean())  # ∇ = x
    quadratic.backward()  # create_graph: the penalty itself has a gradient
    torch.testing.assert_close(reals.grad, 2 * reals.detach() / 5)


def test_path_length_on_a_known_generator():
    # G(w) = c · (the first layer's w laid out as an image): J^T y = c·y in layer 0's w, 0 elsewhere
    c, num_ws, side = 3.0, 4, 4
    ws = torch.randn(2, num_ws, side * side, requires_grad=True)
    noise = torch.randn(2, 1, side, side)
    lengths, _ = path_lengths(lambda w, fused=False: c * w[:, 0].reshape(2, 1, side, side), ws, noise)
    torch.testing.assert_close(lengths, c * noise.flatten(1).norm(dim=1) / math.sqrt(num_ws))


def test_augment_pipe_is_identity_at_p0_and_blits_are_exact():
    torch.manual_seed(4)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(AugmentPipe("bgc", p=0.0)(images), images, atol=1e-5, rtol=0)
    flipped = AugmentPipe("b", p=1.0)
    flipped.ops = {"xflip", "rotate90"}
    out = flipped(images)
    dihedral = [torch.rot90(batch, k, (2, 3)) for batch in (images, images.flip(3)) for k in range(4)]
    for n in range(8):  # each image is exactly one of its 8 rotations / flips
        assert min((out[n] - d[n]).abs().max().item() for d in dihedral) < 1e-5
    assert any((out[n] - images[n]).abs().max() > 0.1 for n in range(8))


def test_augment_pipe_passes_gradients_and_every_group_changes_images():
    torch.manual_seed(5)
    images = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    for group in GROUPS:
        out = AugmentPipe(group, p=1.0)(images)
        assert not torch.allclose(out, images, atol=1e-3), group
    AugmentPipe("bgc", p=1.0)(images).square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_ada_p_moves_towards_its_target_and_stays_in_range():
    assert adjusted_p(0.2, real_sign=0.9, target=0.6, images=1000, speed_kimg=100) == pytest.approx(0.21)
    assert adjusted_p(0.2, real_sign=0.1, target=0.6, images=1000, speed_kimg=100) == pytest.approx(0.19)
    assert adjusted_p(0.0, real_sign=-1.0, target=0.6, images=1000, speed_kimg=100) == 0.0
    assert adjusted_p(0.999, real_sign=1.0, target=0.6, images=1000, speed_kimg=100) == 1.0
    method = create_method("stylegan2", {"resolution": 16, **SMALL, "ada_kimg": 10})
    method.adjust({"D/real_sign": 0.95, "G/path_length": 2.0}, None, images=64)
    assert method.augment_pipe.p.item() == pytest.approx(64 / 10_000)
    assert method.pl_mean.item() == pytest.approx(0.02)  # lerp(0, 2, pl_decay 0.01)
    method.adjust({"D/real_sign": 0.1}, None, images=128)
    assert method.augment_pipe.p.item() == 0.0
    fixed = create_method("stylegan2", {"resolution": 16, **SMALL, "augment": "fixed", "augment_p": 0.3})
    fixed.adjust({"D/real_sign": 0.95}, None, images=64)
    assert fixed.augment_pipe.p.item() == pytest.approx(0.3)


def test_tiles_of_the_wrong_size_are_refused_with_the_fix():
    method = create_method("stylegan2", {"resolution": 16, **SMALL})
    with pytest.raises(ValueError, match="crop_size=16"):
        method.score({"image": torch.rand(2, 3, 32, 32)})
    with pytest.raises(Exception, match="power of two"):
        create_method("stylegan2", {"resolution": 48})


def test_snapshot_reports_fd_and_kd_beside_the_real_baseline():
    torch.manual_seed(6)
    method = create_method("stylegan2", {"resolution": 16, **SMALL, "metrics_images": 8})
    reals = [{"image": torch.rand(8, 3, 16, 16)} for _ in range(3)]
    stats = method.statistics(reals)
    assert stats["real_features"].shape == (24, 320) and stats["feature"] == "efficientnet_lite0"
    method.set_statistics(stats)
    shown = method.snapshot(reals[0], None, {"G": method.G})
    assert shown["images"]["fakes"].shape == (16, 3, 16, 16)
    metrics = shown["metrics"]
    assert metrics["FD-EffNetLite0"] > metrics["FD-EffNetLite0 real"] >= 0  # untrained G: far from the reals
    assert "FID" not in metrics and "KD-EffNetLite0 real" in metrics
    off = create_method("stylegan2", {"resolution": 16, **SMALL, "metrics": False})
    assert off.statistics(reals) == {}


def test_generated_images_follow_their_seeds():
    method = create_method("stylegan2", {"resolution": 16, **SMALL}).eval()
    first = method.generated(3, 5)
    assert first.shape == (3, 3, 16, 16) and 0 <= first.min() and first.max() <= 1
    torch.manual_seed(123)  # the global generator's state does not matter
    assert torch.equal(method.generated(3, 5), first)
    assert not torch.equal(method.generated(3, 8), first)
