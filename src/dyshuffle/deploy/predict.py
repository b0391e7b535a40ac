"""``dyshuffle predict``: the top-5 classes of images with a checkpoint.

Each image is converted to the checkpoint's channel count, its shorter side resized to the
checkpoint's input size (bilinear; for models evaluated on image files, to the size over the
checkpoint's ``eval_crop_fraction``), center-cropped to ``(H, W)`` (the evaluation transform of
the data loader the run evaluated with) and normalized with the checkpoint's ``mean`` and
``std``. The model runs in ``eval()``, where every dynamic shuffle applies its hard permutation.

    dyshuffle predict runs/cifar/last.pt cat.jpg ship.png
    dyshuffle predict runs/cifar/last.pt photos/        (every image file under the folder)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from .._progress import progress_bar
from ..data.common import is_image_file
from ._common import CheckpointError, fields_of, input_size_of, load_model

__all__ = ["image_paths", "main", "predict", "preprocess"]


def preprocess(
    image: Image.Image,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    crop_fraction: float = 1.0,
) -> Tensor:
    """A PIL image to a normalized ``(C, H, W)`` float tensor.

    Args:
        image: any PIL image (converted to RGB for 3 channels, to grayscale for 1).
        input_size: ``(C, H, W)``.
        mean: per-channel mean in ``[0, 1]`` units.
        std: per-channel standard deviation in ``[0, 1]`` units.
        crop_fraction: 1 (the in-memory loaders' evaluation: the shorter side resized to the
            crop) or, for models evaluated on image files, the file loader's fraction
            (:data:`~dyshuffle.data.EVAL_CROP_FRACTION`: the shorter side resized to
            ``H / crop_fraction`` with torchvision, then the center crop), as the checkpoint's
            ``eval_crop_fraction`` says.
    """
    c, h, w = (int(s) for s in input_size)
    if c not in (1, 3):
        raise ValueError(f"images can feed models with 1 or 3 input channels, not {c}")
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean {list(mean)} and std {list(std)} need {c} values each")
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
    image = image.convert("RGB" if c == 3 else "L")
    if crop_fraction != 1.0:  # the FileLoader's evaluation transform, exactly
        from torchvision import transforms as T

        resize = T.Resize(round(min(h, w) / crop_fraction), antialias=True)
        image = T.CenterCrop((h, w))(resize(image))
    else:
        scale = max(h / image.height, w / image.width)  # shorter side to the crop side
        size = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, Image.BILINEAR)
        left, top = (image.width - w) // 2, (image.height - h) // 2
        image = image.crop((left, top, left + w, top + h))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    x = x.reshape(h, w, c).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    m = torch.tensor(mean, dtype=torch.float32).view(c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(c, 1, 1)
    return (x - m) / s


@torch.no_grad()
def predict(
    model: nn.Module, images: Tensor, class_names: Sequence[str], topk: int = 5
) -> list[list[tuple[str, float]]]:
    """Top-``k`` ``(class name, probability)`` of each image of a normalized ``(N, C, H, W)`` batch.

    The model is put in ``eval()``; probabilities are the softmax of its logits.
    """
    model.eval()
    param = next(model.parameters(), None)
    if param is not None:
        images = images.to(device=param.device, dtype=param.dtype)
    probs = model(images).float().softmax(dim=-1).cpu()
    if probs.shape[-1] != len(class_names):
        raise ValueError(
            f"the model has {probs.shape[-1]} outputs but {len(class_names)} class names"
        )
    k = min(topk, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    return [
        [(class_names[i], float(p)) for p, i in zip(vals.tolist(), idx.tolist())]
        for vals, idx in zip(values, indices)
    ]


def image_paths(args: Sequence[str]) -> list[str]:
    """The files named, with each folder replaced by the image files under it (sorted, hidden
    files and folders left out); a path that does not exist is kept, to be reported."""
    paths: list[str] = []
    for arg in args:
        if not os.path.isdir(arg):
            paths.append(arg)
            continue
        found = []
        for root, dirs, files in os.walk(arg):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, f) for f in files if is_image_file(f)]
        paths += sorted(found)
    return paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dyshuffle predict", description="Print the top-5 classes of images with a checkpoint."
    )
    p.add_argument("checkpoint", help="checkpoint written by 'dyshuffle train'")
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files (any PIL format) or folders (their image files, recursively)",
    )
    p.add_argument("--topk", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bar on stderr (on a terminal)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dyshuffle predict``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        print("dyshuffle predict: --topk and --batch-size must be positive", file=sys.stderr)
        return 2
    try:
        model, state = load_model(args.checkpoint)
        input_size = input_size_of(state)
        names, mean, std = fields_of(state, args.checkpoint, "class_names", "mean", "std")
        class_names = [str(c) for c in names]
        crop_fraction = float(state.get("eval_crop_fraction", 1.0))  # (older checkpoints: 1)
    except CheckpointError as e:
        print(f"dyshuffle predict: {e}", file=sys.stderr)
        return 2
    paths = image_paths(args.images)
    if not paths:
        print(f"dyshuffle predict: no image files in {args.images}", file=sys.stderr)
        return 2
    # every file is checked before anything is printed (PIL reads only its header here); the
    # images are then decoded one batch at a time, so memory does not grow with their number
    for path in paths:
        if (error := _unreadable(path, header_only=True)) is not None:
            print(f"dyshuffle predict: {error}", file=sys.stderr)
            return 2
    with progress_bar(len(paths), "predict", enabled=args.progress, unit="img") as bar:
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start : start + args.batch_size]
            tensors = []
            for path in chunk:
                try:
                    with Image.open(path) as im:
                        tensors.append(preprocess(im, input_size, mean, std, crop_fraction))
                except (UnidentifiedImageError, OSError):  # e.g. truncated: seen when decoded
                    print(f"dyshuffle predict: {_unreadable(path)}", file=sys.stderr)
                    return 2
            results = predict(model, torch.stack(tensors), class_names, args.topk)
            for path, top in zip(chunk, results):
                print(path)
                for name, p in top:
                    print(f"  {p:.4f}  {name}")
            bar.update(len(chunk))
    return 0


def _unreadable(path: str, header_only: bool = False) -> str | None:
    """Why PIL cannot read the image ``path`` (``None`` when it can): with ``header_only``,
    the file must exist and PIL must know its format; else the whole image must decode."""
    try:
        with Image.open(path) as im:
            if not header_only:
                im.load()
    except FileNotFoundError:
        return f"image {path!r} does not exist"
    except (UnidentifiedImageError, OSError) as e:  # not an image, truncated, unreadable
        return f"{path!r} is not an image PIL can read ({e})"
    return None


if __name__ == "__main__":
    raise SystemExit(main())
