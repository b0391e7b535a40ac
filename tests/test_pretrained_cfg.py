"""``model.pretrained_cfg`` (and ``default_cfg``): timm's data configuration of every model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dyshuffle.data.common import IMAGENET_MEAN, IMAGENET_STD
from dyshuffle.models import create_model, list_models

timm = pytest.importorskip("timm")
from timm.data import create_transform, resolve_data_config, resolve_model_data_config  # noqa: E402

SIZES = {"cifar": 32, "imagenet": 224}


@pytest.mark.parametrize("stem", sorted(SIZES))
def test_every_model_names_its_input_and_its_modules(stem):
    size = SIZES[stem]
    for name in list_models():
        model = create_model(name, num_classes=10, stem=stem)
        cfg = model.pretrained_cfg
        assert model.default_cfg is cfg  # timm's older name, the same dict
        assert cfg["input_size"] == (3, size, size) and cfg["num_classes"] == 10
        assert cfg["mean"] == IMAGENET_MEAN and cfg["std"] == IMAGENET_STD
        assert cfg["crop_pct"] == (1.0 if stem == "cifar" else 0.875)
        assert cfg["interpolation"] == "bilinear" and cfg["url"] == ""
        first = model.get_submodule(cfg["first_conv"])
        assert isinstance(first, nn.Conv2d) and first.in_channels == 3, name
        # the first convolution the input meets: the stem's, as the body applies it
        assert cfg["first_conv"].split(".")[0] == model._body()[0][0].split(".")[0]
        assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
        reduction = model.feature_info[-1]["reduction"]
        assert cfg["pool_size"] == (size // reduction,) * 2
        data = resolve_data_config(model=model)
        assert data["input_size"] == (3, size, size), name
        assert data["crop_pct"] == cfg["crop_pct"] and data["mean"] == IMAGENET_MEAN
        assert resolve_model_data_config(model)["input_size"] == (3, size, size)


@pytest.mark.parametrize("stem", sorted(SIZES))
def test_the_configured_transform_feeds_the_model(stem):
    """timm's transform from the model's configuration makes inputs of the model's size, whose
    features have ``pool_size``."""
    from PIL import Image

    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem=stem).eval()
    transform = create_transform(**resolve_data_config(model=model))
    x = transform(Image.new("RGB", (300, 260), (120, 30, 200))).unsqueeze(0)
    assert tuple(x.shape[1:]) == model.pretrained_cfg["input_size"]
    with torch.no_grad():
        feats = model.forward_features(x)
    assert tuple(feats.shape[2:]) == model.pretrained_cfg["pool_size"]
    assert model(x).shape == (1, 10)


def test_in_chans_and_reset_classifier():
    model = create_model("mobilenet_v2", num_classes=5, stem="cifar", in_chans=1)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (1, 32, 32) and len(cfg["mean"]) == len(cfg["std"]) == 1
    assert cfg["mean"][0] == pytest.approx(sum(IMAGENET_MEAN) / 3)
    assert model.get_submodule(cfg["first_conv"]).in_channels == 1
    assert resolve_data_config(model=model)["input_size"] == (1, 32, 32)
    model.reset_classifier(3)
    assert model.pretrained_cfg["num_classes"] == model.default_cfg["num_classes"] == 3
    assert model.get_submodule(model.pretrained_cfg["classifier"]).out_features == 3
    model.reset_classifier(0)
    assert model.pretrained_cfg["num_classes"] == 0
    model.default_cfg = {"input_size": (1, 28, 28)}  # as timm's builder assigns it
    assert model.pretrained_cfg == {"input_size": (1, 28, 28)}
    assert "pretrained_cfg" not in str(model.state_dict().keys())


def test_timm_create_model_carries_it():
    for name, stem in (("shufflenet_v2_x1_0", "imagenet"), ("shufflenet_v1_g3_x0_5", "cifar")):
        model = timm.create_model(name, num_classes=7, stem=stem, mixer="dynamic")
        size = SIZES[stem]
        assert model.pretrained_cfg["input_size"] == (3, size, size)
        assert model.pretrained_cfg["num_classes"] == 7
        assert resolve_data_config(model=model)["input_size"] == (3, size, size)
        model.get_submodule(model.pretrained_cfg["first_conv"])
    model = timm.create_model(
        "mobilenet_v2", stem="cifar", pretrained_cfg_overlay=dict(crop_pct=0.9, mean=(0.5,) * 3)
    )
    assert model.pretrained_cfg["crop_pct"] == 0.9 and model.pretrained_cfg["mean"] == (0.5,) * 3
    assert resolve_data_config(model=model)["crop_pct"] == 0.9
    for feature_cls in ("getter", "list", "hook"):
        net = timm.create_model(
            "shufflenet_v2_x0_5", stem="cifar", features_only=True, feature_cls=feature_cls
        )
        assert net.default_cfg is net.pretrained_cfg
        assert net.pretrained_cfg["input_size"] == (3, 32, 32)
        assert "classifier" not in net.pretrained_cfg and "num_classes" not in net.pretrained_cfg
        assert resolve_data_config(model=net)["input_size"] == (3, 32, 32)


def test_our_feature_extractor_passes_both_on_to_its_model():
    """``create_model(..., features_only=True)``, without timm's wrappers."""
    net = create_model("shufflenet_v2_x0_5", stem="cifar", mixer="dynamic", features_only=True)
    assert net.pretrained_cfg["input_size"] == (3, 32, 32) and net.default_cfg == net.pretrained_cfg
    assert "classifier" not in net.pretrained_cfg and "num_classes" not in net.pretrained_cfg
    assert resolve_data_config(model=net)["input_size"] == (3, 32, 32)
    assert not net.model.grad_checkpointing
    net.set_grad_checkpointing()
    assert net.model.grad_checkpointing
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(
        net.train()(x), net.model.forward_intermediates(x, [0, 1, 2, 3, 4], intermediates_only=True)
    )


@pytest.mark.parametrize("stem", sorted(SIZES))
def test_pool_size_follows_the_pruned_body(stem):
    model = create_model("shufflenet_v2_x0_5", stem=stem, mixer="dynamic")
    size = SIZES[stem]
    before = model.pretrained_cfg["pool_size"]
    model.prune_intermediate_layers([0, 1, 2])  # the body ends after the third feature
    features = model.eval().forward_features(torch.randn(1, 3, size, size))
    assert model.pretrained_cfg["pool_size"] == tuple(features.shape[-2:])
    assert model.pretrained_cfg["pool_size"] != before
