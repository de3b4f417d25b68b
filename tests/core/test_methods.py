"""Every registered method: config round trip, a training step with gradients for each group, scores,
and a save/load that reproduces the scores (timm-style: new methods are tested by registering)."""

import io

import pytest
import torch

from core.methods import create_method, method_class, method_names
from core.schedule import StepState

SMALL = {"reference_ae": {"width": 8, "depth": 3, "bottleneck": 8}, "fpi": {"base": 4, "widen": 1, "depth": 6},
         # Pretrained-feature methods with random weights (the tests must not need weight files), their
         # data statistics fixed (the trainer computes them per run: tests/trainers).
         "dpa": {"resolution": 32, "base": 4, "max_channels": 16, "latent": 8, "net": "efficientnet_lite0",
                 "weights": "none", "layers": ["reduction1", "reduction2"], "normalise": False},
         "mkd": {"net": "efficientnet_lite0", "weights": "none", "layers": ["reduction2", "reduction3"],
                 "cloner_base": 4, "lambda_dir": 1.0},
         "stylegan2": {"resolution": 32, "channel_base": 256, "channel_max": 32, "z_dim": 16, "w_dim": 16,
                       "mapping_layers": 2, "augment_p": 0.5},
         "pgan_enc": {"resolution": 32, "z_dim": 16, "channel_base": 256, "channel_max": 32}}


@pytest.fixture(scope="session")
def small_generator(tmp_path_factory):
    """A (random) StyleGAN2 saved as a run's final.pt: what stylegan2_encoder inverts."""
    import json

    torch.manual_seed(0)
    gan = create_method("stylegan2", SMALL["stylegan2"])
    path = tmp_path_factory.mktemp("generator") / "final.pt"
    torch.save({"method_json": json.dumps({"name": "stylegan2", "options": gan.config.model_dump(mode="json")}),
                "state": gan.state_dict(), "ema": {"G": gan.G.state_dict()}}, path)
    return path


@pytest.fixture(scope="session")
def small_pgan(tmp_path_factory):
    """A (random) progressive GAN without encoder saved as a run's final.pt: what fanogan inverts."""
    import json

    torch.manual_seed(0)
    gan = create_method("pgan_enc", {**SMALL["pgan_enc"], "encoder_loss": "none"})
    path = tmp_path_factory.mktemp("pgan") / "final.pt"
    torch.save({"method_json": json.dumps({"name": "pgan_enc", "options": gan.config.model_dump(mode="json")}),
                "state": gan.state_dict(), "ema": {"G": gan.G.state_dict()}}, path)
    return path


@pytest.fixture(params=method_names())
def method(request):
    options = SMALL.get(request.param, {})
    if request.param == "stylegan2_encoder":
        options = {"generator": str(request.getfixturevalue("small_generator")), "channel_base": 128,
                   "channel_max": 16}
    if request.param == "fanogan":
        options = {"generator": str(request.getfixturevalue("small_pgan"))}
    torch.manual_seed(0)
    return create_method(request.param, options)


def batch(method, size=32, count=2):
    channels = getattr(method.config, "in_channels", 3)
    return {"image": torch.rand(count, channels, size, size)}


def test_every_phase_gives_a_loss_with_gradients_for_its_group(method):
    from core.methods.base import check_phases

    method.train()
    phases = check_phases(method)
    assert {p.group for p in phases} == set(method.groups())
    for phase in phases:
        method.zero_grad(set_to_none=True)
        out = phase.loss(batch(method) if phase.data else {"batch_size": 2}, StepState())
        loss = out["loss"] if isinstance(out, dict) else out
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        # A method may leave some parameters idle at a given state (progressive growing's other levels).
        idle = method.idle_parameters(StepState()) if hasattr(method, "idle_parameters") else set()
        grads = [p.grad for name, p in method.groups()[phase.group].named_parameters()
                 if p.requires_grad and name not in idle]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_registration_checks_the_method_contract():
    from torch import nn

    from core.methods import register_method
    from core.methods.base import Method

    with pytest.raises(TypeError, match="must subclass"):
        register_method("_plain_module")(type("Plain", (nn.Module,), {"Config": dict}))
    with pytest.raises(TypeError, match="does not define groups, score, phases or training_step"):
        register_method("_empty")(type("Empty", (Method,), {"Config": dict}))
    adjusting = {"Config": dict, "adjust_interval": 4, "groups": lambda self: {}, "score": lambda self, b: None,
                 "training_step": lambda self, b, s=None: {}}
    with pytest.raises(TypeError, match=r"does not define adjust \(adjust_interval is set\)"):
        register_method("_no_adjust")(type("NoAdjust", (Method,), adjusting))


def test_scores_have_the_documented_shapes(method):
    method.eval()
    images = batch(method)
    image_scores, pixel_maps = method.score(images)
    assert image_scores.shape == (2,) and torch.isfinite(image_scores).all()
    if pixel_maps is not None:
        assert pixel_maps.shape == (2, 1, 32, 32)


def test_save_and_load_reproduce_scores(method):
    method.eval()
    images = batch(method)
    buffer = io.BytesIO()
    torch.save({"config": method.config.model_dump(mode="json"), "state": method.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again = create_method(method.method_name, saved["config"])
    again.load_state_dict(saved["state"])
    again.eval()
    torch.testing.assert_close(again.score(images)[0], method.score(images)[0])


def test_unknown_method_and_config_keys_are_refused():
    with pytest.raises(KeyError, match="did you mean 'reference_ae'"):
        method_class("reference_a")
    with pytest.raises(Exception, match="widht"):
        create_method("reference_ae", {"widht": 8})
