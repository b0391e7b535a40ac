"""Model zoo: registry, torchvision equivalence, every model x mixer trains, compile, bad input."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dyshuffle.layers import (
    ChannelShuffle,
    DynamicShuffle,
    IdentityMixer,
    LearnedShuffle,
    StaticDynamicShuffle,
    list_mixers,
    orthogonal_loss,
    permute_channels,
)
from dyshuffle.models import (
    MobileNetV2,
    ShuffleNetV1,
    ShuffleNetV2,
    ShuffleV1Unit,
    create_model,
    list_models,
    register_model,
    register_timm_models,
)
from dyshuffle.models.mobilenet_v2 import MOBILENET_V2_SETTINGS
from dyshuffle.models.shufflenet_v1 import _create_shufflenet_v1, shufflenet_v1_channels
from dyshuffle.models.shufflenet_v2 import (
    SHUFFLENET_V2_WIDTHS,
    InvertedResidual,
    _create_shufflenet_v2,
)

MIXERS = list_mixers()
MOBILENET_MIXERS = ("shuffle", "none")
TORCHVISION_V2_PARAMS = {
    "shufflenet_v2_x0_5": 1_366_792,
    "shufflenet_v2_x1_0": 2_278_604,
    "shufflenet_v2_x1_5": 3_503_624,
    "shufflenet_v2_x2_0": 7_393_996,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_mixer_cases() -> list[tuple[str, str, str]]:
    cases = []
    for name in list_models():
        mixers = MOBILENET_MIXERS if name == "mobilenet_v2" else MIXERS
        cases += [(name, mixer, "conv") for mixer in mixers]
    cases += [("shufflenet_v2_x0_5", mixer, "sds") for mixer in MIXERS]
    cases += [("mobilenet_v2", "shuffle", "sds")]
    return cases


# -- registry ---------------------------------------------------------------------------------
def test_registry_names_and_patterns():
    names = list_models()
    assert len(names) == 1 + 4 + 5 * 4
    assert names == sorted(names)
    assert list_models("shufflenet_v2_*") == [
        "shufflenet_v2_x0_5",
        "shufflenet_v2_x1_0",
        "shufflenet_v2_x1_5",
        "shufflenet_v2_x2_0",
    ]
    assert list_models("shufflenet_v1_g3_*") == [f"shufflenet_v1_g3_x{w}" for w in WIDTH_TAGS]
    assert len(list_models("shufflenet_v1_*_x1_0")) == 5
    assert list_models("mobilenet*") == ["mobilenet_v2"]
    assert list_models("resnet*") == []


WIDTH_TAGS = ("0_5", "1_0", "1_5", "2_0")


def test_duplicate_registration_raises():
    def shufflenet_v2_x1_0(**kwargs):  # same name as a registered builder
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="already registered"):
        register_model(shufflenet_v2_x1_0)
    assert create_model("shufflenet_v2_x1_0", num_classes=3).num_classes == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "shufflenet_v3"}, r"unknown model 'shufflenet_v3'.*shufflenet_v2_x0_5"),
        ({"name": "shufflenet_v2_x0_75"}, r"unknown model.*shufflenet_v2_x1_0"),
        ({"name": "shufflenet_v2_x1_0", "mixer": "magic"}, r"unknown mixer 'magic'.*dynamic"),
        ({"name": "shufflenet_v1_g3_x1_0", "mixer": 3}, r"mixer must be.*shuffle"),
        ({"name": "shufflenet_v2_x1_0", "stem": "cifar10"}, r"unknown stem 'cifar10'.*'cifar'"),
        ({"name": "mobilenet_v2", "pointwise": "dense"}, r"unknown pointwise 'dense'.*'sds'"),
        ({"name": "shufflenet_v2_x1_0", "num_classes": -1}, r"num_classes"),
        ({"name": "shufflenet_v2_x1_0", "in_chans": 0}, r"in_chans"),
        ({"name": "shufflenet_v1_g3_x1_0", "pointwise": "sds"}, r"pointwise='conv' only"),
        ({"name": "mobilenet_v2", "mixer": "dynamic"}, r"no channel shuffle.*'shuffle', 'none'"),
        ({"name": "mobilenet_v2", "tau": 0.5}, r"no mixer to take the options \['tau'\]"),
        ({"name": "shufflenet_v2_x0_5", "mixer": "shuffle", "tau": 0.5}, r"takes only the options"),
        ({"name": "shufflenet_v2_x0_5", "pointwise_kwargs": {"dynamic": 0}}, r"pointwise='sds'"),
        ({"name": "shufflenet_v1_g3_x0_5", "pointwise_kwargs": {"dynamic": 0}}, r"'conv' only"),
        (
            {"name": "shufflenet_v2_x0_5", "mixer_stages": [1, 4]},
            r"among \[2, 3, 4\], got \[1, 4\]",
        ),
        ({"name": "shufflenet_v1_g3_x0_5", "mixer_stages": []}, r"mixer_stages.*got \[\]"),
        (
            {"name": "shufflenet_v2_x0_5", "mixer": "dynamic", "mixer_descriptor": "unit"},
            r"unknown mixer_descriptor 'unit'.*'unit_input'",
        ),
        (
            {"name": "shufflenet_v2_x0_5", "mixer_descriptor": "unit_input"},
            r"mixer='shuffle' has none",
        ),
        (
            {"name": "shufflenet_v2_x0_5", "mixer": "learned", "mixer_descriptor": "unit_input"},
            r"mixer='learned' has none",
        ),
        (
            {"name": "shufflenet_v1_g3_x0_5", "mixer": "none", "mixer_descriptor": "unit_input"},
            r"mixer='none' has none",
        ),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(**kwargs)


def test_bad_width_and_groups_raise_value_error():
    with pytest.raises(ValueError, match=r"width 0.75; valid: 0.5, 1.0, 1.5, 2.0"):
        _create_shufflenet_v2(0.75)
    with pytest.raises(ValueError, match=r"width 3.0; valid: 0.5, 1.0, 1.5, 2.0"):
        _create_shufflenet_v1(3, 3.0)
    with pytest.raises(ValueError, match=r"groups 5; valid: 1, 2, 3, 4, 8"):
        _create_shufflenet_v1(5, 1.0)
    with pytest.raises(ValueError, match=r"groups=3 does not divide the 7 bottleneck"):
        ShuffleV1Unit(30, 30, 1, groups=3)
    with pytest.raises(ValueError, match=r"groups=3 does not divide the 80 input"):
        ShuffleV1Unit(80, 80, 1, groups=3)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        InvertedResidual(48, 48, 3)


# -- torchvision equivalence --------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TORCHVISION_V2_PARAMS))
def test_shufflenet_v2_parameter_count_equals_torchvision(name):
    model = create_model(name)
    tv = getattr(torchvision.models, name)(weights=None)
    assert n_params(model) == TORCHVISION_V2_PARAMS[name] == n_params(tv)
    # the same modules under the same names
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in tv.state_dict().items()
    }


def test_shufflenet_v2_x1_0_logits_equal_torchvision():
    torch.manual_seed(0)
    tv = torchvision.models.shufflenet_v2_x1_0(weights=None)
    with torch.no_grad():  # non-trivial BN statistics so that eval uses them
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model = create_model("shufflenet_v2_x1_0")
    model.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = model.eval()(x), tv.eval()(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_mobilenet_v2_equals_torchvision():
    model = create_model("mobilenet_v2")
    tv = torchvision.models.mobilenet_v2(weights=None)
    assert n_params(model) == n_params(tv) == 3_504_872
    state = {k.replace("classifier.1.", "fc."): v for k, v in tv.state_dict().items()}
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), tv.eval()(x), rtol=0, atol=0)


# -- structure: where the mixer and the SDS layers go ----------------------------------------------
def test_shufflenet_v2_mixer_after_every_unit_with_kwargs():
    model = create_model("shufflenet_v2_x1_0", mixer="dynamic", mode="soft", tau=0.5)
    units = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(units) == 4 + 8 + 4
    widths = [116] * 4 + [232] * 8 + [464] * 4
    assert [u.mixer.channels for u in units] == widths
    assert all(type(u.mixer) is DynamicShuffle for u in units)
    assert all(u.mixer.mode == "soft" and u.mixer.tau == 0.5 for u in units)
    assert sum(isinstance(m, DynamicShuffle) for m in model.modules()) == 16
    fixed = create_model("shufflenet_v2_x1_0")
    assert all(
        isinstance(u.mixer, ChannelShuffle) and u.mixer.groups == 2
        for u in fixed.modules()
        if isinstance(u, InvertedResidual)
    )


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "shufflenet_v1_g3_x0_5"])
@pytest.mark.parametrize("stages", [None, [3, 4]])
def test_unit_input_descriptor_gives_each_mixer_its_units_input(name, stages):
    """``mixer_descriptor="unit_input"``: every dynamic mixer's generator reads the input of its
    unit (``context_channels`` its width, the very tensor passed as the context) and applies the
    permutation that input chooses; the other stages keep the fixed shuffle; the model trains
    (every parameter a gradient), rebuilds from its ``model_args`` and compiles."""
    torch.manual_seed(0)
    kwargs = dict(num_classes=10, stem="cifar", mixer="dynamic", init="random")
    model = create_model(name, **kwargs, mixer_stages=stages, mixer_descriptor="unit_input")
    unit = InvertedResidual if name.startswith("shufflenet_v2") else ShuffleV1Unit
    units = [u for u in model.modules() if isinstance(u, unit)]
    chosen = [u for u in units if isinstance(u.mixer, DynamicShuffle)]
    assert len(chosen) == (16 if stages is None else 12)
    assert all(isinstance(u.mixer, ChannelShuffle) for u in units if u not in chosen)
    for u in chosen:  # large generator weights: the inputs choose different permutations
        for p in u.mixer.generator.parameters():
            nn.init.normal_(p, 0.0, 10.0 / p.shape[-1] ** 0.5)
    unit_inputs, checks, distinct = {}, [], []

    def record(unit, args):
        unit_inputs[unit.mixer] = args[0]

    def check(mixer, args, kw, out):
        context = unit_inputs[mixer]
        assert mixer.context_channels == context.shape[1]  # (a stage's first unit: narrower)
        idx = mixer.permutation(*args, context=context)
        distinct.append(len(torch.unique(idx, dim=0)))
        checks.append(
            kw["context"] is context and torch.equal(out, permute_channels(torch.cat(args, 1), idx))
        )

    hooks = [u.register_forward_pre_hook(record) for u in chosen]
    hooks += [u.mixer.register_forward_hook(check, with_kwargs=True) for u in chosen]
    x = torch.randn(8, 3, 32, 32)
    model.train()(x).sum().backward()
    for h in hooks:
        h.remove()
    assert len(checks) == len(chosen) and all(checks), checks
    assert sum(d > 1 for d in distinct) >= len(chosen) / 2, distinct
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    rebuilt = create_model(**model.model_args)
    assert rebuilt.model_args["mixer_descriptor"] == "unit_input"
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))
    assert_compiled_equals_eager(model)


@pytest.mark.parametrize("name", ["shufflenet_v2_x1_0", "shufflenet_v1_g3_x0_5"])
def test_mixer_stages_choose_the_units_that_get_the_mixer(name):
    unit = InvertedResidual if name.startswith("shufflenet_v2") else ShuffleV1Unit
    groups = 2 if unit is InvertedResidual else 3
    model = create_model(name, mixer="dynamic", mixer_stages=[2, 4], tau=0.5)
    for stage, want in ((2, DynamicShuffle), (3, ChannelShuffle), (4, DynamicShuffle)):
        mixers = [u.mixer for u in getattr(model, f"stage{stage}") if isinstance(u, unit)]
        assert mixers and all(type(m) is want for m in mixers)
        if want is DynamicShuffle:  # the mixer's keywords go to the chosen stages only
            assert all(m.tau == 0.5 for m in mixers)
        else:
            assert all(m.groups == groups for m in mixers)
    assert model.model_args["mixer_stages"] == [2, 4]
    rebuilt = create_model(**model.model_args)  # what checkpoints and exports rebuild
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in model.modules()]
    every = create_model(name, mixer="dynamic", mixer_stages=(2, 3, 4))
    default = create_model(name, mixer="dynamic")
    assert [type(m) for m in every.modules()] == [type(m) for m in default.modules()]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_shufflenet_v2_dynamic_inference_scatters_the_halves_exactly(layout, monkeypatch):
    """In eager inference each dynamic layer writes the unit's halves straight to their permuted
    channels (no concatenation); the logits equal the concatenate-then-gather path's exactly.
    With ``fused`` (the default) the fused kernel does that where it can (channels_last), with
    the same logits."""
    import dyshuffle.layers.dynamic as dynamic_module

    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", stem="cifar", num_classes=10, mixer="dynamic")
    layers = [m for m in model.modules() if isinstance(m, DynamicShuffle)]
    for m in layers:  # random generators: the samples choose different permutations
        for p in m.generator.parameters():
            nn.init.normal_(p, 0.0, 3.0 / p.shape[-1] ** 0.5)
    model = model.eval().to(memory_format=layout)
    x = torch.randn(6, 3, 32, 32).contiguous(memory_format=layout)
    calls = []
    real = dynamic_module._scatter_channels
    monkeypatch.setattr(
        dynamic_module, "_scatter_channels", lambda p, inv: calls.append(len(p)) or real(p, inv)
    )
    with torch.no_grad():
        fused = model(x)
        for m in layers:
            m.fused = False
        fast = model(x)
    with torch.enable_grad():  # autograd: the concatenation and one gather per layer
        ref = model(x.clone().requires_grad_(True))
    assert calls == ([2] * len(layers) if layout == torch.channels_last else [])
    assert torch.equal(fast, ref.detach())
    assert torch.equal(fused, ref.detach())
    varied = [
        len({tuple(r) for r in m.permutation(*[torch.randn(6, m.channels, 4, 4)]).tolist()})
        for m in layers
    ]
    assert max(varied) > 1


def test_identity_learned_layers_train_the_network_of_the_fixed_group_shuffle():
    """A learned layer on its identity factors is the fixed shuffle over its G groups: the same
    logits and, for every other weight, the same gradients (its logits take the regularizer's
    gradient, not the trunk's). So it starts, and stays while no choice flips, the network of
    mixer="shuffle" with groups="auto"; a dynamic layer differs in its descriptor's gradient."""
    x = torch.randn(4, 3, 32, 32)
    models = {}
    for mixer, kwargs in (("learned", {}), ("shuffle", {"groups": "auto"}), ("dynamic", {})):
        torch.manual_seed(0)
        models[mixer] = create_model(
            "shufflenet_v2_x0_5", stem="cifar", num_classes=10, mixer=mixer, **kwargs
        ).train()
    # the same trunk weights everywhere (the generators draw from the random stream too)
    missing, unexpected = models["dynamic"].load_state_dict(
        models["shuffle"].state_dict(), strict=False
    )
    assert not unexpected and all(".mixer." in k for k in missing)
    grads = {}
    for mixer, model in models.items():
        logits = model(x)
        loss = F.cross_entropy(logits, torch.arange(4)) + 0.1 * orthogonal_loss(model)
        names = [n for n, _ in model.named_parameters() if ".mixer." not in n]
        params = dict(model.named_parameters())
        grads[mixer] = (logits, torch.autograd.grad(loss, [params[n] for n in names]), names)
    learned, fixed, dynamic = grads["learned"], grads["shuffle"], grads["dynamic"]
    assert learned[2] == fixed[2] == dynamic[2]  # the same trunk, mixers left out
    assert torch.equal(learned[0], fixed[0]) and torch.equal(dynamic[0], fixed[0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(learned[1], fixed[1]))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(dynamic[1], fixed[1]))


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 8])
def test_shufflenet_v1_mixer_after_first_pointwise(groups):
    model = create_model(f"shufflenet_v1_g{groups}_x1_0")
    units = [m for m in model.modules() if isinstance(m, ShuffleV1Unit)]
    assert len(units) == 16
    base = {1: 144, 2: 200, 3: 240, 4: 272, 8: 384}[groups]
    assert model.stage_channels == (24, base, 2 * base, 4 * base)
    for i, u in enumerate(units):
        assert isinstance(u.mixer, ChannelShuffle) and u.mixer.groups == groups
        # the first 1x1 conv is grouped except in the very first unit; the last always is
        assert u.conv1[0].groups == (1 if i == 0 else groups)
        assert u.conv3[0].groups == groups
        assert u.conv1[0].out_channels == u.conv3[0].in_channels  # the mixer keeps the width
    learned = create_model(f"shufflenet_v1_g{groups}_x1_0", mixer="learned", stem="cifar")
    mixers = [u.mixer for u in learned.modules() if isinstance(u, ShuffleV1Unit)]
    assert all(type(m) is LearnedShuffle for m in mixers)
    assert [m.channels for m in mixers] == [base // 4] * 4 + [base // 2] * 8 + [base] * 4


@pytest.mark.parametrize("cls", [ShuffleNetV1, ShuffleNetV2, MobileNetV2])
def test_no_model_argument_shadows_a_mixer_option(cls):
    """Mixer options arrive as ``**mixer_kwargs``: a model argument of the same name would take
    them (ShuffleNetV1's ``groups`` did)."""
    options = set(inspect.signature(DynamicShuffle).parameters)
    options |= set(inspect.signature(StaticDynamicShuffle).parameters)
    model_args = set(inspect.signature(cls).parameters) - {"mixer_kwargs", "pointwise_kwargs"}
    assert not model_args & options


def test_shufflenet_v1_passes_the_mixers_groups_to_the_mixer():
    """``groups`` is the mixer's keyword; the model's own grouping is ``conv_groups``."""
    model = create_model("shufflenet_v1_g3_x0_5", stem="cifar", mixer="dynamic", groups=3)
    units = [m for m in model.modules() if isinstance(m, ShuffleV1Unit)]
    assert model.conv_groups == 3 and all(u.conv3[0].groups == 3 for u in units)
    assert [u.mixer.groups for u in units] == [3] * 16
    assert [u.mixer.a * u.mixer.b for u in units] == [10] * 4 + [20] * 8 + [40] * 4
    auto = create_model("shufflenet_v1_g3_x0_5", mixer="shuffle", groups="auto")
    assert [u.mixer.groups for u in auto.modules() if isinstance(u, ShuffleV1Unit)] == (
        [2] * 4 + [4] * 8 + [8] * 4
    )  # a DynamicShuffle's G for 30, 60 and 120 channels at max_group_size 16
    with pytest.raises(ValueError, match="conv_groups must be a positive integer, got 0"):
        ShuffleNetV1(conv_groups=0, stage_channels=(24, 120, 240, 480))


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("width", [0.5, 1.0, 1.5, 2.0])
def test_shufflenet_v1_channels_divide_their_groups(groups, width):
    stem, *stages = shufflenet_v1_channels(groups, width)
    assert stem % groups == 0 and all(c % (4 * groups) == 0 for c in stages)
    assert stages[1] == 2 * stages[0] and stages[2] == 4 * stages[0]
    base = {1: 144, 2: 200, 3: 240, 4: 272, 8: 384}[groups] * width
    assert abs(stages[0] - base) <= 2 * groups  # the nearest multiple of 4 g
    assert abs(stem - 24 * width) <= groups / 2


def test_shufflenet_v2_sds_replaces_every_branch_pointwise():
    model = create_model("shufflenet_v2_x1_0", pointwise="sds", pointwise_kwargs={"mode": "soft"})
    sds = [m for m in model.modules() if isinstance(m, StaticDynamicShuffle)]
    assert len(sds) == 16 * 2 + 3  # two per unit, one more in each down-sampling branch
    assert all(m.permute.mode == "soft" for m in sds)
    rect = [(m.in_channels, m.out_channels) for m in sds if not m.square]
    assert rect == [(24, 58)] * 2  # both branches of the first unit change the width
    for unit in (m for m in model.modules() if isinstance(m, InvertedResidual)):
        convs = [c for c in unit.modules() if isinstance(c, nn.Conv2d)]
        assert all(c.groups == c.in_channels and c.kernel_size == (3, 3) for c in convs)
    # conv5 (1x1, outside the branches) and the stem stay convolutions
    assert isinstance(model.conv5[0], nn.Conv2d) and model.conv5[0].kernel_size == (1, 1)
    assert n_params(model) < n_params(create_model("shufflenet_v2_x1_0"))


def test_mobilenet_v2_sds_replaces_block_pointwise():
    model = create_model("mobilenet_v2", pointwise="sds")
    sds = [m for m in model.modules() if isinstance(m, StaticDynamicShuffle)]
    assert len(sds) == 1 + 2 * 16  # first block has no expansion
    assert all(not m.square for m in sds)  # every MobileNetV2 1x1 changes the width
    pointwise = [
        m
        for m in model.features[1:-1].modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert pointwise == []
    static = create_model("mobilenet_v2", pointwise="sds", pointwise_kwargs={"dynamic": False})
    assert not any(isinstance(m, DynamicShuffle) for m in static.modules())
    assert n_params(static) < n_params(model) < n_params(create_model("mobilenet_v2"))


def test_mobilenet_v2_mixer_none_is_the_same_network():
    a = create_model("mobilenet_v2", mixer="none", stem="cifar")
    b = create_model("mobilenet_v2", mixer="shuffle", stem="cifar")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


# -- stems and the model interface --------------------------------------------------------------
@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "shufflenet_v1_g3_x0_5", "mobilenet_v2"])
def test_stems_output_resolution(name):
    cifar = create_model(name, num_classes=10, stem="cifar", in_chans=1).eval()
    imagenet = create_model(name, num_classes=10, stem="imagenet").eval()
    with torch.no_grad():
        assert cifar.forward_features(torch.randn(1, 1, 32, 32)).shape[-2:] == (4, 4)
        assert cifar.forward_features(torch.randn(1, 1, 64, 64)).shape[-2:] == (8, 8)
        assert imagenet.forward_features(torch.randn(1, 3, 224, 224)).shape[-2:] == (7, 7)
    assert not any(isinstance(m, nn.MaxPool2d) for m in cifar.modules())


@pytest.mark.parametrize(
    ("name", "mixer"),
    [
        ("shufflenet_v2_x0_5", "dynamic"),
        ("shufflenet_v1_g8_x0_5", "learned"),
        ("mobilenet_v2", "none"),
    ],
)
def test_model_interface(name, mixer):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, stem="cifar", mixer=mixer).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (3, model.num_features, 4, 4)
        logits = model(x)
        torch.testing.assert_close(logits, model.forward_head(feats), rtol=0, atol=0)
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pre, feats.mean(dim=(2, 3)))
        torch.testing.assert_close(logits, model.get_classifier()(pre))
    assert logits.shape == (3, 7)
    model.reset_classifier(4)
    assert model.num_classes == 4 and model.model_args["num_classes"] == 4
    assert model(x).shape == (3, 4)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(x).shape == (3, model.num_features)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-2)


def test_model_args_rebuild_the_model():
    kwargs = dict(
        num_classes=5,
        stem="cifar",
        mixer="dynamic",
        pointwise="sds",
        in_chans=1,
        mode="soft",
        tau=0.7,
        pointwise_kwargs={"reduction": 2},
    )
    model = create_model("shufflenet_v2_x0_5", **kwargs)
    assert model.model_args == {"name": "shufflenet_v2_x0_5", **kwargs}
    rebuilt = create_model(**model.model_args)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x), rtol=0, atol=0)
    for name in list_models():
        assert create_model(name, num_classes=2, stem="cifar").model_args == {
            "name": name,
            "num_classes": 2,
            "stem": "cifar",
            "mixer": "shuffle",
            "pointwise": "conv",
            "in_chans": 3,
        }


def test_callable_mixer_and_builders_decide_no_device_or_dtype():
    seen = []

    def mixer(channels, **kwargs):
        seen.append(channels)
        return IdentityMixer()

    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer=mixer)
    assert seen == [48] * 4 + [96] * 8 + [192] * 4
    assert {p.dtype for p in model.parameters()} == {torch.get_default_dtype()}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert all(m.training for m in model.modules())


# -- every model x every mixer ---------------------------------------------------------------
@pytest.mark.parametrize(("name", "mixer", "pointwise"), model_mixer_cases())
def test_every_model_and_mixer_trains(name, mixer, pointwise):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, stem="cifar", mixer=mixer, pointwise=pointwise)
    # 8 samples: with 2, all 8 hidden units of a narrow generator can be inactive (ReLU) for
    # both, which leaves its first layer without gradient by chance, not by wiring
    x = torch.randn(8, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
    loss = F.cross_entropy(logits, torch.arange(8)) + 0.1 * orthogonal_loss(model)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


def shallow_model(kind: str, mixer: str, pointwise: str) -> nn.Module:
    """A registered architecture with one unit per stage (the same code, a quarter of the graph)."""
    if kind == "mobilenet_v2":
        settings = [(t, c, 1, s) for t, c, _, s in MOBILENET_V2_SETTINGS]
        return MobileNetV2(settings, 10, "cifar", mixer, pointwise)
    return ShuffleNetV2((1, 1, 1), SHUFFLENET_V2_WIDTHS[0.5], 10, "cifar", mixer, pointwise)


def assert_compiled_equals_eager(
    model: nn.Module, memory_format: torch.memory_format = torch.contiguous_format
) -> None:
    torch._dynamo.reset()
    model.eval().to(memory_format=memory_format)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=memory_format)
    # aot_eager: dynamo capture (one graph, no breaks) and AOT autograd tracing; inductor's C++
    # code generation costs minutes per model on the 2-core CI machine
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "shufflenet_v1_g3_x0_5"])
def test_compile_equals_eager(name):
    torch.manual_seed(0)
    assert_compiled_equals_eager(create_model(name, num_classes=10, stem="cifar", mixer="dynamic"))


@pytest.mark.parametrize(
    ("kind", "mixer", "pointwise"),
    [("shufflenet_v2", m, "conv") for m in MIXERS if m != "dynamic"]
    + [("shufflenet_v2", "none", "sds"), ("mobilenet_v2", "shuffle", "sds")],
)
def test_compile_equals_eager_every_mixer(kind, mixer, pointwise):
    torch.manual_seed(0)
    assert_compiled_equals_eager(shallow_model(kind, mixer, pointwise))


def test_compile_equals_eager_channels_last():
    """The static-dynamic shuffles' fixed shuffle of a channels_last input keeps its layout in
    the compiled graph as it does eagerly (the fake ``channel_shuffle`` of torch 2.14 says NCHW:
    the next layer's view of the real output failed)."""
    torch.manual_seed(0)
    model = shallow_model("mobilenet_v2", "shuffle", "sds")
    assert_compiled_equals_eager(model, torch.channels_last)


# -- timm -------------------------------------------------------------------------------------
def test_timm_creates_our_models():
    timm = pytest.importorskip("timm")
    model = timm.create_model("shufflenet_v2_x1_0", num_classes=10, stem="cifar", mixer="dynamic")
    assert isinstance(model, ShuffleNetV2)
    assert model.model_args["mixer"] == "dynamic" and model.num_classes == 10
    assert isinstance(timm.create_model("shufflenet_v1_g3_x0_5"), ShuffleNetV1)
    assert isinstance(timm.create_model("mobilenet_v2", pointwise="sds"), MobileNetV2)
    assert set(list_models()) <= set(timm.list_models())
    assert not isinstance(timm.create_model("mobilenetv2_035"), MobileNetV2)  # timm's own
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("shufflenet_v2_x0_5", pretrained=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "overwriting" warning: known names are skipped
        assert register_timm_models() == []


def test_timm_registration_without_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes "import timm" raise ImportError
    monkeypatch.setitem(sys.modules, "timm.models", None)
    assert register_timm_models() == []


def test_timm_imported_after_dyshuffle():
    pytest.importorskip("timm")
    code = (
        "import sys, dyshuffle.models\n"
        "assert 'timm' not in sys.modules\n"
        "import timm\n"
        "m = timm.create_model('shufflenet_v2_x0_5', num_classes=3)\n"
        "print(type(m).__name__, m.num_classes)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ShuffleNetV2", "3"]
