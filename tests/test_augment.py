"""RandAugment, TrivialAugment and random erasing: per sample as torchvision's own operations, in
both loaders, a function of the seed, the epoch and the sample (exact resume), and reachable from
``dyshuffle train``."""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml
from torchvision import transforms as T
from torchvision.transforms import v2

import dyshuffle.data.loaders as loaders_mod
from dyshuffle.data import FileLoader, InMemoryLoader, mix_seed, normalize, random_crop
from dyshuffle.data import augment as A
from dyshuffle.data.decode import open_image
from dyshuffle.train import cli
from dyshuffle.train.config import ConfigError, resolve_config
from test_data import _same_batches, make_image_tree

BILINEAR = T.InterpolationMode.BILINEAR
TORCHVISION = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}
MEAN, STD = (
    (0.49, 0.43, 0.57),
    (0.25, 0.2, 0.3),
)  # 255 * mean is no integer: nothing normalizes to 0


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def torchvision_ops(x: torch.Tensor, choice: A.AugmentChoice, policy: str) -> torch.Tensor:
    """Reference: torchvision's own operation mapping (``_apply_image_or_video_transform`` of its
    v2 auto-augment classes) and magnitude tables (``_AUGMENTATION_SPACE``), one image at a
    time, with the operations, bins and signs of ``choice``."""
    tv = TORCHVISION[policy](interpolation=BILINEAR)
    h, w = x.shape[-2:]
    out = []
    for xi, ops, bins, neg in zip(x, choice.ops, choice.bins, choice.negative):
        for op, b, s in zip(ops.tolist(), bins.tolist(), neg.tolist()):
            name = A.OPS[op]
            magnitudes = tv._AUGMENTATION_SPACE[name][0](A.NUM_MAGNITUDE_BINS, h, w)
            m = 0.0 if magnitudes is None else float(magnitudes[b]) * (-1.0 if s else 1.0)
            xi = tv._apply_image_or_video_transform(xi, name, m, tv.interpolation, tv._fill)
        out.append(xi)
    return torch.stack(out)


# -- auto-augment


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_tables_and_draws_are_torchvisions(policy):
    space = TORCHVISION[policy]._AUGMENTATION_SPACE
    assert tuple(space) == A.OPS  # the same operations in the same order (an index is an op)
    table = A.magnitude_table(policy, 24, 20)
    for op, (fn, signed) in space.items():
        m = fn(A.NUM_MAGNITUDE_BINS, 24, 20)
        row = table[A.OPS.index(op)]
        assert torch.equal(row, torch.zeros_like(row) if m is None else m.float()), op
        assert bool(A._SIGNED[A.OPS.index(op)]) == signed, op
    n = 14_000
    c = A.draw_auto_augment(policy, n, torch.Generator().manual_seed(0), magnitude=7)
    k = 2 if policy == "randaugment" else 1
    assert c.ops.shape == c.bins.shape == c.negative.shape == (n, k)
    freq = torch.bincount(c.ops.flatten(), minlength=14) / (n * k)
    assert (freq - 1 / 14).abs().max() < 0.01  # uniform over the 14 operations
    signed = A._SIGNED[c.ops]
    assert not c.negative[~signed].any() and abs(c.negative[signed].float().mean() - 0.5) < 0.02
    with_magnitude = A._HAS_MAGNITUDE[c.ops]
    assert (c.bins[~with_magnitude] == 0).all()
    if policy == "randaugment":
        assert (c.bins[with_magnitude] == 7).all()  # one magnitude for every operation
    else:  # a bin per image, uniform over 31
        bins = torch.bincount(c.bins[with_magnitude], minlength=31).float()
        assert (bins / bins.sum() - 1 / 31).abs().max() < 0.01
    assert A.draw_auto_augment("none", n, torch.Generator()) is None


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_grouped_batch_equals_torchvision_per_sample(policy, device, monkeypatch):
    """Fast path (one call per (op, bin, sign) group on the batch) == reference (torchvision's
    operation on each image alone), for every image; and one call per group. On CUDA too
    (scripts/gpu_session.sh runs it): the memory loader augments on the training device."""
    x = _images(96, 18, 22).to(device)  # not square: TranslateX/Y and the tables' h/w differ
    g = torch.Generator().manual_seed(1)
    choice = A.draw_auto_augment(policy, len(x), g, magnitude=13)
    calls = []
    apply_op = A.apply_op
    monkeypatch.setattr(A, "apply_op", lambda x, op, *a: calls.append(op) or apply_op(x, op, *a))
    fast = A.auto_augment(x, choice, policy)
    monkeypatch.undo()
    assert fast.dtype == torch.uint8 and fast.shape == x.shape
    ref = torchvision_ops(x, choice, policy)
    for i in range(len(x)):
        assert torch.equal(fast[i], ref[i]), (i, [A.OPS[o] for o in choice.ops[i].tolist()])
    groups = 0
    for k in range(choice.ops.shape[1]):
        keys = set(zip(*(t[:, k].tolist() for t in (choice.ops, choice.bins, choice.negative))))
        groups += len(keys)
    assert len(calls) == groups < len(x) * choice.ops.shape[1]  # grouped, not per sample
    assert len(set(calls)) >= 12  # (nearly) every operation was exercised
    assert (fast != x).flatten(1).any(1).float().mean() > 0.5  # and they change the images


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_in_memory_loader_augments_each_image_with_its_drawn_ops(policy):
    images, labels = _images(40, 12, 12, seed=2), torch.arange(40)
    loader = InMemoryLoader(
        images, labels, batch_size=16, train=True, mean=(0, 0, 0), std=(1, 1, 1),
        crop_padding=2, hflip=True, auto_augment=policy, ra_magnitude=20, seed=5,
    )  # fmt: skip
    for epoch in (0, 1):
        d = loader.draws(epoch)
        assert d.augment is not None and d.erase is None
        batches = list(loader.epoch(epoch))
        for step, (x, y) in enumerate(batches):
            pos = loader.plan.positions(step)
            assert torch.equal(y, d.order[pos])
            src = random_crop(images[d.order[pos]], d.offsets[pos], 2)
            src = torch.where(d.flips[pos].view(-1, 1, 1, 1), src.flip(3), src)
            ref = torchvision_ops(src, d.augment[pos], policy)
            assert torch.equal(x, ref.float() / 255)  # normalize((0, 0, 0), (1, 1, 1))
    # the new draws come after the old ones: crops, flips and order are those without it
    plain = InMemoryLoader(
        images, labels, batch_size=16, train=True, mean=(0, 0, 0), std=(1, 1, 1),
        crop_padding=2, hflip=True, seed=5,
    )  # fmt: skip
    a, b = plain.draws(3), loader.draws(3)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("order", "offsets", "flips"))


# -- random erasing


def _fits_torchvision_ranges(h: int, w: int, height: int, width: int) -> bool:
    """Some area in ``ERASE_SCALE * H * W`` and ratio in ``ERASE_RATIO`` round to ``h x w``."""
    area = height * width
    lo_area, hi_area = (h - 0.5) * (w - 0.5), (h + 0.5) * (w + 0.5)
    lo_ratio, hi_ratio = (h - 0.5) / (w + 0.5), (h + 0.5) / (w - 0.5)
    return (
        0 < h < height
        and 0 < w < width
        and lo_area <= A.ERASE_SCALE[1] * area
        and hi_area >= A.ERASE_SCALE[0] * area
        and lo_ratio <= A.ERASE_RATIO[1]
        and hi_ratio >= A.ERASE_RATIO[0]
    )


def _check_erased(out: torch.Tensor, clean: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image of ``out`` differs from ``clean`` exactly in its box, in every channel, where
    it is 0; returns which images were erased."""
    erased = (out != clean).flatten(1).any(1)
    height, width = out.shape[-2:]
    for o, c, box, e in zip(out, clean, boxes.tolist(), erased.tolist()):
        top, left, h, w = box
        if not e:
            assert h == w == 0
            continue
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[top : top + h, left : left + w] = True
        assert torch.equal(o != c, mask.expand_as(o))  # exactly the rectangle, all channels
        assert (o[:, mask] == 0).all()  # 0 after normalization: the mean colour
        assert _fits_torchvision_ranges(h, w, height, width), box
    return erased


def test_in_memory_random_erasing_is_one_rectangle_of_zeros_with_chance_p():
    images, labels = _images(512, 16, 16, seed=3), torch.arange(512)
    p = 0.3
    loader = InMemoryLoader(
        images, labels, batch_size=256, train=True, mean=MEAN, std=STD, random_erasing=p, seed=1
    )
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    count = total = 0
    for epoch in range(4):
        d = loader.draws(epoch)
        for step, (x, y) in enumerate(loader.epoch(epoch)):
            pos = loader.plan.positions(step)
            erased = _check_erased(x, normalize(images[y], mean, std), d.erase[pos])
            count, total = count + int(erased.sum()), total + len(erased)
    assert total == 2048 and abs(count / total - p) < 0.03  # 3.7 standard deviations


def test_erase_boxes_are_distributed_as_torchvisions():
    """The vectorized draws against torchvision's own ``RandomErasing.get_params``."""
    n, height, width = 4000, 20, 28
    boxes = A.draw_erase_boxes(n, height, width, 1.0, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    img = torch.zeros(3, height, width)
    ref = torch.tensor(
        [
            T.RandomErasing.get_params(img, scale=A.ERASE_SCALE, ratio=A.ERASE_RATIO, value=[0])[:4]
            for _ in range(n)
        ]
    )
    for b in (boxes, ref):
        top, left, h, w = b.T
        assert (h > 0).all() and (top >= 0).all() and (top + h <= height).all()
        assert (left >= 0).all() and (left + w <= width).all()
    for col in range(4):  # top, left, height, width: same means and spreads
        a, r = boxes[:, col].double(), ref[:, col].double()
        assert abs(a.mean() - r.mean()) < 0.05 * r.mean() + 0.2, col
        assert abs(a.std() - r.std()) < 0.1 * r.std() + 0.2, col
    area = lambda b: (b[:, 2] * b[:, 3]).double() / (height * width)  # noqa: E731
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert (area(boxes).quantile(q) - area(ref).quantile(q)).abs().max() < 0.02
    # nothing erased at p = 0; every image at p = 1 (when a rectangle fits)
    assert not A.draw_erase_boxes(50, 8, 8, 0.0, torch.Generator()).any()
    with pytest.raises(ValueError, match="prob must be in"):
        A.draw_erase_boxes(5, 8, 8, 1.5, torch.Generator())


# -- the file loader: torchvision's recipe, sample by sample


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """12 training images (3 classes of 4, 20 x 20) as ``(path, label)`` pairs."""
    root = tmp_path_factory.mktemp("aug_files")
    images = make_image_tree(root, train=4, val=0, size=20)
    return [(str(root / rel), ["cat", "dog", "eel"].index(rel.split("/")[1])) for rel in images]


def _file_loader(samples, *, workers=0, **kw) -> FileLoader:
    return FileLoader(
        samples, image_size=12, batch_size=4, train=True, device="cpu", mean=MEAN, std=STD,
        seed=3, workers=workers, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("policy, magnitude", [("randaugment", 15), ("trivialaugment", 9)])
def test_file_loader_is_torchvisions_recipe_per_sample(files, policy, magnitude):
    """Each image is what torchvision's classification recipe (RandomResizedCrop, flip,
    RandAugment / TrivialAugmentWide, normalization, RandomErasing) gives with torch's generator
    seeded with mix_seed(seed, epoch, index)."""
    p = 0.5
    loader = _file_loader(files, auto_augment=policy, ra_magnitude=magnitude, random_erasing=p)
    auto = (
        T.RandAugment(magnitude=magnitude, interpolation=BILINEAR)
        if policy == "randaugment"
        else T.TrivialAugmentWide(interpolation=BILINEAR)
    )
    recipe = T.Compose([
        T.RandomResizedCrop(12, antialias=True), T.RandomHorizontalFlip(), auto, T.PILToTensor(),
        T.ConvertImageDtype(torch.float), T.Normalize(MEAN, STD), T.RandomErasing(p),
    ])  # fmt: skip
    erased = 0
    for epoch in (0, 1):
        order = loader.plan.order(epoch).tolist()
        for step, (x, y) in enumerate(loader.epoch(epoch)):
            for j, i in enumerate(order[step * 4 : step * 4 + 4]):
                assert y[j] == files[i][1]
                state = torch.get_rng_state()
                torch.manual_seed(mix_seed(3, epoch, i))
                ref = recipe(open_image(files[i][0], files[i][0]))
                torch.set_rng_state(state)
                assert torch.allclose(x[j], ref, atol=1e-6, rtol=0), (epoch, i)
                assert torch.equal(x[j] == 0, ref == 0)  # the erased pixels, exactly
                erased += bool((ref == 0).all(0).any())
    assert 0 < erased < 24


def test_file_loader_erases_one_rectangle_of_zeros(files):
    plain = [x for x, _ in _file_loader(files).epoch(1)]
    erased = [x for x, _ in _file_loader(files, random_erasing=1.0).epoch(1)]
    boxes = []  # recover each box from the difference and check it
    for a, b in zip(erased, plain):
        diff = (a != b).any(1)  # (N, H, W)
        for d in diff:
            rows, cols = d.any(1).nonzero()[:, 0], d.any(0).nonzero()[:, 0]
            top, left = int(rows.min()), int(cols.min())
            boxes.append([top, left, int(rows.max()) - top + 1, int(cols.max()) - left + 1])
    boxes = torch.tensor(boxes)
    assert _check_erased(torch.cat(erased), torch.cat(plain), boxes).all()  # p = 1: every image


# -- exact resume with the new options on, both loaders


def test_in_memory_loader_resumes_exactly_with_augment_and_erasing():
    images, labels = _images(50, 10, 10, seed=4), torch.arange(50)
    kw = dict(mean=MEAN, std=STD, crop_padding=1, hflip=True, seed=9, random_erasing=0.5)
    for policy in ("randaugment", "trivialaugment"):
        loader = InMemoryLoader(
            images, labels, batch_size=16, train=True, auto_augment=policy, **kw
        )
        full = list(loader.epoch(2))
        assert _same_batches(list(loader.epoch(2, start_step=1)), full[1:])
        assert _same_batches(list(loader.epoch(2, start_step=2)), full[2:])
        ranks = [
            InMemoryLoader(images, labels, batch_size=16, train=True, auto_augment=policy,
                           world_size=2, rank=r, **kw)
            for r in (0, 1)
        ]  # fmt: skip
        for (x, y), (x0, y0), (x1, y1) in zip(full, *(r.epoch(2) for r in ranks)):
            assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
        assert not torch.equal(full[0][0], next(loader.epoch(3))[0])


def test_file_loader_resumes_exactly_with_augment_and_erasing(files):
    kw = dict(auto_augment="trivialaugment", random_erasing=0.5)
    torch.manual_seed(0)
    full = list(_file_loader(files, **kw).epoch(2))
    torch.manual_seed(1)  # the caller's generator plays no part
    assert _same_batches(list(_file_loader(files, workers=2, **kw).epoch(2, 1)), full[1:])
    assert _same_batches(list(_file_loader(files, workers=1, **kw).epoch(2, 2)), full[2:])
    state = torch.get_rng_state()
    list(_file_loader(files, auto_augment="randaugment", random_erasing=0.5).epoch(0))
    assert torch.equal(torch.get_rng_state(), state)  # and is left as it was


# -- configuration and the training command


@pytest.mark.parametrize(
    "values, named",
    [
        ({"auto_augment": "autoaugment"}, "unknown auto_augment 'autoaugment'; valid: none, "),
        ({"random_erasing": -0.1}, "random_erasing must be in [0, 1], got -0.1"),
        ({"random_erasing": 1.5}, "random_erasing must be in [0, 1], got 1.5"),
        ({"ra_magnitude": 31}, "ra_magnitude must be in [0, 30]"),
        ({"ra_magnitude": -1}, "got -1"),
    ],
)
def test_bad_values_are_config_errors_naming_them(values, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        resolve_config(values)
    with pytest.raises(ValueError, match=list(values)[0]):
        InMemoryLoader(_images(4, 4, 4), torch.arange(4), batch_size=2, train=True,
                       mean=MEAN, std=STD, **values)  # fmt: skip


def test_cli_options_reach_the_loaders_and_train_digits(tmp_path, capsys, monkeypatch):
    calls = {"auto_augment": [], "erase": []}
    for name in calls:
        original = getattr(loaders_mod, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name].append(args[0].shape[0])
            return _original(*args, **kwargs)

        monkeypatch.setattr(loaders_mod, name, spy)
    out = tmp_path / "run"
    argv = ["--auto-augment", "randaugment", "--ra-magnitude", "12", "--random-erasing", "0.25",
            "--epochs", "1", "--train-subset", "96", "--val-subset", "40", "--batch-size", "32",
            "--output", str(out), "--threads", "1", "--no-progress",
            "--no-tensorboard"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["auto_augment"], saved["ra_magnitude"], saved["random_erasing"]) == (
        "randaugment", 12, 0.25,
    )  # fmt: skip
    assert calls == {"auto_augment": [32] * 3, "erase": [32] * 3}  # every training batch
    results = yaml.safe_load((out / "results.json").read_text())
    assert math.isfinite(results["top1"])
    code = cli.main([*argv[:2], "--ra-magnitude", "31", "--output", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "ra_magnitude must be in [0, 30]" in err
    assert not (tmp_path / "bad").exists()
