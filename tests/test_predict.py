"""``dyshuffle predict``: preprocessing and the printed top-5 against the model's softmax."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import checkpoint_of
from dyshuffle.deploy.predict import main, predict, preprocess
from dyshuffle.models import create_model

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
CLASSES = [f"c{i}_{name}" for i, name in enumerate("abcdefghij")]


def test_preprocess_normalizes_and_center_crops():
    # 64 x 48 image (W x H): the shorter side 48 -> 32, width 64 -> 43 (rounded), center 32 crop
    arr = np.zeros((48, 64, 3), dtype=np.uint8)
    arr[:, :, 0] = 255  # red everywhere
    arr[:, 32:, 1] = 200  # green on the right half
    x = preprocess(Image.fromarray(arr), (3, 32, 32), MEAN, STD)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.full((32, 32), (1.0 - 0.4) / 0.2))
    torch.testing.assert_close(x[2], torch.full((32, 32), (0.0 - 0.6) / 0.3))
    green = x[1] * 0.25 + 0.5  # un-normalized
    assert torch.allclose(green[:, :10], torch.zeros(32, 10), atol=1e-6)  # left of the middle
    assert torch.allclose(green[:, -10:], torch.full((32, 10), 200 / 255), atol=1e-6)
    # exact size: no resampling, pixel values survive unchanged
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = preprocess(Image.fromarray(arr), (3, 32, 32), MEAN, STD)
    expected = torch.from_numpy(arr).permute(2, 0, 1) / 255 - torch.tensor(MEAN)[:, None, None]
    torch.testing.assert_close(x, expected / torch.tensor(STD)[:, None, None])


def test_preprocess_grayscale_and_errors():
    x = preprocess(Image.new("RGB", (40, 40), (255, 255, 255)), (1, 32, 32), [0.5], [0.5])
    assert x.shape == (1, 32, 32) and torch.allclose(x, torch.ones(1, 32, 32))
    with pytest.raises(ValueError, match="1 or 3 input channels, not 4"):
        preprocess(Image.new("RGB", (8, 8)), (4, 8, 8), [0.5] * 4, [0.5] * 4)
    with pytest.raises(ValueError, match="need 3 values"):
        preprocess(Image.new("RGB", (8, 8)), (3, 8, 8), [0.5], [0.5])


def make_checkpoint(folder):
    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="dynamic").eval()
    with torch.no_grad():  # BatchNorm statistics of one random batch: features of unit scale
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model.train()(torch.randn(16, 3, 32, 32))
        model.eval()
        fc = model.get_classifier()
        fc.weight.mul_(2.0 / model(torch.randn(8, 3, 32, 32)).std())  # logits of spread ~2
    return checkpoint_of(model, folder / "last.pt", class_names=CLASSES, mean=MEAN, std=STD), model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _images(folder) -> list:
    rng = np.random.default_rng(1)
    paths = []
    for i, size in enumerate([(32, 32), (50, 40), (20, 70)]):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(path)
        paths.append(path)
    gray = folder / "gray.png"
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L").save(gray)
    return [*paths, gray]


def test_predict_prints_top5_of_the_softmax(checkpoint, tmp_path, capsys):
    ckpt, model = checkpoint
    paths = _images(tmp_path)
    assert main([str(ckpt), *map(str, paths), "--batch-size", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(paths) * 6
    for j, path in enumerate(paths):
        block = lines[6 * j : 6 * j + 6]
        assert block[0] == str(path)
        printed = [(line.split()[1], float(line.split()[0])) for line in block[1:]]
        with Image.open(path) as im:
            x = preprocess(im, (3, 32, 32), MEAN, STD)
        with torch.no_grad():
            probs = model(x[None]).softmax(-1)[0]
        top = probs.topk(5)
        assert [name for name, _ in printed] == [CLASSES[i] for i in top.indices.tolist()]
        np.testing.assert_allclose([p for _, p in printed], top.values.numpy(), atol=5e-5)
        assert all(a >= b for (_, a), (_, b) in zip(printed, printed[1:]))


def test_predict_function_matches_topk(checkpoint):
    _, model = checkpoint
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    result = predict(model, x, CLASSES, topk=3)
    with torch.no_grad():
        probs = model(x).softmax(-1)
    for row, p in zip(result, probs):
        assert [CLASSES.index(n) for n, _ in row] == p.topk(3).indices.tolist()
        np.testing.assert_allclose([v for _, v in row], p.topk(3).values.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="10 outputs but 2 class names"):
        predict(model, x, ["a", "b"])


def test_predict_bad_input(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    assert main([str(tmp_path / "missing.pt"), "x.png"]) == 2
    err = capsys.readouterr().err
    assert "missing.pt" in err and "does not exist" in err
    assert main([str(ckpt), str(tmp_path / "nope.png")]) == 2
    assert "nope.png" in capsys.readouterr().err
    text = tmp_path / "text.png"
    text.write_text("not an image")
    assert main([str(ckpt), str(text)]) == 2
    assert "not an image PIL can read" in capsys.readouterr().err


def test_predict_a_folder_is_its_image_files_in_order(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    paths = _images(folder / "sub")
    for name in ("notes.txt", ".x.png"):
        (folder / name).write_text("not an image")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / ".hidden" / "h.png")
    assert main([str(ckpt), str(folder)]) == 0
    by_folder = capsys.readouterr().out
    assert main([str(ckpt), *sorted(map(str, paths))]) == 0
    assert by_folder == capsys.readouterr().out  # the same images, the same order and output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(ckpt), str(empty)]) == 2
    assert "no image files" in capsys.readouterr().err


def test_predict_a_truncated_image_is_reported(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    (path,) = [p for p in _images(tmp_path) if p.suffix == ".jpg"][:1]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main([str(ckpt), str(truncated)]) == 2
    err = capsys.readouterr().err
    assert "truncated.jpg" in err and "not an image PIL can read" in err


def test_preprocess_of_file_evaluated_models_is_the_file_loaders_evaluation(tmp_path):
    """A run evaluated on image files (ImageNet, large folders) cropped its validation images
    with the FileLoader; predict and inspect crop new images the same way."""
    from dyshuffle.data import EVAL_CROP_FRACTION, FileLoader

    rng = np.random.default_rng(2)
    samples = []
    for i, (w, h) in enumerate([(128, 96), (40, 90), (37, 37), (64, 65)]):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        samples.append((str(path), 0))
    loader = FileLoader(
        samples,
        image_size=32,
        batch_size=4,
        train=False,
        device="cpu",
        mean=MEAN,
        std=STD,
        workers=0,
    )
    ((batch, _),) = list(loader.epoch(0))
    assert loader.crop_fraction == EVAL_CROP_FRACTION < 1
    mine = []
    for path, _ in samples:
        with Image.open(path) as im:
            mine.append(preprocess(im, (3, 32, 32), MEAN, STD, EVAL_CROP_FRACTION))
    torch.testing.assert_close(torch.stack(mine), batch, rtol=0, atol=1e-6)
    with Image.open(samples[0][0]) as im:  # the in-memory evaluation differs for such images
        assert not torch.allclose(preprocess(im, (3, 32, 32), MEAN, STD), batch[0], atol=0.1)
    with pytest.raises(ValueError, match="crop_fraction must be in"):
        preprocess(Image.new("RGB", (8, 8)), (3, 8, 8), MEAN, STD, 0)


def test_predict_decodes_one_batch_at_a_time_after_checking_every_file(
    checkpoint, tmp_path, capsys, monkeypatch
):
    """Memory does not grow with the number of images: when a batch is predicted, at most the
    images of the batches so far have been decoded. A missing file anywhere is reported before
    anything is printed; a truncated one (seen only when decoded) stops at its batch."""
    predict_mod = sys.modules[main.__module__]  # (the package's `predict` is the function)
    ckpt, _ = checkpoint
    paths = [str(p) for p in _images(tmp_path)] * 3  # 12 images
    decoded, seen = [0], []
    original_preprocess, original_predict = predict_mod.preprocess, predict_mod.predict

    def counting_preprocess(*args, **kwargs):
        decoded[0] += 1
        return original_preprocess(*args, **kwargs)

    def recording_predict(model, images, *args, **kwargs):
        seen.append((decoded[0], images.shape[0]))
        return original_predict(model, images, *args, **kwargs)

    monkeypatch.setattr(predict_mod, "preprocess", counting_preprocess)
    monkeypatch.setattr(predict_mod, "predict", recording_predict)
    assert main([str(ckpt), *paths, "--batch-size", "5"]) == 0
    assert seen == [(5, 5), (10, 5), (12, 2)]
    assert len(capsys.readouterr().out.splitlines()) == 12 * 6

    decoded[0] = 0
    assert main([str(ckpt), *paths, str(tmp_path / "gone.png"), "--batch-size", "5"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "gone.png" in out.err and decoded[0] == 0

    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), np.uint8)).save(big)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(big.read_bytes()[: big.stat().st_size // 2])  # its header is whole
    seen.clear()
    assert main([str(ckpt), *paths[:5], str(truncated), "--batch-size", "5"]) == 2
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 5 * 6 and "truncated.jpg" in out.err  # the first batch
    assert "not an image PIL can read" in out.err and len(seen) == 1
