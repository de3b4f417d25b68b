"""The progressive GAN with a joint encoder (pgan_enc) and f-AnoGAN's encoder (fanogan): growing fades in
continuously, the gradient penalty on a case with a known answer, the encoder learns, the scores' terms,
and a short CPU training after which the residual score finds a pasted square (a learning test)."""

import pytest
import torch
import torch.nn.functional as F

from core.methods import create_method
from core.methods.pgan_enc import gradient_penalty, minmax, score_terms
from core.nets.pgan import ProgressiveDiscriminator, ProgressiveGenerator
from core.schedule import StepState
from tests.core.test_dpa import stripes

SMALL = {"resolution": 16, "z_dim": 32, "channel_base": 256, "channel_max": 32}


def with_squares(images, side=6, seed=2):
    """A square of one random colour pasted at a random place in each image."""
    generator = torch.Generator().manual_seed(seed)
    out = images.clone()
    for image in out:
        y, x = torch.randint(0, images.shape[-1] - side, (2,), generator=generator).tolist()
        image[:, y:y + side, x:x + side] = torch.rand(3, 1, 1, generator=generator)
    return out


def auroc(normal, anomalous):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score([0] * len(normal) + [1] * len(anomalous), torch.cat([normal, anomalous]).numpy())


def test_fade_in_starts_at_the_smaller_network_and_moves_continuously():
    torch.manual_seed(0)
    G = ProgressiveGenerator(32, 16, channel_base=256, channel_max=32)
    z = torch.randn(3, 16)
    # alpha = 0 is the 8² generator's image, upsampled: growing changes nothing at the switch
    torch.testing.assert_close(G(z, 16, 0.0), F.interpolate(G(z, 8), scale_factor=2, mode="nearest"))
    steps = [G(z, 16, a) for a in (0.0, 0.01, 0.02, 0.5, 1.0)]
    small = (steps[1] - steps[0]).abs().max()
    assert 0 < small < 0.05 * (steps[4] - steps[0]).abs().max()
    torch.testing.assert_close(steps[2] - steps[1], steps[1] - steps[0])  # linear in alpha
    D = ProgressiveDiscriminator(32, channel_base=256, channel_max=32, mbstd_group=0)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(D(x, 0.0), D(F.avg_pool2d(x, 2)))
    assert (D(x, 0.01) - D(x, 0.0)).abs().max() < 0.05 * (D(x, 1.0) - D(x, 0.0)).abs().max()


def test_gradient_penalty_of_a_linear_critic_is_its_weight_norm_minus_one_squared():
    w = torch.randn(3, 4, 4)
    critic = lambda x: (x * w).flatten(1).sum(1)  # noqa: E731 - ∇D = w everywhere
    reals, fakes = torch.rand(5, 3, 4, 4), torch.rand(5, 3, 4, 4)
    penalty = gradient_penalty(critic, reals, fakes, torch.rand(5, 1, 1, 1))
    torch.testing.assert_close(penalty, torch.full((5,), (w.norm() - 1).item() ** 2))
    unit = w / w.norm()
    assert gradient_penalty(lambda x: (x * unit).flatten(1).sum(1), reals, fakes, torch.rand(5, 1, 1, 1)).abs().max() < 1e-10


def test_score_terms_follow_the_paper():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    code = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    terms = score_terms(x, x.clone(), code, 0.05)
    torch.testing.assert_close(terms["residual"], torch.zeros(2))
    torch.testing.assert_close(terms["latent_norm"], torch.tensor([-5.0, -1.0]) / 2 ** 0.5)
    torch.testing.assert_close(terms["combined"], 0.95 * terms["latent_norm"])
    shifted = score_terms(x, x * 0.5 + 0.2, code, 0.05)  # an affine change of contrast: min-max undoes it
    torch.testing.assert_close(shifted["residual"], torch.zeros(2), atol=1e-6, rtol=0)
    assert minmax(x).min() == 0 and minmax(x).max() == 1


@pytest.mark.parametrize("loss", ["image", "latent"])
def test_encoder_loss_decreases_on_a_tiny_set(loss):
    torch.manual_seed(0)
    method = create_method("pgan_enc", {**SMALL, "encoder_loss": loss}).train()
    phase = next(p for p in method.phases() if p.name == "Emain")
    method.G.requires_grad_(False)
    optimiser = torch.optim.Adam(method.E.parameters(), lr=1e-3, betas=(0.0, 0.99))
    losses = []
    for step in range(150):
        torch.manual_seed(step % 4)  # a tiny set: the same four batches of latents
        out = phase.loss({"batch_size": 8}, StepState())
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        losses.append(float(out["loss"].detach()))
    assert sum(losses[-16:]) / 16 < 0.85 * sum(losses[:16]) / 16


def train(method, images, steps, batch=16):
    optimisers = {g: torch.optim.Adam(n.parameters(), lr=1e-3, betas=(0.0, 0.99)) for g, n in method.groups().items()}
    method.train()
    for _ in range(steps):
        for phase in method.phases():
            for group, net in method.groups().items():
                net.requires_grad_(group == phase.group)
            data = {"image": images[torch.randint(0, len(images), (batch,))]} if phase.data else {"batch_size": batch}
            out = phase.loss(data, StepState())
            optimisers[phase.group].zero_grad(set_to_none=True)
            out["loss"].backward()
            optimisers[phase.group].step()
    return method.eval()


def test_pgan_enc_learns_normal_texture_and_scores_squares_above_normals():
    torch.manual_seed(0)
    method = train(create_method("pgan_enc", {**SMALL, "score": "residual"}), stripes(256, size=16, seed=0), 500)
    normal, anomalous = stripes(64, size=16, seed=5), with_squares(stripes(64, size=16, seed=6))
    scores = [method.score({"image": images})[0] for images in (normal, anomalous)]
    assert auroc(*scores) > 0.8
    terms = method.score_terms({"image": normal})
    assert set(terms) == {"combined", "residual", "latent_norm"}
    torch.testing.assert_close(terms["residual"], scores[0])
    _, maps = method.score({"image": anomalous})
    assert maps.shape == (64, 1, 16, 16)
    # evaluation gets scores, maps and terms from one inversion
    calls = []
    real = method.inverted
    method.inverted = lambda images: (calls.append(1), real(images))[1]
    together = method.score_with_terms({"image": normal})
    assert len(calls) == 1 and torch.equal(together[0], scores[0]) and torch.equal(together[2]["residual"], scores[0])


def test_fanogan_trains_only_its_encoder_against_a_frozen_generator(tmp_path):
    import json

    torch.manual_seed(0)
    gan = create_method("pgan_enc", {**SMALL, "encoder_loss": "none"})
    assert set(gan.groups()) == {"G", "D"} and [p.name for p in gan.phases()] == ["Dmain", "Gmain"]
    with pytest.raises(ValueError, match="encoder_loss: none"):
        gan.score({"image": torch.rand(2, 3, 16, 16)})
    torch.save({"method_json": json.dumps({"name": "pgan_enc", "options": gan.config.model_dump(mode="json")}),
                "state": gan.state_dict(), "ema": {"G": gan.G.state_dict()}}, tmp_path / "final.pt")
    method = create_method("fanogan", {"generator": str(tmp_path)})
    assert set(method.groups()) == {"E"}
    before = {k: v.clone() for k, v in method.G.state_dict().items()}
    images = stripes(64, size=16, seed=0)
    first = float(method.phases()[0].loss({"image": images[:16]}, StepState())["loss"])
    train(method, images, 40)
    last = float(method.phases()[0].loss({"image": images[:16]}, StepState())["loss"])
    assert last < first
    assert all(torch.equal(before[k], v) for k, v in method.G.state_dict().items())
    with pytest.raises(ValueError, match="holds a 'pgan_enc' run, not stylegan2"):
        create_method("stylegan2_encoder", {"generator": str(tmp_path)})
