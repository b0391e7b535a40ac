"""MAC and parameter counter: exact counts on small nets, published figures, dynamic overhead."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dyshuffle.layers import DynamicShuffle, StaticDynamicShuffle, permutation_mode
from dyshuffle.macs import count_macs, count_params, mac_breakdown, replaced_params
from dyshuffle.models import create_model

#: published MACs ("FLOPs") at 224x224: ShuffleNetV2 paper Table 8 / ShuffleNetV1 paper Table 2 /
#: MobileNetV2 paper Table 4
PUBLISHED_MACS = {
    "shufflenet_v2_x0_5": 41e6,
    "shufflenet_v2_x1_0": 146e6,
    "shufflenet_v2_x1_5": 299e6,
    "shufflenet_v2_x2_0": 591e6,
    "shufflenet_v1_g3_x1_0": 140e6,
    "mobilenet_v2": 300e6,
}


def generator_macs(model: nn.Module, batch: int) -> int:
    """MACs of the two ``nn.Linear`` of every dynamic generator, per batch."""
    total = 0
    for m in model.modules():
        if isinstance(m, DynamicShuffle) and hasattr(m, "generator"):
            first, last = m.generator[0], m.generator[2]
            assert (first.in_features, first.out_features) == (m.channels, m.hidden)
            assert (last.in_features, last.out_features) == (m.hidden, m.num_logits)
            total += batch * (m.channels * m.hidden + m.hidden * m.num_logits)
    return total


@pytest.mark.parametrize("name", sorted(PUBLISHED_MACS))
def test_macs_match_published_figures(name):
    macs = count_macs(create_model(name).eval(), (1, 3, 224, 224))
    assert abs(macs / PUBLISHED_MACS[name] - 1) < 0.03, f"{name}: {macs / 1e6:.1f} M"


def test_exact_counts_of_a_small_net():
    class Extra(nn.Module):
        def forward(self, x):
            return x * 2

        def extra_macs(self, input_shape):
            return 7 * input_shape[0]

    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # -> (8, 5, 5)
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 1, groups=4),  # -> (12, 5, 5), 2 inputs per output
        Extra(),
        nn.Conv2d(12, 12, 3, padding=1, groups=12),  # depthwise
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )
    n = 3
    expected = {
        "0": n * 8 * 5 * 5 * 3 * 9,
        "3": n * 12 * 5 * 5 * 2,
        "4": n * 7,
        "5": n * 12 * 5 * 5 * 9,
        "8": n * 5 * 12,
    }
    assert mac_breakdown(net, (n, 3, 10, 10)) == expected
    assert count_macs(net, (n, 3, 10, 10)) == sum(expected.values())
    assert count_params(net) == sum(p.numel() for p in net.parameters())
    net[0].weight.requires_grad_(False)
    assert count_params(net, trainable_only=True) == count_params(net) - 8 * 3 * 9


@pytest.mark.parametrize(
    ("name", "stem", "size"),
    [("shufflenet_v2_x1_0", "imagenet", 224), ("shufflenet_v1_g3_x0_5", "cifar", 32)],
)
def test_dynamic_overhead_is_exactly_the_generators(name, stem, size):
    shape = (2, 3, size, size)
    fixed = create_model(name, num_classes=10, stem=stem, mixer="shuffle").eval()
    dynamic = create_model(name, num_classes=10, stem=stem, mixer="dynamic").eval()
    overhead = count_macs(dynamic, shape) - count_macs(fixed, shape)
    assert overhead > 0
    assert overhead == generator_macs(dynamic, batch=2)
    # the hard permutation is a gather: no MACs of its own
    learned = create_model(name, num_classes=10, stem=stem, mixer="learned").eval()
    assert count_macs(learned, shape) == count_macs(fixed, shape)


def test_soft_permutations_add_their_kronecker_products():
    """ShuffleNetV2 0.5x, CIFAR stem, 32x32: units at 16x16 (48 ch), 8x8 (96), 4x4 (192)."""
    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="dynamic")
    model.eval()
    hard = count_macs(model, (1, 3, 32, 32))
    with permutation_mode(model, "soft"):
        soft = count_macs(model, (1, 3, 32, 32))
    kron = 0
    for m, (units, side) in zip(
        [next(u.mixer for u in stage) for stage in (model.stage2, model.stage3, model.stage4)],
        [(4, 16), (8, 8), (4, 4)],
    ):
        kron += units * m.channels * (m.a + m.b) * side * side
    assert soft - hard == kron > 0


def test_sds_counts_its_static_convolution_and_generator():
    layer = StaticDynamicShuffle(32, 64, groups=4).eval()  # 8 inputs per output
    macs = count_macs(layer, (2, 32, 6, 6))
    assert macs == 2 * 64 * 8 * 6 * 6 + generator_macs(layer, batch=2)
    sds = create_model("shufflenet_v2_x0_5", pointwise="sds").eval()
    conv = create_model("shufflenet_v2_x0_5", pointwise="conv").eval()
    assert count_macs(sds) < count_macs(conv)


def test_count_has_no_side_effects_and_scales_with_batch():
    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="dynamic")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = count_macs(model, (1, 3, 32, 32))
    four = count_macs(model, (4, 3, 32, 32))
    assert four == 4 * one
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics restored
    assert all(
        m.last_orthogonal_loss is None for m in model.modules() if isinstance(m, DynamicShuffle)
    )
    # no hooks left behind
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("size", [(3, 224, 224), (1, 3, 0, 32), (1, 3, 32.0, 32), "1x3x32x32"])
def test_bad_input_size_raises(size):
    with pytest.raises(ValueError, match="input_size"):
        count_macs(nn.Conv2d(3, 3, 1), size)


def test_model_table_command(tmp_path):
    from dyshuffle.tools.model_table import main

    out = tmp_path / "MODELS.md"
    assert main(["--models", "shufflenet_v2_x0_5", "--output", str(out)]) == 0
    text = out.read_text()
    assert "dyshuffle table --models 'shufflenet_v2_x0_5'" in text
    rows = [line for line in text.splitlines() if line.startswith("| `shufflenet_v2_x0_5` | conv")]
    assert len(rows) == 4  # params and MACs, two stems
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[2] == "1.367"  # torchvision's 1,366,792 parameters, fixed shuffle
    fixed = create_model("shufflenet_v2_x0_5", mixer="shuffle")
    dynamic = create_model("shufflenet_v2_x0_5", mixer="dynamic")
    overhead = 100 * (count_params(dynamic) / count_params(fixed) - 1)
    assert cells[7] == f"{overhead:+.2f}%"
    assert main(["--models", "shufflenet_v2_x0_5", "--output", str(out), "--check"]) == 0
    out.write_text(text.replace("1.367", "1.368"))
    assert main(["--models", "shufflenet_v2_x0_5", "--output", str(out), "--check"]) == 1
    assert main(["--models", "resnet*", "--output", str(out)]) == 2


def test_model_table_of_a_pattern_goes_to_standard_output_unless_a_file_is_named(
    tmp_path, monkeypatch, capsys
):
    """A partial table never replaces docs/MODELS.md unasked."""
    from dyshuffle.tools.model_table import main

    monkeypatch.chdir(tmp_path)
    assert main(["--models", "shufflenet_v2_x0_5"]) == 0
    assert "| `shufflenet_v2_x0_5` |" in capsys.readouterr().out
    assert not (tmp_path / "docs").exists()


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "mobilenet_v2"])
def test_replaced_params_are_the_replaced_pointwise_layers(name):
    conv = create_model(name, pointwise="conv")
    sds = create_model(name, pointwise="sds")
    before, after = replaced_params(conv, sds, StaticDynamicShuffle)
    # the two models differ only in those layers
    assert before - after == count_params(conv) - count_params(sds)
    # before: every 1x1 convolution that has an SDS at its name (counted by hand here)
    sds_names = {n for n, m in sds.named_modules() if isinstance(m, StaticDynamicShuffle)}
    convs = {n: m for n, m in conv.named_modules() if n in sds_names}
    assert all(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in convs.values())
    assert before == sum(m.weight.numel() for m in convs.values())
    assert 0 < after < before


def test_replaced_params_names_a_module_without_counterpart():
    original = nn.Sequential(nn.Conv2d(4, 4, 1))
    variant = nn.Sequential(nn.Identity(), StaticDynamicShuffle(4, 4))
    with pytest.raises(ValueError, match="'1'"):
        replaced_params(original, variant, StaticDynamicShuffle)
