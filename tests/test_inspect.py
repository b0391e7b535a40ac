"""Inspection of the chosen permutations: exact counts on a model whose choices are known.

The model's first dynamic layer picks one of two permutations from the sign of input channel 0;
its second always picks the same one. The counts, the information measures and the
orthogonality errors are then known in closed form.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dyshuffle.deploy.inspect import collect_statistics, write_report
from dyshuffle.layers import DynamicShuffle

SIGN_SCALE = 10.0  # logit scale of the sign-controlled factor
B_LOGIT = 5.0  # identity logit of the fixed second factor of layer 0


def sign_layer() -> DynamicShuffle:
    """4 channels, one group of 2 x 2: A is the identity for mean(x_0) > 0, the swap below 0."""
    layer = DynamicShuffle(4, groups=1, factors=(2, 2), reduction=1, min_hidden=2)
    first, last = layer.generator[0], layer.generator[-1]
    assert layer.hidden == 4 and last.out_features == 8
    with torch.no_grad():
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, 0], first.weight[1, 0] = 1.0, -1.0  # h0 = relu(z0), h1 = relu(-z0)
        last.weight.zero_()
        # A logits (row-major 2 x 2): [[s h0, s h1], [s h1, s h0]]
        last.weight[0, 0] = last.weight[3, 0] = SIGN_SCALE
        last.weight[1, 1] = last.weight[2, 1] = SIGN_SCALE
        last.bias.copy_(torch.tensor([0, 0, 0, 0, B_LOGIT, 0, 0, B_LOGIT]))
    return layer


def constant_layer() -> DynamicShuffle:
    """4 channels, 2 groups of 1 x 2, input-independent identity logits (2 on the diagonal)."""
    layer = DynamicShuffle(4, groups=2, factors=(1, 2))
    with torch.no_grad():
        layer.generator[-1].weight.zero_()  # bias keeps the identity init: logits 2 * I
    return layer


class SignModel(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.first = sign_layer()
        self.second = constant_layer()
        self.head = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.first(x)).mean(dim=(2, 3)))


IDENTITY = (0, 1, 2, 3)
SWAP = (2, 3, 0, 1)  # alpha = [1, 0], beta = [0, 1]: pi[i * 2 + j] = alpha[i] * 2 + beta[j]
CROSS = (0, 2, 1, 3)  # 2 groups of 2, identity inside, then the cross-group shuffle

# class -> (samples with x_0 > 0, samples with x_0 < 0)
SIGNS = {0: (6, 0), 1: (1, 3), 2: (0, 5)}
COUNTS = np.array([[6, 1, 0], [0, 3, 5]])  # rows IDENTITY, SWAP; columns classes


def sign_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xs, ys, zs = [], [], []
    for label, (pos, neg) in SIGNS.items():
        for sign in [1.0] * pos + [-1.0] * neg:
            z0 = sign * (0.2 + torch.rand((), generator=gen).item())  # |mean(x_0)| in [0.2, 1.2]
            x = torch.randn(4, 3, 3, generator=gen)
            x[0] = x[0] - x[0].mean() + z0
            xs.append(x)
            ys.append(label)
            zs.append(z0)
    order = torch.randperm(len(ys), generator=gen)
    return torch.stack(xs)[order], torch.tensor(ys)[order], torch.tensor(zs)[order]


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 4):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def mutual_information(counts: np.ndarray) -> float:
    p = counts / counts.sum()
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / (px @ py)[nz])).sum())


def orth_error_2x2(p: np.ndarray) -> np.ndarray:
    """||A A^T - I||^2 of [[p, 1-p], [1-p, p]] (and of its row swap): 16 p^2 (1-p)^2."""
    return 16 * p**2 * (1 - p) ** 2


def sigmoid(v: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-v))


@pytest.fixture(scope="module")
def collected():
    torch.manual_seed(0)
    model = SignModel(3)
    x, y, z = sign_data()
    stats = collect_statistics(model, batches(x, y), ["zero", "one", "two"], num_examples=2)
    return model, stats, x, y, z


def test_construction_is_what_the_test_assumes(collected):
    model, _, x, _, z = collected
    perms = model.first.permutation(x)
    expected = torch.tensor([IDENTITY if v > 0 else SWAP for v in z.tolist()])
    assert torch.equal(perms, expected)
    assert torch.equal(model.second.permutation(x), torch.tensor([CROSS] * len(x)))


def test_counts_per_layer_and_class(collected):
    _, stats, *_ = collected
    assert stats.num_samples == sum(p + n for p, n in SIGNS.values())
    first, second = stats.layer("first"), stats.layer("second")
    assert (first.channels, first.groups, first.a, first.b) == (4, 1, 2, 2)
    assert first.distinct == 2 and second.distinct == 1
    rows = [first.permutations.index(IDENTITY), first.permutations.index(SWAP)]
    np.testing.assert_array_equal(first.counts[rows], COUNTS)
    assert second.permutations == [CROSS]
    np.testing.assert_array_equal(second.counts, COUNTS.sum(0, keepdims=True))
    ids, freq = first.frequencies()
    assert first.permutations[ids[0]] == SWAP  # 8 of 15
    np.testing.assert_allclose(freq, [8 / 15, 7 / 15])
    # identity factors: IDENTITY for the single group of the first layer (7 of 15 samples),
    # the cross-group shuffle alone for the second (all)
    assert first.reference == IDENTITY and second.reference == CROSS
    assert first.identity_share == pytest.approx(7 / 15) and second.identity_share == 1.0


def test_information_measures(collected):
    _, stats, *_ = collected
    first, second = stats.layer("first"), stats.layer("second")
    assert first.entropy() == pytest.approx(
        -(8 / 15) * math.log2(8 / 15) - (7 / 15) * math.log2(7 / 15)
    )
    assert first.mutual_information() == pytest.approx(mutual_information(COUNTS))
    assert second.entropy() == 0.0 and second.mutual_information() == pytest.approx(0.0)
    np.testing.assert_allclose(second.class_divergence(), 0.0, atol=1e-12)
    # per class: KL(p(perm | class) || p(perm)), by hand
    p_perm = COUNTS.sum(1) / COUNTS.sum()
    for k in range(3):
        q = COUNTS[:, k] / COUNTS[:, k].sum()
        kl = sum(qi * math.log2(qi / pi) for qi, pi in zip(q, p_perm) if qi > 0)
        assert first.class_divergence()[k] == pytest.approx(kl)
    np.testing.assert_allclose(first.modal_fraction(), [1.0, 3 / 4, 1.0])


def test_orthogonality_errors_in_closed_form(collected):
    _, stats, _, _, z = collected
    first, second = stats.layer("first"), stats.layer("second")
    # second: A is 1 x 1 (error 0), B = softmax rows of 2 * I, the same for every sample
    p = sigmoid(np.array(2.0))
    assert second.ortho_count == 2 * stats.num_samples
    assert second.ortho_min == pytest.approx(0.0, abs=1e-12)
    assert second.ortho_max == pytest.approx(orth_error_2x2(p), rel=1e-5)
    assert second.ortho_mean == pytest.approx(orth_error_2x2(p) / 2, rel=1e-5)
    # first: A from the sign logit (s |z0| on the chosen entries), B from the fixed logits
    a_err = orth_error_2x2(sigmoid(SIGN_SCALE * np.abs(z.numpy().astype(np.float64))))
    b_err = orth_error_2x2(sigmoid(np.array(B_LOGIT)))
    assert first.ortho_mean == pytest.approx((a_err.mean() + b_err) / 2, rel=1e-4)
    assert first.ortho_max == pytest.approx(max(a_err.max(), b_err), rel=1e-4)
    assert first.ortho_hist.sum() == first.ortho_count == 2 * stats.num_samples


def test_decision_margins_in_closed_form(collected):
    _, stats, _, _, z = collected
    first, second = stats.layer("first"), stats.layer("second")
    # a 2 x 2 factor with p on its chosen entries scores 2p against 2(1 - p): gap
    # 2 |2p - 1| = 2 tanh(logit / 2); the margin is the smaller gap of the two factors
    a_gap = 2 * np.tanh(SIGN_SCALE * np.abs(z.numpy().astype(np.float64)) / 2)
    b_gap = 2 * np.tanh(B_LOGIT / 2)
    np.testing.assert_allclose(first.margins, np.minimum(a_gap, b_gap), rtol=1e-5)
    assert first.margin_summary() == pytest.approx(
        (np.minimum(a_gap, b_gap).min(), np.median(np.minimum(a_gap, b_gap)), b_gap), rel=1e-5
    )
    # second: A is 1 x 1 (no choice), B has logits 2 * I for every sample
    np.testing.assert_allclose(second.margins, np.full(stats.num_samples, 2 * np.tanh(1.0)))


def test_logit_spread_in_closed_form(collected):
    _, stats, _, _, z = collected
    first, second = stats.layer("first"), stats.layer("second")
    # first: A logits [s|z|, 0, 0, s|z|] for z > 0, [0, s|z|, s|z|, 0] below; B fixed [5, 0, 0, 5]
    zs = z.numpy().astype(np.float64)
    big = SIGN_SCALE * np.abs(zs)
    a_logits = np.stack([big * (zs > 0), big * (zs < 0), big * (zs < 0), big * (zs > 0)], 1)
    want_std = (a_logits.std(axis=0).sum() + 0.0) / 8  # the 4 B logits do not move
    assert first.logit_std == pytest.approx(want_std, rel=1e-5)
    # rows: each A row spans s|z|, each B row 5
    assert first.logit_range == pytest.approx(((2 * big + 2 * B_LOGIT) / 4).mean(), rel=1e-5)
    # second: input-independent logits; A is 1 x 1 (no row to range over), B rows [2, 0]
    assert second.logit_std == pytest.approx(0.0, abs=1e-9)
    assert second.logit_range == pytest.approx(2.0)


def test_examples_keep_their_permutations(collected):
    _, stats, x, y, z = collected
    assert [e.label for e in stats.examples] == list(dict.fromkeys(y.tolist()))[:2]
    for ex in stats.examples:
        i = next(i for i in range(len(y)) if torch.equal(x[i], ex.image))
        assert tuple(ex.permutations["first"].tolist()) == (IDENTITY if z[i] > 0 else SWAP)
        assert tuple(ex.permutations["second"].tolist()) == CROSS


def test_max_samples_stops_early():
    torch.manual_seed(0)
    x, y, _ = sign_data()
    stats = collect_statistics(SignModel(3), batches(x, y, 4), ["a", "b", "c"], max_samples=6)
    assert stats.num_samples == 6
    assert stats.layer("first").counts.sum() == 6
    np.testing.assert_array_equal(stats.layer("first").counts.sum(1).sum(), 6)


def test_rejects_models_without_dynamic_layers_and_bad_labels():
    with pytest.raises(ValueError, match="no dynamic shuffle layer"):
        collect_statistics(nn.Conv2d(3, 3, 1), [(torch.zeros(1, 3, 2, 2), torch.zeros(1))], ["a"])
    x, y, _ = sign_data()
    with pytest.raises(ValueError, match="out of range for 2 classes"):
        collect_statistics(SignModel(2), batches(x, y), ["a", "b"])


def _image_stats(path) -> tuple[float, int]:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return float(arr.var()), len(np.unique(arr.reshape(-1, 3), axis=0))


def test_report_and_figures(collected, tmp_path):
    _, stats, *_ = collected
    report = write_report(
        stats, tmp_path / "out", context=["unit test"], mean=(0.0,) * 4, std=(1.0,) * 4
    )
    text = report.read_text()
    names = [
        "permutation_counts.png",
        "class_dependence.png",
        "orthogonality.png",
        "decision_margins.png",
        "examples.png",
    ]
    for name in names:
        path = tmp_path / "out" / name
        assert path.is_file(), name
        variance, colors = _image_stats(path)
        assert variance > 0 and colors > 2, name
        assert f"]({name})" in text
    # the table row of each layer: name, C, G x (a x b), distinct, top frequencies, identity
    assert "| `first` | 4 | 1 x (2 x 2) | 2 | 53.3%, 46.7% | 46.7% |" in text
    assert "| `second` | 4 | 2 x (1 x 2) | 1 | 100.0% | 100.0% |" in text
    assert f"{mutual_information(COUNTS):.3f}" in text
    assert "KL(p(perm | class) || p(perm))" in text
    # second's margins, then its logits (std over samples 0, range 2)
    assert f"| {2 * np.tanh(1.0):.3g} / {2 * np.tanh(1.0):.3g} | 0 / 2 |" in text


def test_cli_on_the_embedded_digits(tmp_path, capsys):
    """``dyshuffle inspect CHECKPOINT --data digits``: a real model, data and report."""
    from checkpoints import checkpoint_of
    from dyshuffle.data import load_data
    from dyshuffle.deploy.inspect import _subset, main
    from dyshuffle.models import create_model

    data = load_data("digits")
    rows40 = _subset(len(data.val_labels), 40)  # --max-samples 40: a fixed random subset
    assert len(rows40) == 40 and len(set(data.val_labels[rows40].tolist())) > 2
    x = (
        data.val_images[rows40].float() / 255 - torch.tensor(data.mean)[:, None, None]
    ) / torch.tensor(data.std)[:, None, None]
    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="dynamic")
    first = model.eval().stage2[0].mixer

    def center(layer, args):  # centered, unit-spread hidden units: input-dependent logits
        z = torch.cat([a.mean(dim=(2, 3)) for a in args], dim=1)  # the parts of the input
        lin = layer.generator[0]
        lin.weight.div_(((z - z.mean(0)) @ lin.weight.T).std(0)[:, None] + 1e-6)
        lin.bias.copy_(-(z.mean(0) @ lin.weight.T))
        layer.generator[-1].weight.normal_(0.0, 1.0)

    hook = first.register_forward_pre_hook(center)
    with torch.no_grad():
        model(x)
    hook.remove()
    ckpt = checkpoint_of(model, tmp_path / "last.pt", class_names=data.class_names,
                         input_size=list(data.input_size), mean=list(data.mean),
                         std=list(data.std), epoch=0)  # fmt: skip
    out = tmp_path / "inspect"
    argv = [str(ckpt), "--data", "digits", "--output", str(out), "--max-samples", "40"]
    assert main([*argv, "--batch-size", "16", "--examples", "2"]) == 0
    text = (out / "report.md").read_text()
    assert "40 samples, 10 classes" in text and "16 dynamic layers" in text
    rows = [line for line in text.splitlines() if line.startswith("| `stage")]
    assert len(rows) == 16
    # the distinct permutations of the report equal a direct count on the same images
    seen: list[int] = []
    hook = first.register_forward_pre_hook(
        lambda m, a: seen.append(len(set(map(tuple, m.permutation(*a).tolist()))))
    )
    with torch.no_grad():
        model(x)
    hook.remove()
    assert seen[0] > 1  # the test makes the first layer input-dependent
    assert rows[0].split("|")[4].strip() == str(seen[0])
    for name in ("permutation_counts", "class_dependence", "orthogonality", "examples"):
        variance, colors = _image_stats(out / f"{name}.png")
        assert variance > 0 and colors > 2
    printed = capsys.readouterr().out
    assert f"stage2.0.mixer: {seen[0]} distinct permutations" in printed


def test_cli_assignment_rebinarizes_the_layers(tmp_path, capsys):
    """``--assignment optimal``: the same weights with the nearest permutations, whose margins
    are never negative, where the greedy choice of 8 x 8 factors had negative ones; the report
    names the assignment."""
    from checkpoints import checkpoint_of
    from dyshuffle.data import load_data
    from dyshuffle.deploy.inspect import main
    from dyshuffle.models import create_model

    data = load_data("digits")
    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="dynamic",
                         max_group_size=64, init="random")  # fmt: skip
    ckpt = checkpoint_of(model, tmp_path / "last.pt", class_names=data.class_names,
                         input_size=list(data.input_size), mean=list(data.mean),
                         std=list(data.std), epoch=0)  # fmt: skip

    def smallest_margins(*more):
        out = tmp_path / ("inspect" + "".join(more))
        argv = [str(ckpt), "--data", "digits", "--output", str(out), "--max-samples", "64"]
        assert main([*argv, "--examples", "0", "--no-progress", *more]) == 0
        printed = capsys.readouterr().out
        found = re.findall(r"margin min / median ([^,]+),", printed)
        assert len(found) == 16
        return [float(m.split(" / ")[0]) for m in found], (out / "report.md").read_text()

    greedy, text = smallest_margins()
    assert "assignment `auto`" in text and min(greedy) < 0
    nearest, text = smallest_margins("--assignment", "optimal")
    assert "assignment `optimal`" in text and min(nearest) >= 0


def test_cli_bad_input(tmp_path, capsys):
    from dyshuffle.deploy.inspect import main

    missing = tmp_path / "missing.pt"
    assert main([str(missing), "--data", "digits", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-samples", "0"], "--max-samples must be a positive integer, got 0"),
        (["--batch-size", "-3"], "--batch-size must be a positive integer, got -3"),
        (["--examples", "-1"], "--examples must be 0 or more, got -1"),
        (["--data", "imagefolder"], "data set 'imagefolder' needs --data-dir PATH"),
    ],
)
def test_cli_checks_its_arguments_before_reading_data(tmp_path, capsys, args, message):
    from dyshuffle.deploy.inspect import main
    from dyshuffle.models import create_model
    from dyshuffle.train.checkpoint import save_checkpoint

    model = create_model("shufflenet_v2_x0_5", num_classes=10, in_chans=1, mixer="dynamic")
    ckpt = tmp_path / "last.pt"
    state = {"model": model.state_dict(), "model_args": model.model_args, "input_size": [1, 8, 8]}
    save_checkpoint(ckpt, {**state, "mean": [0.5], "std": [0.5], "class_names": list("0123456789")})
    argv = [str(ckpt), "--data", "digits", "--output", str(tmp_path / "out"), *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_names_an_unknown_data_set_before_asking_for_its_folder(tmp_path, capsys):
    from dyshuffle.deploy.inspect import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "last.pt"), "--data", "mnist", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'mnist'" in err and "'cifar10'" in err
    assert "needs --data-dir" not in err and not (tmp_path / "out").exists()


class ContextSignModel(nn.Module):
    """:class:`SignModel`'s first layer reading its choice from a context: the input itself,
    while the layer permutes its negation (which would choose the other permutation)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.first = DynamicShuffle(
            4, groups=1, factors=(2, 2), reduction=1, min_hidden=2, context_channels=4
        )
        self.first.load_state_dict(sign_layer().state_dict())
        self.head = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.first(-x, context=x).mean(dim=(2, 3)))


def test_a_layer_reading_a_context_is_inspected_with_it():
    """The inspection records what the layer applies: the choices of its context."""
    torch.manual_seed(0)
    model = ContextSignModel(3)
    x, y, z = sign_data()
    expected = torch.tensor([IDENTITY if v > 0 else SWAP for v in z.tolist()])
    assert torch.equal(model.first.eval().permutation(-x, context=x), expected)
    stats = collect_statistics(model, batches(x, y), ["zero", "one", "two"])
    first = stats.layer("first")
    rows = [first.permutations.index(IDENTITY), first.permutations.index(SWAP)]
    np.testing.assert_array_equal(first.counts[rows], COUNTS)  # the signs of the context
