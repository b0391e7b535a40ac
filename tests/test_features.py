"""Backbone features: feature_info, forward_intermediates, prune_intermediate_layers, features_only.

Every registered model, both stems, a fixed and a dynamic mixer: the intermediates are the
outputs of the modules ``feature_info`` names (caught with forward hooks), their shapes are what
``feature_info`` says, and ``create_model(features_only=True)`` and timm's extractors return them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dyshuffle.models import (
    STEMS,
    FeatureListNet,
    create_model,
    feature_take_indices,
    list_models,
)

#: input (H, W) per stem: the deepest feature (reduction 32 / 8) is 1 x 2; H != W catches a swap
SIZES = {"imagenet": (32, 64), "cifar": (16, 32)}
#: features per model family and stem (MobileNetV2, as timm's: the last block of each reduction,
#: so with the CIFAR stem the stem and the first two stages share one, then the last conv)
NUM_FEATURES = {
    ("shufflenet_v1", "imagenet"): 4,
    ("shufflenet_v1", "cifar"): 4,
    ("shufflenet_v2", "imagenet"): 5,
    ("shufflenet_v2", "cifar"): 5,
    ("mobilenet_v2", "imagenet"): 6,
    ("mobilenet_v2", "cifar"): 5,
}


def family(name: str) -> str:
    return name[:13]  # shufflenet_v1, shufflenet_v2 or mobilenet_v2


def dynamic_kwargs(name: str) -> dict:
    """The dynamic variant of ``name``: dynamic shuffles, or, in MobileNetV2 (no shuffle to
    replace), static-dynamic shuffles as its pointwise layers."""
    return {"pointwise": "sds"} if name == "mobilenet_v2" else {"mixer": "dynamic"}


#: one model per structure: every ShuffleNetV1 group count, ShuffleNetV2 at its narrowest and at
#: 2.0x (its wider last convolution), MobileNetV2; the widths only scale the channels, which
#: test_feature_info_is_timms_form checks for every registered model
REPRESENTATIVES = [
    *(f"shufflenet_v1_g{g}_x0_5" for g in (1, 2, 3, 4, 8)),
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x2_0",
    "mobilenet_v2",
]

CASES = [
    pytest.param(name, stem, dynamic, id=f"{name}-{stem}-{'dynamic' if dynamic else 'fixed'}")
    for name in REPRESENTATIVES
    for stem in STEMS
    for dynamic in (False, True)
]


def build(name: str, stem: str, dynamic: bool, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    extra = dynamic_kwargs(name) if dynamic else {}
    return create_model(name, num_classes=10, stem=stem, **extra, **kwargs)


def batch(stem: str, n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *SIZES[stem], generator=g)


def hooked_activations(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """``forward_features(x)`` and the outputs of the modules ``feature_info`` names."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(f["module"]).register_forward_hook(
            lambda m, i, o, name=f["module"]: seen.__setitem__(name, o.clone())
        )
        for f in model.feature_info
    ]
    try:
        out = model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return out, [seen[f["module"]] for f in model.feature_info]


def assert_shapes(feats: list, info: list[dict], x: torch.Tensor) -> None:
    assert len(feats) == len(info)
    for f, d in zip(feats, info):
        assert f.shape[:2] == (x.shape[0], d["num_chs"]), d
        h, w = x.shape[-2:]
        assert (h / f.shape[-2], w / f.shape[-1]) == (d["reduction"], d["reduction"]), d


# -- feature_info -----------------------------------------------------------------------------
@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("name", list_models())
def test_feature_info_is_timms_form(name, stem):
    model = create_model(name, num_classes=10, stem=stem)
    info = model.feature_info
    assert len(info) == NUM_FEATURES[family(name), stem]
    modules = dict(model.named_modules())
    prev = 1
    for d in info:
        assert set(d) >= {"num_chs", "reduction", "module"}
        assert d["module"] in modules and d["num_chs"] > 0 and d["reduction"] >= prev
        prev = d["reduction"]
    assert info[0]["reduction"] == (2 if stem == "imagenet" else 1)  # the stem's resolution
    assert info[-1]["reduction"] == (32 if stem == "imagenet" else 8)
    assert info[-1]["num_chs"] == model.num_features  # forward_features' output is the last
    x = batch(stem, n=1)
    with torch.no_grad():
        assert_shapes(model.eval().forward_intermediates(x)[1], info, x)  # every width


# -- forward_intermediates --------------------------------------------------------------------
@pytest.mark.parametrize(("name", "stem", "dynamic"), CASES)
def test_intermediates_are_the_named_modules_outputs(name, stem, dynamic):
    model = build(name, stem, dynamic).eval()
    x = batch(stem)
    with torch.no_grad():
        want_out, want = hooked_activations(model, x)  # a forward_features call
        out, feats = model.forward_intermediates(x)
        features_only = build(name, stem, dynamic, features_only=True).eval()(x)
    assert torch.equal(out, want_out)
    assert_shapes(feats, model.feature_info, x)
    for got in (feats, features_only):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@pytest.mark.parametrize("name", ["shufflenet_v1_g3_x0_5", "shufflenet_v2_x0_5", "mobilenet_v2"])
def test_indices_select_the_features(name):
    model = build(name, "cifar", True).eval()
    x = batch("cifar")
    n = len(model.feature_info)
    with torch.no_grad():
        _, every = model.forward_intermediates(x)
        for indices, take in [(2, [n - 2, n - 1]), ([0, -1], [0, n - 1]), ((-2, 1), [1, n - 2])]:
            out, feats = model.forward_intermediates(x, indices=indices, norm=True)
            assert torch.equal(out, every[-1])  # the whole body ran
            assert len(feats) == len(take)
            for f, i in zip(feats, take):
                assert torch.equal(f, every[i])
            early, feats = model.forward_intermediates(x, indices=indices, stop_early=True)
            assert torch.equal(early, every[take[-1]])
            only = model.forward_intermediates(x, indices=indices, intermediates_only=True)
            assert len(only) == len(take) and all(torch.equal(f, g) for f, g in zip(only, feats))
            assert feature_take_indices(n, indices) == (take, take[-1])


# -- prune_intermediate_layers and features_only ----------------------------------------------
@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_features_only_is_the_model_up_to_its_deepest_feature_and_trains(name):
    """Every parameter of the cut model gets a gradient from the features; nothing deeper is
    left in it (8 samples: see test_every_model_and_mixer_trains)."""
    ref = build(name, "cifar", True)
    features = build(name, "cifar", True, features_only=True, out_indices=(0, -2))
    assert isinstance(features, FeatureListNet)
    n = len(ref.feature_info)
    assert features.out_indices == (0, n - 2)
    names = [b for b, _ in ref._body()]
    kept = names[: names.index(ref.feature_info[n - 2]["module"]) + 1]
    expected = {f"model.{b}.{p}" for b in kept for p, _ in ref.get_submodule(b).named_parameters()}
    assert {p for p, _ in features.named_parameters()} == expected
    x = batch("cifar", n=8)
    feats = features(x)
    assert [f.shape[1] for f in feats] == features.feature_info.channels()
    assert features.feature_info.reduction() == [
        ref.feature_info[i]["reduction"] for i in (0, n - 2)
    ]
    g = torch.Generator().manual_seed(2)
    loss = sum((f * torch.randn(f.shape, generator=g)).sum() for f in feats)
    loss.backward()
    for pname, p in features.named_parameters():
        assert p.grad is not None, f"{pname} has no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["shufflenet_v1_g2_x0_5", "shufflenet_v2_x0_5", "mobilenet_v2"])
@pytest.mark.parametrize("stem", STEMS)
def test_prune_intermediate_layers(name, stem):
    model = build(name, stem, False).eval()
    x = batch(stem)
    with torch.no_grad():
        _, every = model.forward_intermediates(x)
    n = len(every)
    assert model.prune_intermediate_layers([-2, 0], prune_head=False) == [0, n - 2]
    deepest = model.feature_info[n - 2]
    assert model.num_features == deepest["num_chs"] and model.num_classes == 0
    assert isinstance(model.get_classifier(), nn.Identity)  # the head no longer fits
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), every[-2])
        assert model(x).shape == (2, deepest["num_chs"])
        _, feats = model.forward_intermediates(x, indices=[0, -2])
    assert torch.equal(feats[0], every[0]) and torch.equal(feats[1], every[-2])


def test_prune_keeps_the_head_when_the_body_is_whole():
    model = build("shufflenet_v2_x0_5", "cifar", False)
    assert model.prune_intermediate_layers(None, prune_head=False) == [0, 1, 2, 3, 4]
    assert model.num_classes == 10 and model.num_features == 1024
    model.prune_intermediate_layers([-1])
    assert model.num_classes == 0 and model.num_features == 1024


# -- bad arguments ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [(5,), -6, 0, 6, (0, 7), (1, -6), (1, 1), (1, -4), (), "1", (1.0,), (True,), 1.5],
    ids=repr,
)
def test_bad_out_indices_raise_value_error_naming_the_value(bad):
    with pytest.raises(ValueError, match="out_indices|feature index") as err:
        create_model("shufflenet_v2_x0_5", features_only=True, out_indices=bad)
    assert repr(bad) in str(err.value)
    model = create_model("shufflenet_v2_x0_5")
    with pytest.raises(ValueError, match="out_indices|feature index") as err:
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=bad)
    assert repr(bad) in str(err.value)
    with pytest.raises(ValueError, match="out_indices|feature index"):
        model.prune_intermediate_layers(bad)


def test_other_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match=r"out_indices=\(1, 2\) needs features_only=True"):
        create_model("shufflenet_v2_x0_5", out_indices=(1, 2))
    model = create_model("shufflenet_v2_x0_5")
    with pytest.raises(ValueError, match="'NHWC'"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NHWC")


# -- timm -------------------------------------------------------------------------------------
TIMM_CASES = [
    (name, stem, dynamic)
    for name in ["shufflenet_v1_g8_x0_5", "shufflenet_v2_x0_5", "mobilenet_v2"]
    for stem, dynamic in (("imagenet", False), ("cifar", True))
]


@pytest.mark.parametrize("feature_cls", [None, "list", "dict", "hook"])  # None: "getter"
@pytest.mark.parametrize(("name", "stem", "dynamic"), TIMM_CASES)
def test_timm_features_only_returns_the_intermediates(name, stem, dynamic, feature_cls):
    timm = pytest.importorskip("timm")
    from timm.models._features import FeatureInfo

    ref = build(name, stem, dynamic).eval()
    x = batch(stem)
    out_indices = (1, 2, -1)
    with torch.no_grad():
        _, want = ref.forward_intermediates(x, indices=out_indices)
    torch.manual_seed(0)
    extra = dynamic_kwargs(name) if dynamic else {}
    features = timm.create_model(
        name,
        num_classes=10,
        stem=stem,
        features_only=True,
        out_indices=out_indices,
        feature_cls=feature_cls,
        **extra,
    ).eval()
    with torch.no_grad():
        got = features(x)
    if isinstance(got, dict):
        got = list(got.values())
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert isinstance(features.feature_info, FeatureInfo)
    assert features.feature_info.channels() == [w.shape[1] for w in want]
    reductions = [ref.feature_info[i]["reduction"] for i in (1, 2, -1)]
    assert features.feature_info.reduction() == reductions


@pytest.mark.parametrize("name", list_models())
def test_timm_reads_our_feature_info_and_indices(name):
    pytest.importorskip("timm")
    from timm.models._features import FeatureInfo
    from timm.models._features import feature_take_indices as timm_take

    model = create_model(name)
    n = len(model.feature_info)
    info = FeatureInfo([dict(f) for f in model.feature_info], tuple(range(n)))  # its checks
    assert info.channels() == [f["num_chs"] for f in model.feature_info]
    for indices in (None, 1, 3, [0, 2], [-3, -1]):
        assert timm_take(n, indices) == feature_take_indices(n, indices)


def test_timm_features_only_bad_arguments():
    timm = pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"feature index 5 .*out of range"):
        timm.create_model("shufflenet_v2_x0_5", features_only=True, out_indices=(1, 5))
    with pytest.raises(ValueError, match="unknown feature_cls 'fx'"):
        timm.create_model("shufflenet_v2_x0_5", features_only=True, feature_cls="fx")
    with pytest.raises(ValueError, match="need features_only=True"):
        timm.create_model("shufflenet_v2_x0_5", out_indices=(1, 2))
