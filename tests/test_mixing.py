"""Mixup / CutMix of a training batch and gradient accumulation (``dyshuffle train --mixup
--cutmix --mix-prob --grad-accum-steps``): what the mixed batch is made of, the distribution of
its weight, and that a step split into micro-batches is the step of the whole batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dyshuffle.train.engine as engine
from dyshuffle.data import mix_batch
from dyshuffle.train.config import ConfigError, resolve_config
from dyshuffle.train.distributed import DistInfo


def batch(n: int = 6, c: int = 3, h: int = 8, w: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g), torch.randint(0, 10, (n,), generator=g)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the mixed batch ------------------------------------------------------------------------------


def test_mixup_is_the_weighted_average_with_the_rolled_batch():
    x, y = batch()
    for seed in range(20):
        out, mix = mix_batch(x, y, gen(seed), mixup=0.4)
        assert mix.kind == "mixup" and 0.0 <= mix.lam <= 1.0 and mix.box is None
        assert torch.equal(mix.y_b, y.roll(1, 0))
        torch.testing.assert_close(out, mix.lam * x + (1 - mix.lam) * x.roll(1, 0))
    assert torch.equal(x, batch()[0])  # the input is not changed in place


def test_cutmix_pastes_one_rectangle_and_lam_is_the_share_of_own_pixels():
    x, y = batch(n=5, h=9, w=13)
    seen_clipped = False
    for seed in range(40):
        out, mix = mix_batch(x, y, gen(seed), cutmix=1.0)
        assert mix.kind == "cutmix" and torch.equal(mix.y_b, y.roll(1, 0))
        own = (out == x).all(1)  # (N, H, W): every channel of the pixel is the sample's own
        other = (out == x.roll(1, 0)).all(1)
        assert (own | other).all()  # every pixel is one of the two, in all its channels
        pasted = other[0] & ~own[0]
        rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
        top, bottom, left, right = mix.box
        if pasted.any():  # one rectangle, the box
            assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == mix.box
            assert (
                pasted[top:bottom, left:right].all()
                and pasted.sum() == pasted[top:bottom, left:right].numel()
            )
        assert (pasted.sum(1).eq(0) | pasted.sum(1).eq(right - left)).all()
        assert mix.lam == pytest.approx(1.0 - pasted.float().mean().item())
        for n in range(1, 5):  # the same box in every sample
            assert torch.equal((other[n] & ~own[n]), pasted)
        seen_clipped |= top == 0 or left == 0 or bottom == 9 or right == 13
    assert seen_clipped  # boxes at the border are clipped, and lam says so


def test_memory_format_and_dtype_are_kept():
    x, y = batch()
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    for kind in ("mixup", "cutmix"):
        out, mix = mix_batch(x, y, gen(1), **{kind: 1.0})
        assert mix.kind == kind and out.dtype == torch.bfloat16
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_beta_draws_follow_numpy_beta():
    """``lam`` of mixup is Beta(alpha, alpha): two-sample Kolmogorov-Smirnov distance to NumPy's
    Beta draws (deterministic seeds: the test cannot flip)."""
    x, y = batch(n=2, c=1, h=1, w=1)
    for alpha in (0.2, 1.0, 4.0):
        ours = np.sort([mix_batch(x, y, gen(s), mixup=alpha)[1].lam for s in range(3000)])
        ref = np.sort(np.random.default_rng(0).beta(alpha, alpha, 3000))
        grid = np.linspace(0, 1, 201)
        ks = np.abs(np.searchsorted(ours, grid) - np.searchsorted(ref, grid)).max() / 3000
        assert ks < 0.05, (alpha, ks)  # the 5% critical value at n = m = 3000 is 0.035


def test_probability_and_the_choice_between_the_two():
    x, y = batch()
    kinds = [mix_batch(x, y, gen(s), mixup=0.2, cutmix=1.0, prob=0.5)[1].kind for s in range(600)]
    share = {k: kinds.count(k) / 600 for k in ("none", "mixup", "cutmix")}
    assert abs(share["none"] - 0.5) < 0.07 and abs(share["mixup"] - 0.25) < 0.07
    assert abs(share["cutmix"] - 0.25) < 0.07
    for kw in ({"mixup": 1.0, "prob": 0.0}, {}, {"mixup": 0.0, "cutmix": 0.0}):
        out, mix = mix_batch(x, y, gen(0), **kw)
        assert out is x and mix.kind == "none" and mix.lam == 1.0 and mix.y_b is None
    one = batch(n=1)
    assert mix_batch(*one, gen(0), mixup=1.0)[1].kind == "none"  # no partner to mix with
    a, b = mix_batch(x, y, gen(7), cutmix=1.0), mix_batch(x, y, gen(7), cutmix=1.0)
    assert torch.equal(a[0], b[0]) and a[1].lam == b[1].lam  # the generator decides it all


@pytest.mark.parametrize(
    "kw, named",
    [
        ({"mixup": -0.1}, "mixup must be a finite number >= 0 (0: off), got -0.1"),
        ({"cutmix": float("nan")}, "cutmix must be a finite number >= 0 (0: off), got nan"),
        ({"mixup": 1.0, "prob": 1.5}, "prob must be in [0, 1], got 1.5"),
    ],
)
def test_bad_arguments_are_named(kw, named):
    x, y = batch()
    with pytest.raises(ValueError) as e:
        mix_batch(x, y, gen(0), **kw)
    assert named in str(e.value)
    with pytest.raises(ValueError, match=r"\(6, 3, 8, 10\) and \(5,\)"):
        mix_batch(x, y[:5], gen(0), mixup=1.0)


@pytest.mark.parametrize(
    "options, named",
    [
        ({"grad_accum_steps": 0}, "grad_accum_steps must be at least 1, got 0"),
        ({"grad_accum_steps": 65}, "grad_accum_steps (65) cannot exceed batch_size (64)"),
        ({"mixup": -1.0}, "mixup must be non-negative, got -1.0"),
        ({"mix_prob": 1.5}, "mix_prob must be in [0, 1], got 1.5"),
    ],
)
def test_bad_config_values_are_named(options, named):
    with pytest.raises(ConfigError) as e:
        resolve_config(options)
    assert named in str(e.value)


def test_micro_batches_cover_the_batch_evenly():
    for n in range(1, 20):
        for parts in range(1, 8):
            got = engine._micro_batches(n, parts)
            sizes = [s.stop - s.start for s in got]
            assert got[0].start == 0 and got[-1].stop == n and min(sizes) >= 1
            assert all(a.stop == b.start for a, b in zip(got, got[1:]))
            assert len(got) == min(n, parts) and max(sizes) - min(sizes) <= 1


# -- one training step ---------------------------------------------------------------------------


class _Batches:
    """A loader of given batches (the training loop asks for ``epoch(epoch, start)``)."""

    def __init__(self, batches):
        self.batches = batches

    def epoch(self, epoch=0, start=0):
        yield from self.batches[start:]

    def __len__(self):
        return len(self.batches)


class _NoStop:
    requested = False


def one_step(x, y, tmp_path, name, **options):
    """The gradients and parameters after one optimizer step of a tiny dynamic ShuffleNetV2 on
    ``(x, y)`` (SGD, no weight decay; the same initialization for every call)."""
    cfg = resolve_config({
        "train_subset": 32, "val_subset": 8, "batch_size": x.shape[0], "epochs": 1,
        "threads": 1, "progress": False, "tensorboard": False, "weight_decay": 0.0,
        "schedule": "constant", "lr": 0.5, "output": str(tmp_path / name), "device": "cpu",
        **options,
    })  # fmt: skip
    run = engine._Run(cfg, DistInfo(device=torch.device("cpu")), None, "test")
    run.train_loader = _Batches([(x, y)])
    run.steps_per_epoch = 1
    run.train_epoch(_NoStop())
    model = run.model
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return grads, {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("mix", [{}, {"mixup": 0.4, "cutmix": 1.0}])
@pytest.mark.parametrize("copies", [2, 3])
def test_micro_batches_of_copies_give_the_step_of_the_whole_batch(tmp_path, copies, mix):
    """A batch made of ``k`` copies of the same images, in ``k`` micro-batches: each micro-batch
    has the batch's BatchNorm statistics and mean loss, so the accumulated gradient, and the
    step, are the whole batch's (the rolled partners of mixing are copies too). A sum of the
    micro-batches' losses instead of their mean would give ``k`` times the gradient."""
    x0 = torch.rand(5, 3, 32, 32, generator=gen(0)) * 2 - 1
    y0 = torch.arange(5)
    x, y = x0.repeat(copies, 1, 1, 1), y0.repeat(copies)
    whole, p_whole = one_step(x, y, tmp_path, f"whole-{copies}", **mix)
    split, p_split = one_step(x, y, tmp_path, f"split-{copies}", grad_accum_steps=copies, **mix)
    assert whole.keys() == split.keys() and len(whole) > 10
    # float32 sums in another order: tolerances on the scale of the largest gradient
    atol = 1e-4 * max(g.abs().max().item() for g in whole.values())
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=atol, msg=k)
        torch.testing.assert_close(p_split[k], p_whole[k], rtol=1e-4, atol=atol, msg=k)
    if mix:  # and mixing changed the step
        plain, _ = one_step(x, y, tmp_path, f"plain-{copies}")
        assert any(not torch.allclose(plain[k], whole[k], atol=1e-4) for k in whole)
