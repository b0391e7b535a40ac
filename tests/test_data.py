"""Data sets in their official formats (built here as tiny fakes), loaders and augmentation."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dyshuffle.data import (
    ArrayData,
    DatasetError,
    EpochPlan,
    FileData,
    FileLoader,
    InMemoryLoader,
    load_data,
    normalize,
    parse_layout,
    random_crop,
)
from dyshuffle.data import datasets as datasets_mod
from dyshuffle.data import folder as folder_mod
from dyshuffle.data.decode import open_image

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


# -- fake data sets in the official layouts (also used by the training tests)


def class_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """An easy-to-learn (H, W, 3) uint8 image: a class-specific colour and bar, plus noise."""
    img = rng.integers(0, 60, (size, size, 3)).astype(np.int64)
    img[..., label % 3] += 120
    bar = (label * size) // 10
    img[bar : bar + max(size // 10, 1), :, :] += 70
    return img.clip(0, 255).astype(np.uint8)


def make_cifar(
    root: Path,
    name: str = "cifar10",
    per_file: int = 20,
    test: int = 30,
    seed: int = 0,
    bytes_keys: bool = False,
) -> dict:
    """Write a fake cifar-10-batches-py (or cifar-100-python); return what was written."""
    rng = np.random.default_rng(seed)
    k = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    labels_key = "labels" if name == "cifar10" else "fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    written = {}

    def dump(path: Path, d: dict) -> None:
        if bytes_keys:
            d = {kk.encode(): v for kk, v in d.items()}
        with open(path, "wb") as f:
            pickle.dump(d, f)

    for fname, n in [(f, per_file) for f in files] + [
        ("test_batch" if name == "cifar10" else "test", test)
    ]:
        y = (np.arange(n) % k).tolist()
        rng.shuffle(y)
        imgs = np.stack([class_image(c % 10, rng) for c in y])  # (N, H, W, C)
        data = imgs.transpose(0, 3, 1, 2).reshape(n, 3072)  # rows: R plane, G plane, B plane
        d = {"data": data, labels_key: y, "batch_label": fname}
        if name == "cifar100":
            d["coarse_labels"] = [c % 20 for c in y]
        dump(folder / fname, d)
        written[fname] = (imgs, y)
    names = CIFAR10_NAMES if name == "cifar10" else [f"class{i:03d}" for i in range(100)]
    meta = (
        {"label_names": names, "num_cases_per_batch": per_file}
        if name == "cifar10"
        else {"fine_label_names": names, "coarse_label_names": [f"super{i}" for i in range(20)]}
    )
    dump(folder / ("batches.meta" if name == "cifar10" else "meta"), meta)
    written["names"] = names
    return written


def save_jpeg(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95)


def make_tiny_imagenet(
    root: Path, wnids=("n02", "n01", "n03"), per_class: int = 3, seed: int = 0
) -> Path:
    """Write a fake tiny-imagenet-200 (64x64 JPEGs, val annotations, wnids.txt, words.txt)."""
    rng = np.random.default_rng(seed)
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    words = {
        "n01": "goldfish, Carassius auratus",
        "n02": "tabby, tabby cat",
        "n03": "sports car",
        "n99": "unused",
    }
    (base / "words.txt").write_text("".join(f"{w}\t{t}\n" for w, t in words.items()))
    for i, w in enumerate(wnids):
        for j in range(per_class):
            save_jpeg(base / "train" / w / "images" / f"{w}_{j}.JPEG", class_image(i, rng, 64))
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for j, w in enumerate(["n01", "n03", "n02", "n01"]):
        save_jpeg(base / "val" / "images" / f"val_{j}.JPEG", class_image(j, rng, 64))
        lines.append(f"val_{j}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (base / "test" / "images").mkdir(parents=True)
    return base


def make_image_tree(
    root: Path,
    classes=("cat", "dog", "eel"),
    train: int = 4,
    val: int = 2,
    size: int = 16,
    val_name: str = "test",
    seed: int = 0,
) -> dict:
    """Write ROOT/train/<class>/*.png and ROOT/<val_name>/<class>/*.png; return the images."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", train), (val_name, val)):
        for c, name in enumerate(classes):
            for j in range(n):
                img = class_image(c, rng, size)
                path = root / split / name / f"{j:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path)
                out[f"{split}/{name}/{j:04d}.png"] = img
    return out


def make_tgz(folder: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=arcname)
    return archive


# -- CIFAR


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_official_format(tmp_path, bytes_keys):
    written = make_cifar(tmp_path, "cifar10", per_file=12, test=30, bytes_keys=bytes_keys)
    d = load_data("cifar10", tmp_path)
    assert isinstance(d, ArrayData)
    assert d.class_names == CIFAR10_NAMES
    assert d.train_images.shape == (60, 3, 32, 32) and d.val_images.shape == (30, 3, 32, 32)
    # the five batches in order, then the test batch; images decoded from the R/G/B planes
    imgs = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert torch.equal(d.train_images, torch.from_numpy(imgs).permute(0, 3, 1, 2))
    assert d.train_labels.tolist() == labels
    assert d.val_labels.tolist() == written["test_batch"][1]
    assert torch.equal(d.val_images, torch.from_numpy(written["test_batch"][0]).permute(0, 3, 1, 2))
    # the root may also be the batches folder itself
    d2 = load_data("cifar10", tmp_path / "cifar-10-batches-py")
    assert torch.equal(d2.train_labels, d.train_labels)
    assert d.hflip and d.crop_padding == 4


def test_cifar100_fine_labels(tmp_path):
    written = make_cifar(tmp_path, "cifar100", per_file=200, test=100)
    d = load_data("cifar100", tmp_path)
    assert len(d.class_names) == 100 and d.class_names[7] == "class007"
    assert d.train_labels.tolist() == written["train"][1]
    assert d.val_labels.tolist() == written["test"][1]
    assert sorted(set(d.train_labels.tolist())) == list(range(100))


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(
        DatasetError, match=r"(?s)cifar-10-batches-py/batches.meta in .*\n.*data_batch_1"
    ):
        load_data("cifar10", tmp_path)  # folder exists, files do not
    with pytest.raises(DatasetError, match="does not exist"):
        load_data("cifar10", tmp_path / "nowhere")
    make_cifar(tmp_path, "cifar10", per_file=4, test=4)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match=str(bad)):
        load_data("cifar10", tmp_path)
    bad.unlink()
    with pytest.raises(DatasetError, match=f"missing file {bad}"):
        load_data("cifar10", tmp_path)


def test_download_is_skipped_when_data_dir_is_the_batches_folder(tmp_path, monkeypatch):
    """--data-dir may name cifar-10-batches-py (or cifar-100-python) itself, with --download too;
    only missing files are downloaded."""
    from dyshuffle.data import formats

    calls = []

    def fake_download(name, root):
        calls.append((name, root))
        make_cifar(root, name, per_file=2, test=2)

    monkeypatch.setattr(formats, "download_cifar", fake_download)
    for name, folder in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")):
        make_cifar(tmp_path / name, name, per_file=4, test=4)
        inside = load_data(name, tmp_path / name / folder, download=True)
        above = load_data(name, tmp_path / name, download=True)
        assert calls == [] and torch.equal(inside.train_images, above.train_images)
    fetched = load_data("cifar10", tmp_path / "new", download=True)
    assert calls == [("cifar10", tmp_path / "new")] and len(fetched.train_labels) == 10


def test_unknown_names_are_rejected_with_choices():
    with pytest.raises(
        ValueError, match="unknown data set 'cifar'; valid: digits, cifar10, cifar100"
    ):
        load_data("cifar", "x")
    with pytest.raises(ValueError, match="unknown loader 'gpu'; valid: auto, memory, workers"):
        load_data("digits", loader="gpu")


# -- digits


def test_digits_embedded_split():
    d = load_data("digits")
    assert d.train_images.shape == (1437, 3, 32, 32) and d.val_images.shape == (360, 3, 32, 32)
    assert d.class_names == [str(i) for i in range(10)]
    share = 360 * torch.bincount(torch.cat([d.train_labels, d.val_labels])) / 1797
    assert (d.val_labels.bincount() - share).abs().max() < 1  # stratified
    assert torch.equal(d.train_images[:, 0], d.train_images[:, 2])  # grey replicated
    assert d.train_images.max() == 255 and d.train_images.min() == 0
    assert not d.hflip  # flipping digits changes their meaning
    again = load_data("digits")
    assert torch.equal(again.val_images, d.val_images) and torch.equal(
        again.val_labels, d.val_labels
    )


# -- Tiny ImageNet


def test_tiny_imagenet_official_layout(tmp_path):
    make_tiny_imagenet(tmp_path)
    d = load_data("tiny-imagenet", tmp_path, cache_dir=tmp_path / "cache")
    assert d.extra["wnids"] == ["n01", "n02", "n03"]  # labels follow the sorted wnids
    assert d.class_names == ["goldfish", "tabby", "sports car"]  # first synonym of words.txt
    assert d.train_images.shape == (9, 3, 64, 64)
    assert d.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert d.val_labels.tolist() == [0, 2, 1, 0]  # from val_annotations.txt
    # the same data through the file loader path
    f = load_data("tiny-imagenet", tmp_path / "tiny-imagenet-200", loader="workers")
    assert isinstance(f, FileData) and f.image_size == 64
    assert [y for _, y in f.val_samples] == [0, 2, 1, 0]
    assert f.val_samples[1][0].endswith("val/images/val_1.JPEG")


def test_tiny_imagenet_errors_name_the_file(tmp_path):
    base = make_tiny_imagenet(tmp_path)
    ann = base / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_9.JPEG\tn77\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match=r"val_annotations.txt, line 5: .*'val_9.JPEG\\tn77"):
        load_data("tiny-imagenet", tmp_path, loader="workers")
    ann.unlink()
    with pytest.raises(DatasetError, match=f"missing file {ann}"):
        load_data("tiny-imagenet", tmp_path, loader="workers")
    with pytest.raises(DatasetError, match="(?s)no wnids.txt.*\n.*tiny-imagenet-200/wnids.txt"):
        load_data("tiny-imagenet", tmp_path / "tiny-imagenet-200" / "train")


def test_tiny_imagenet_cache_follows_annotations_and_words(tmp_path):
    """The decoded cache is keyed by the labels and names too, not only by the image files."""
    base = make_tiny_imagenet(tmp_path)
    cache = tmp_path / "cache"
    assert load_data("tiny-imagenet", tmp_path, cache_dir=cache).val_labels.tolist() == [0, 2, 1, 0]
    ann = base / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text().replace("val_0.JPEG\tn01", "val_0.JPEG\tn03"))
    words = base / "words.txt"
    words.write_text(words.read_text().replace("goldfish", "carp"))
    d = load_data("tiny-imagenet", tmp_path, cache_dir=cache)
    assert d.val_labels.tolist() == [2, 2, 1, 0] and d.class_names[0] == "carp"


# -- ImageNet


def test_imagenet_class_folders(tmp_path):
    make_image_tree(tmp_path, classes=("n015", "n014"), train=3, val=2, size=40, val_name="val")
    d = load_data("imagenet", tmp_path, image_size=24)
    assert isinstance(d, FileData) and d.class_names == ["n014", "n015"]
    assert len(d.train_samples) == 6 and len(d.val_samples) == 4
    assert [y for _, y in d.val_samples] == [0, 0, 1, 1]
    assert all(Path(p).parent.name == d.class_names[y] for p, y in d.train_samples)
    loader = FileLoader(
        d.val_samples,
        image_size=24,
        batch_size=4,
        train=False,
        device="cpu",
        mean=d.mean,
        std=d.std,
        workers=0,
    )
    ((x, y),) = list(loader.epoch(0))
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and y.tolist() == [0, 0, 1, 1]
    train = FileLoader(
        d.train_samples,
        image_size=24,
        batch_size=2,
        train=True,
        device="cpu",
        mean=d.mean,
        std=d.std,
        workers=0,
        seed=3,
    )
    full = [b[1].tolist() for b in train.epoch(5)]
    assert [b[1].tolist() for b in train.epoch(5, start_step=1)] == full[1:]  # resumable order


def test_imagenet_flat_val_is_explained(tmp_path):
    make_image_tree(tmp_path, classes=("n01",), train=1, val=1, val_name="val")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "val" / "ILSVRC2012_val_1.png")
    with pytest.raises(DatasetError, match=r"(?s)holds images directly.*\n.*ROOT/val/<wnid>"):
        load_data("imagenet", tmp_path)
    with pytest.raises(DatasetError, match=r"missing folder .*train"):
        load_data("imagenet", tmp_path / "val")


# -- image folders (folders and archives)


def test_imagefolder_folder_and_tgz_agree(tmp_path):
    tree = tmp_path / "tree"
    written = make_image_tree(tree, classes=("cat", "dog", "eel"), train=4, val=2)
    cache = tmp_path / "cache"
    d = load_data("imagefolder", tree, cache_dir=cache)
    assert d.class_names == ["cat", "dog", "eel"]
    assert d.train_labels.bincount().tolist() == [4, 4, 4] and d.val_labels.tolist() == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    assert torch.equal(
        d.val_images[2], torch.from_numpy(written["test/dog/0000.png"]).permute(2, 0, 1)
    )
    archive = make_tgz(tree, tmp_path / "tree.tgz", "wrapper-folder")
    a = load_data("imagefolder", archive, cache_dir=cache)
    assert a.class_names == d.class_names
    assert torch.equal(a.train_images, d.train_images) and torch.equal(a.val_labels, d.val_labels)
    assert d.extra == {"train_dir": "train", "val_dir": "test"}
    assert a.extra == {"train_dir": "wrapper-folder/train", "val_dir": "wrapper-folder/test"}
    # the workers path extracts the archive once into the cache, keyed by path, size and mtime
    f = load_data("imagefolder", archive, loader="workers", cache_dir=cache)
    assert isinstance(f, FileData) and len(f.train_samples) == 12 and f.image_size == 16
    extracted = list((cache / "extracted").iterdir())
    assert len(extracted) == 1 and extracted[0].name.startswith("tree-")
    assert Path(f.train_samples[0][0]).is_relative_to(extracted[0])


def test_hidden_folders_are_skipped_in_folders_and_archives(tmp_path):
    """A hidden folder (.ipynb_checkpoints/, .thumbs/) is no class and holds no images, in a
    folder and in an archive read in memory, whatever the archive's member prefix."""
    tree = tmp_path / "tree"
    make_image_tree(tree, classes=("cat", "dog"), train=2, val=1)
    rng = np.random.default_rng(1)
    for hidden in (
        "train/.ipynb_checkpoints/0000.png",
        "train/cat/.thumbs/0000.png",
        "test/.cache/dog/0000.png",
        ".git/x/0000.png",
    ):
        (tree / hidden).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(class_image(0, rng, 16)).save(tree / hidden)
    cache = tmp_path / "cache"
    folder = load_data("imagefolder", tree, cache_dir=cache)
    assert folder.class_names == ["cat", "dog"] and folder.extra["train_dir"] == "train"
    assert folder.train_labels.tolist() == [0, 0, 1, 1] and folder.val_labels.tolist() == [0, 1]
    for arcname in ("t", "."):  # members "t/train/..." and "./train/..."
        archive = make_tgz(tree, tmp_path / f"tree{len(arcname)}.tgz", arcname)
        a = load_data("imagefolder", archive, cache_dir=cache)
        assert a.class_names == folder.class_names, arcname
        assert torch.equal(a.train_images, folder.train_images), arcname
        assert torch.equal(a.val_labels, folder.val_labels), arcname
    with pytest.raises(ValueError, match="image_size must be at least 1"):
        load_data("imagefolder", tree, loader="workers", image_size=0)


def test_imagefolder_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    make_image_tree(tree, train=2, val=1)
    archive = make_tgz(tree, tmp_path / "t.tar.gz", "t")
    first = load_data("imagefolder", archive, cache_dir=tmp_path / "c")

    def no_decoding(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(datasets_mod, "decode_images", no_decoding)
    again = load_data("imagefolder", archive, cache_dir=tmp_path / "c")
    assert torch.equal(again.train_images, first.train_images)
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "a new archive"
    with pytest.raises(AssertionError, match="decoded again"):
        load_data("imagefolder", archive, cache_dir=tmp_path / "c")


def test_imagefolder_holds_out_validation_without_split_folders(tmp_path):
    make_image_tree(tmp_path, classes=("a", "b"), train=10, val=0)
    d = load_data("imagefolder", tmp_path / "train", val_fraction=0.2, cache_dir=tmp_path / "c")
    assert d.train_labels.bincount().tolist() == [8, 8] and d.val_labels.bincount().tolist() == [
        2,
        2,
    ]
    both = torch.cat([d.train_images, d.val_images]).flatten(1)
    assert len({tuple(r.tolist()) for r in both}) == 20  # a partition: nothing held out twice


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(
        DatasetError, match=r"(?s)no image files found in ROOT\n.*ROOT/train/<class>"
    ):
        parse_layout([], "ROOT")
    with pytest.raises(
        DatasetError, match=r"x.jpg lies directly in R/train, not in a class folder"
    ):
        parse_layout(["train/x.jpg", "val/a/y.jpg"], "R")
    with pytest.raises(DatasetError, match=r"validation classes \['zebra'\] of R/val"):
        parse_layout(["train/a/1.jpg", "val/zebra/2.jpg"], "R")
    with pytest.raises(
        DatasetError, match=r"no validation folder 'holdout' in R \(found: train, val\)"
    ):
        parse_layout(["train/a/1.jpg", "val/a/2.jpg"], "R", val_split="holdout")
    lay = parse_layout(["w/train/a/1.jpg", "w/valid/a/2.jpg", "w/train/b/3.jpg"], "R")
    assert lay.classes == ["a", "b"] and lay.val == [("w/valid/a/2.jpg", 0)]
    with pytest.raises(DatasetError, match="does not exist"):
        load_data("imagefolder", tmp_path / "missing.tgz")


@pytest.mark.parametrize("archive", [False, True])
def test_corrupt_image_is_named(tmp_path, archive):
    tree = tmp_path / "tree"
    make_image_tree(tree, train=2, val=1)
    bad = tree / "train" / "dog" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated file
    root = make_tgz(tree, tmp_path / "t.tgz", "t") if archive else tree
    name = "t/train/dog/0001.png" if archive else str(bad)
    with pytest.raises(DatasetError, match=f"cannot decode image .*{name}"):
        load_data("imagefolder", root, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c" / "arrays").exists() or not any(
        (tmp_path / "c" / "arrays").iterdir()
    )


def test_corrupt_archive_is_named(tmp_path):
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DatasetError, match=f"{broken}"):
        load_data("imagefolder", broken, cache_dir=tmp_path / "c")


def test_missing_data_dir_is_named():
    with pytest.raises(DatasetError, match="'imagefolder' needs --data-dir"):
        load_data("imagefolder", None)


@pytest.mark.parametrize("mode", ["L", "P", "LA", "RGBA", "CMYK", "I;16", "I;16B", "I"])
def test_grey_palette_and_16_bit_images_become_rgb(mode):
    """Every mode becomes RGB with its grey level kept: 16-bit values are scaled by 1/257 (as
    torchvision.io does), not clipped at 255."""
    grey = np.full((4, 4), 128, np.uint8)
    if mode in ("I;16", "I;16B"):  # grey level 128 as 16 bits: 128 * 257
        im = Image.frombytes(
            mode, (4, 4), (grey.astype(">u2" if "B" in mode else "<u2") * 257).tobytes()
        )
    elif mode == "I":
        im = Image.fromarray(grey.astype(np.int32) * 257, "I")
    else:
        im = Image.fromarray(grey).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG" if mode == "CMYK" else "TIFF" if mode == "I" else "PNG")
    rgb = np.asarray(open_image(buf.getvalue(), "x"))
    assert rgb.shape == (4, 4, 3) and (abs(rgb.astype(int) - 128) <= 1).all(), (mode, rgb[0, 0])


def test_float_images_in_0_1_are_scaled_and_others_clipped(tmp_path):
    """Float grey images (mode F, e.g. a 32-bit TIFF): values within [0, 1] (the range
    torchvision's to_tensor leaves floats in) are scaled by 255, not clipped to black; others are
    clipped to 0..255 as PIL's conversion does."""
    ramp = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(ramp, "F").save(tmp_path / "ramp.tiff")
    rgb = np.asarray(open_image(str(tmp_path / "ramp.tiff"), "ramp")).astype(np.float64)
    assert rgb.shape == (4, 4, 3) and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert (abs(rgb - ramp[..., None] * 255) <= 0.5 + 1e-4).all(), rgb[..., 0]
    wide = np.array([[-5.0, 0.0, 100.4, 300.0]], np.float32)
    Image.fromarray(wide, "F").save(tmp_path / "wide.tiff")
    rgb = np.asarray(open_image(str(tmp_path / "wide.tiff"), "wide"))
    assert rgb[..., 0].tolist() == [[0, 0, 100, 255]] and (rgb == rgb[..., :1]).all()


def test_empty_class_folder_is_an_error(tmp_path):
    """A class folder without images would silently shift every later label (torchvision's
    ImageFolder refuses it too): folders, archives (both loaders) and ImageNet name it."""
    tree = tmp_path / "tree"
    make_image_tree(tree, classes=("a", "b", "c"), train=2, val=1, val_name="val")
    for split in ("train", "val"):
        for f in (tree / split / "b").iterdir():
            f.unlink()
    (tree / "train" / "b" / "notes.txt").write_text("no images here")
    archive = make_tgz(tree, tmp_path / "t.tgz", "t")
    for root, loader in (
        (tree, "memory"),
        (tree, "workers"),
        (archive, "memory"),
        (archive, "workers"),
    ):
        with pytest.raises(DatasetError, match="class folder .*train/b holds no images"):
            load_data("imagefolder", root, loader=loader, cache_dir=tmp_path / "c")
    with pytest.raises(DatasetError, match="class folder .*train/b holds no images"):
        load_data("imagenet", tree)


def test_folder_and_archive_split_alike_with_nested_folders(tmp_path):
    """Images in sub-folders of a class: a folder and its archive (both loaders) list them in
    the same order, so the held-out validation part is the same."""
    tree = tmp_path / "tree"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i, rel in enumerate(["x.png", "x/1.png", "x/2.png", "x-1.png", "y.png", "z/3.png"]):
            (tree / c / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(class_image(i, rng, 8)).save(tree / c / rel)
    archive = make_tgz(tree, tmp_path / "t.tgz", "t")
    kw = dict(val_fraction=0.5, cache_dir=tmp_path / "c")
    folder = load_data("imagefolder", tree, **kw)
    memory = load_data("imagefolder", archive, **kw)
    files = load_data("imagefolder", archive, loader="workers", **kw)
    assert torch.equal(folder.val_images, memory.val_images)
    assert torch.equal(folder.train_images, memory.train_images)
    held = [open_image(p, p) for p, _ in files.val_samples]
    assert torch.equal(
        torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in held]),
        folder.val_images,
    )


def test_archive_hardlinks_are_read_in_memory(tmp_path):
    """A tar stores the second name of a hard-linked file as a link: both loaders keep it."""
    tree = tmp_path / "tree"
    make_image_tree(tree, classes=("a", "b"), train=2, val=1)
    os.link(tree / "train" / "a" / "0000.png", tree / "train" / "b" / "0009.png")
    archive = make_tgz(tree, tmp_path / "t.tgz", "t")
    memory = load_data("imagefolder", archive, cache_dir=tmp_path / "c")
    files = load_data("imagefolder", archive, loader="workers", cache_dir=tmp_path / "c")
    assert memory.train_labels.tolist() == [y for _, y in files.train_samples] == [0, 0, 1, 1, 1]
    assert torch.equal(memory.train_images[0], memory.train_images[-1])


def test_cache_notices_an_image_moved_between_classes(tmp_path):
    """A rename keeps the count, bytes and modification times: the cache key must see it."""
    tree = tmp_path / "tree"
    make_image_tree(tree, classes=("a", "b"), train=3, val=1)
    cache = tmp_path / "c"
    assert load_data("imagefolder", tree, cache_dir=cache).train_labels.tolist() == [
        0,
        0,
        0,
        1,
        1,
        1,
    ]
    os.rename(tree / "train" / "a" / "0000.png", tree / "train" / "b" / "0009.png")
    moved = load_data("imagefolder", tree, cache_dir=cache)
    assert moved.train_labels.tolist() == [0, 0, 1, 1, 1, 1]


def test_concurrent_extraction_uses_the_winner(tmp_path, monkeypatch):
    """Two runs extracting the same archive at once: the one that finishes second keeps the
    first one's folder instead of failing on the rename."""
    tree = tmp_path / "tree"
    make_image_tree(tree, train=2, val=1)
    archive = make_tgz(tree, tmp_path / "t.tgz", "t")
    cache = tmp_path / "c"
    real_open = folder_mod._open_tar

    def other_run_finishes_first(path, stream):
        monkeypatch.setattr(folder_mod, "_open_tar", real_open)
        folder_mod.extract_once(path, cache)
        return real_open(path, stream)

    monkeypatch.setattr(folder_mod, "_open_tar", other_run_finishes_first)
    target = folder_mod.extract_once(archive, cache)
    assert [p.name for p in (cache / "extracted").iterdir()] == [target.name]
    assert len(list(target.rglob("*.png"))) == 9


def test_stale_temporary_folders_of_killed_runs_are_removed(tmp_path):
    """A run killed while writing the decoded cache or extracting an archive leaves a .tmp-* or
    .extract-* folder: the next run removes those in which nothing changed for hours, never one
    that a running process may still be filling (a fresh one, or an old one with a fresh file)."""
    tree = tmp_path / "tree"
    make_image_tree(tree, train=2, val=1)
    archive = make_tgz(tree, tmp_path / "t.tgz", "t")
    cache = tmp_path / "c"
    hours_ago = time.time() - 3 * 3600
    for parent, prefix in ((cache / "arrays", ".tmp-"), (cache / "extracted", ".extract-")):
        for kind in ("old", "fresh", "busy"):
            sub = parent / f"{prefix}{kind}" / "train"
            sub.mkdir(parents=True)
            if kind == "busy":  # a long extraction: new files deep down, the top folder old
                (sub / "0000.png").write_bytes(b"")
            if kind != "fresh":
                for d in (sub, sub.parent):
                    os.utime(d, (hours_ago, hours_ago))
    load_data("imagefolder", archive, cache_dir=cache)  # decodes into c/arrays
    load_data("imagefolder", archive, loader="workers", cache_dir=cache)  # into c/extracted
    for parent, prefix in ((cache / "arrays", ".tmp-"), (cache / "extracted", ".extract-")):
        left = sorted(p.name for p in parent.iterdir() if p.name.startswith(prefix))
        assert left == [f"{prefix}busy", f"{prefix}fresh"], left
        assert len(list(parent.iterdir())) == 3  # and the cache or extracted folder


# -- order, sharding and augmentation


def test_epoch_plan_is_a_function_of_seed_and_epoch_and_shards_partition_batches():
    one = EpochPlan(103, 20, seed=7)
    assert one.steps == 5 and torch.equal(one.order(3), EpochPlan(103, 20, seed=7).order(3))
    assert not torch.equal(one.order(3), one.order(4))
    assert not torch.equal(one.order(3), EpochPlan(103, 20, seed=8).order(3))
    ranks = [EpochPlan(103, 20, world_size=4, rank=r, seed=7) for r in range(4)]
    order = one.order(2)
    for step in range(one.steps):
        parts = [order[p.positions(step)] for p in ranks]
        assert torch.equal(torch.cat(parts), order[one.positions(step)])  # same global batch
    with pytest.raises(ValueError, match="multiple of the world size 4"):
        EpochPlan(100, 10, world_size=4)
    assert EpochPlan(10, 64).global_batch == 10  # tiny data sets: one batch of everything


def test_random_crop_matches_pad_and_slice():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 10), generator=g, dtype=torch.uint8)
    off = torch.randint(0, 7, (6, 2), generator=g)
    y = random_crop(x, off, 3)
    xp = torch.nn.functional.pad(x, (3, 3, 3, 3))
    for i in range(6):
        r, c = off[i].tolist()
        assert torch.equal(y[i], xp[i, :, r : r + 8, c : c + 10])
    assert torch.equal(random_crop(x, torch.full((6, 2), 3), 3), x)  # centre offset: identity


def test_in_memory_loader_resumes_mid_epoch_and_shards_evaluation():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (50, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(50)
    kw = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), seed=4)
    train = InMemoryLoader(
        images, labels, batch_size=16, train=True, crop_padding=2, hflip=True, **kw
    )
    full = list(train.epoch(2))
    assert len(full) == 3 and all(y.shape == (16,) for _, y in full)
    tail = list(train.epoch(2, start_step=1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[1:], tail))
    seen = torch.cat([y for _, y in full])
    assert len(set(seen.tolist())) == 48  # no repeats; the last 2 samples are dropped
    assert not torch.equal(full[0][1], list(train.epoch(3))[0][1])  # a new order each epoch
    # evaluation: no augmentation; two ranks see every sample exactly once
    ev = [
        InMemoryLoader(images, labels, batch_size=7, train=False, world_size=2, rank=r, **kw)
        for r in (0, 1)
    ]
    got = torch.cat([y for e in ev for _, y in e.epoch(0)])
    assert sorted(got.tolist()) == list(range(50))
    x0, y0 = next(ev[0].epoch(0))
    assert torch.allclose(x0, normalize(images[y0], torch.full((3,), 0.5), torch.full((3,), 0.25)))
    assert torch.allclose(x0.mean(), (images[y0].float() / 255 - 0.5).mean() / 0.25)


def test_flip_and_crop_are_applied_per_sample():
    images = torch.arange(4 * 1 * 4 * 4, dtype=torch.uint8).reshape(4, 1, 4, 4)
    ld = InMemoryLoader(
        images.expand(-1, 3, -1, -1).contiguous(),
        torch.arange(4),
        batch_size=4,
        train=True,
        mean=(0, 0, 0),
        std=(1 / 255,) * 3,
        crop_padding=0,
        hflip=True,
        seed=0,
    )
    flips = set()
    for epoch in range(6):
        x, y = next(ld.epoch(epoch))
        for xi, yi in zip(x, y):
            src = images[yi, 0].float()
            same, flipped = torch.allclose(xi[0], src), torch.allclose(xi[0], src.flip(-1))
            assert same or flipped
            flips.add(flipped)
    assert flips == {True, False}


def _file_epoch(samples, epoch, start_step=0, *, workers=0, seed=3, world_size=1, rank=0):
    """The training batches of a FileLoader over ``samples``, as raw uint8 values (float)."""
    loader = FileLoader(
        samples,
        image_size=12,
        batch_size=4,
        train=True,
        device="cpu",
        mean=(0.0, 0.0, 0.0),
        std=(1 / 255,) * 3,
        seed=seed,
        world_size=world_size,
        rank=rank,
        workers=workers,
    )
    return list(loader.epoch(epoch, start_step))


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b)
    )


@pytest.fixture(scope="module")
def file_samples(tmp_path_factory):
    """12 training images (3 classes of 4, 20 x 20) and their ``(path, label)`` pairs."""
    root = tmp_path_factory.mktemp("files")
    images = make_image_tree(root, train=4, val=0, size=20)
    return [
        (str(root / rel), int(["cat", "dog", "eel"].index(rel.split("/")[1]))) for rel in images
    ]


def test_file_loader_augmentation_is_a_function_of_seed_epoch_and_sample(file_samples):
    """A resumed epoch, any number of workers and any number of processes see the same crops."""
    torch.manual_seed(0)
    full = _file_epoch(file_samples, 2)
    assert len(full) == 3 and full[0][0].shape == (4, 3, 12, 12)
    torch.manual_seed(1)  # the caller's generator plays no part
    assert _same_batches(_file_epoch(file_samples, 2, 1), full[1:])  # resumed at step 1
    for workers in (1, 2):
        assert _same_batches(_file_epoch(file_samples, 2, workers=workers), full)
        assert _same_batches(_file_epoch(file_samples, 2, 2, workers=workers), full[2:])
    ranks = [_file_epoch(file_samples, 2, 1, world_size=2, rank=r) for r in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(full[1:], *ranks):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))

    def crops(batches) -> set[bytes]:  # the augmented images, whatever their order
        return {bytes(x.to(torch.uint8).numpy()) for xb, _ in batches for x in xb}

    assert len(crops(full)) == 12  # every sample once (no incomplete batch to drop)
    assert crops(full) != crops(_file_epoch(file_samples, 3))  # a new augmentation each epoch
    assert crops(full) != crops(_file_epoch(file_samples, 2, seed=4))  # and each seed


def test_file_loader_leaves_the_callers_generator_alone(file_samples):
    torch.manual_seed(5)
    state = torch.get_rng_state()
    _file_epoch(file_samples, 0)
    assert torch.equal(torch.get_rng_state(), state)
    # evaluation draws nothing: the same batches whatever the caller's generator holds
    loader = FileLoader(
        file_samples,
        image_size=12,
        batch_size=5,
        train=False,
        device="cpu",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        workers=0,
    )
    first = list(loader.epoch(0))
    torch.manual_seed(6)
    assert _same_batches(list(loader.epoch(0)), first)
    assert sorted(torch.cat([y for _, y in first]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4
