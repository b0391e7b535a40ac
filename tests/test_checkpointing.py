"""``model.set_grad_checkpointing()``: activations recomputed in the backward pass, and the
training step exactly the one without (loss, gradients, BatchNorm statistics, dynamic shuffle
state, random draws); ``dyshuffle train --grad-checkpointing``."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dyshuffle
from dyshuffle.layers import DynamicShuffle
from dyshuffle.models import _blocks, create_model
from dyshuffle.sweep import NEUTRAL_KEYS
from dyshuffle.train import cli
from dyshuffle.train.checkpoint import load_checkpoint

#: (model, create_model keywords): the unit kinds of the zoo, with the stateful layers
CASES = [
    ("shufflenet_v2_x0_5", dict(mixer="dynamic")),
    ("shufflenet_v2_x0_5", dict(mixer="dynamic", noise=1.0)),  # Gumbel noise: random draws
    ("shufflenet_v2_x0_5", dict(mixer="dynamic", descriptor_norm=True)),  # descriptor_bn
    ("shufflenet_v2_x0_5", dict(pointwise="sds")),
    ("shufflenet_v1_g3_x0_5", dict(mixer="dynamic")),
    ("mobilenet_v2", {}),  # dropout before the classifier
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, kw in CASES]


def exact(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def pair(name: str, **kwargs) -> tuple[nn.Module, nn.Module]:
    """The same model twice, the second with gradient checkpointing."""
    torch.manual_seed(0)
    plain = create_model(name, num_classes=10, stem="cifar", **kwargs)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    return plain, checkpointed


def train_steps(model: nn.Module, steps: int = 2, forward=None) -> list[dict]:
    """``steps`` SGD steps on fixed batches from one seed: the loss (task + orthogonal), every
    gradient and the RNG state after each step."""
    forward = model if forward is None else forward
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # dropout, Gumbel noise
    out = []
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        loss = F.cross_entropy(forward(x), y) + dyshuffle.orthogonal_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        out.append(dict(loss=loss.detach(), grads=grads, rng=torch.get_rng_state()))
        opt.step()
    return out


def assert_same_training(plain: nn.Module, checkpointed: nn.Module, a: list, b: list) -> None:
    for step, (sa, sb) in enumerate(zip(a, b)):
        exact(sb["loss"], sa["loss"], f"loss of step {step}")
        assert sa["grads"].keys() == sb["grads"].keys()
        for k in sa["grads"]:
            exact(sb["grads"][k], sa["grads"][k], f"gradient of {k} at step {step}")
        assert torch.equal(sb["rng"], sa["rng"]), f"RNG state after step {step}"
    buffers = dict(checkpointed.named_buffers())
    for k, v in plain.named_buffers():
        exact(buffers[k], v, f"buffer {k}")
    for k, v in plain.state_dict().items():
        exact(checkpointed.state_dict()[k], v, f"state_dict {k}")


@contextlib.contextmanager
def count_checkpoints(monkeypatch):
    """Count the calls of ``torch.utils.checkpoint.checkpoint`` made by the models."""
    calls = []
    real = _blocks.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(_blocks, "checkpoint", counting)
    yield calls
    monkeypatch.setattr(_blocks, "checkpoint", real)


def checkpointed_units(model: nn.Module) -> list[nn.Module]:
    """The modules that checkpointing wraps: each unit of a stage, the other body modules."""
    units = []
    for _, module in model._body():
        if _blocks._is_stage(module):
            units += list(module)
        elif not isinstance(module, nn.Identity):
            units.append(module)
    return units


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_checkpointed_training_is_exactly_the_plain_one(name, kwargs):
    plain, checkpointed = pair(name, **kwargs)
    runs = []  # each unit runs twice per step: forward and recomputation
    for unit in checkpointed_units(checkpointed):
        unit.register_forward_pre_hook(lambda mod, args: runs.append(mod))
    a, b = train_steps(plain), train_steps(checkpointed)
    assert_same_training(plain, checkpointed, a, b)
    units = checkpointed_units(checkpointed)
    assert len(runs) == 2 * 2 * len(units) and all(runs.count(u) == 4 for u in units)


def test_recomputation_leaves_every_attribute_as_the_forward_left_it():
    """The orthogonal loss read after the backward pass (which recomputes the units) is the
    forward's tensor, not the recomputation's."""
    _, model = pair("shufflenet_v2_x0_5", mixer="dynamic")
    model.train()
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    layers = [m for m in model.modules() if isinstance(m, DynamicShuffle)]
    forward = [m.last_orthogonal_loss for m in layers]
    attrs = [dict(m.__dict__) for m in model.modules()]
    loss.backward()
    assert all(m.last_orthogonal_loss is t for m, t in zip(layers, forward))
    assert all(t.grad_fn is not None for t in forward)
    assert [dict(m.__dict__) for m in model.modules()] == attrs


def test_plain_checkpointing_would_update_the_statistics_twice(monkeypatch):
    """Without the recomputation guard, checkpoint's backward runs BatchNorm in training again:
    what the exactness test above catches."""
    monkeypatch.setattr(
        _blocks,
        "_recompute_contexts",
        lambda module: (contextlib.nullcontext(), contextlib.nullcontext()),
    )
    plain, checkpointed = pair("shufflenet_v2_x0_5", mixer="dynamic")
    a, b = train_steps(plain, 1), train_steps(checkpointed, 1)
    exact(b[0]["loss"], a[0]["loss"], "loss")
    unit = "stage2.0.branch2.1.num_batches_tracked"
    assert dict(plain.named_buffers())[unit] == 1
    assert dict(checkpointed.named_buffers())[unit] == 2
    with pytest.raises(AssertionError):
        assert_same_training(plain, checkpointed, a, b)


def test_batchnorm_in_eval_inside_a_training_model():
    """Frozen BatchNorms (``eval()`` in a training model, as detection backbones have them) use
    and keep their running statistics, with and without checkpointing."""
    plain, checkpointed = pair("shufflenet_v2_x0_5", mixer="dynamic")
    a_b = []
    for model in (plain, checkpointed):
        forward = model.forward

        def frozen(x, model=model, forward=forward):
            for m in model.stage2.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
            return forward(x)

        a_b.append(train_steps(model, forward=frozen))
    assert_same_training(plain, checkpointed, *a_b)


def test_checkpointing_keeps_far_fewer_activations():
    """The saved tensors of a training forward (unique storages, autograd's own hooks):
    with checkpointing only each unit's input and the head's tensors remain."""

    def saved_bytes(model: nn.Module) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(torch.randn(8, 3, 32, 32)).sum()
        loss.backward()
        return sum(storages.values())

    for name, kwargs in (("shufflenet_v2_x0_5", dict(mixer="dynamic")), ("mobilenet_v2", {})):
        plain, checkpointed = pair(name, **kwargs)
        full, kept = saved_bytes(plain), saved_bytes(checkpointed)
        assert kept < full / 4, (name, kept, full)


def test_only_training_with_autograd_checkpoints(monkeypatch):
    plain, model = pair("shufflenet_v2_x0_5", mixer="dynamic")
    x = torch.randn(2, 3, 32, 32)
    units = len(checkpointed_units(model))
    assert units == 1 + 4 + 8 + 4 + 1  # the stem conv, each stage unit, conv5 (no max-pool)
    with count_checkpoints(monkeypatch) as calls:
        model.eval()
        plain.eval()
        exact(model(x), plain(x), "eval output")
        with torch.no_grad():
            exact(model(x), plain(x), "no_grad eval output")
        model.train()
        with torch.no_grad():
            model(x)
        assert calls == []
        model(x)
        assert len(calls) == units and all(c in checkpointed_units(model) for c in calls)
        calls.clear()
        model.forward_intermediates(x)
        assert len(calls) == units
        calls.clear()
        model.set_grad_checkpointing(False)
        assert model.grad_checkpointing is False
        model(x)
        assert calls == []
        model.set_grad_checkpointing()
        model(x)
        assert len(calls) == units


def test_forward_intermediates_are_the_same_with_checkpointing():
    plain, checkpointed = pair("shufflenet_v1_g3_x0_5", mixer="dynamic")
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for model in (plain, checkpointed):
        model.train()
        final, feats = model.forward_intermediates(x)
        (final.sum() + sum(f.square().mean() for f in feats)).backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        outs.append((final.detach(), [f.detach() for f in feats], grads))
    (fa, la, ga), (fb, lb, gb) = outs
    exact(fb, fa, "final features")
    for i, (u, v) in enumerate(zip(lb, la)):
        exact(u, v, f"feature {i}")
    for k in ga:
        exact(gb[k], ga[k], f"gradient of {k}")
    for k, v in plain.named_buffers():
        exact(dict(checkpointed.named_buffers())[k], v, f"buffer {k}")


def test_the_switch_is_not_state():
    model = create_model("mobilenet_v2", num_classes=10, stem="cifar")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.grad_checkpointing is False
    model.set_grad_checkpointing(enable=True)  # timm's keyword
    assert model.grad_checkpointing is True
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    model.set_grad_checkpointing(False)
    assert model.state_dict().keys() == before.keys()
    with pytest.raises(ValueError, match="enable must be a bool, got 'yes'"):
        model.set_grad_checkpointing("yes")


def test_compiled_checkpointed_model_trains_as_the_eager_one():
    """``torch.compile`` of a checkpointed model: units without a dynamic shuffle are traced with
    checkpoint, units with one run eagerly (graph breaks) with the guard; either way the step is
    the eager one's, with each BatchNorm statistic updated once."""
    plain, checkpointed = pair("shufflenet_v2_x0_5", mixer="dynamic", mixer_stages=[4])
    compiled = torch.compile(checkpointed, backend="aot_eager")
    a = train_steps(plain, 1)
    b = train_steps(checkpointed, 1, forward=compiled)
    assert_same_training(plain, checkpointed, a, b)
    assert all(
        v.item() == 1 for k, v in checkpointed.named_buffers() if k.endswith("num_batches_tracked")
    )


def test_train_option_trains_the_same_model(tmp_path, capsys):
    """``dyshuffle train --grad-checkpointing``: the same metrics and weights as without."""
    runs = {}
    for flag in ("--no-grad-checkpointing", "--grad-checkpointing"):
        out = tmp_path / flag.strip("-")
        argv = ["--train-subset", "64", "--val-subset", "40", "--batch-size", "32", "--epochs",
                "1", "--schedule", "constant", "--output", str(out), "--no-tensorboard",
                "--threads", "1", "--no-progress", flag]  # fmt: skip
        assert cli.main(argv) == 0, capsys.readouterr()
        runs[flag] = (
            json.loads((out / "results.json").read_text()),
            load_checkpoint(out / "last.pt"),
        )
    (res_a, state_a), (res_b, state_b) = runs.values()
    assert res_a["grad_checkpointing"] is False and res_b["grad_checkpointing"] is True
    assert state_b["config"]["grad_checkpointing"] is True
    for key in ("top1", "top5", "top1_soft", "top5_soft", "val_loss"):
        assert res_b[key] == res_a[key], key
    timing = ("epoch_seconds", "images_per_s")
    rows_a, rows_b = (
        [{k: v for k, v in row.items() if k not in timing} for row in state["metrics"]]
        for state in (state_a, state_b)
    )
    assert rows_b == rows_a and "train_loss" in rows_a[0] and "ortho_loss" in rows_a[0]
    assert state_a["model"].keys() == state_b["model"].keys()
    for k, v in state_a["model"].items():
        exact(state_b["model"][k], v, f"trained {k}")


def test_the_option_does_not_make_another_sweep_run():
    assert "grad_checkpointing" in NEUTRAL_KEYS
