"""``dyshuffle evaluate``: top-1/top-5 of a checkpoint on a data set.

Examples::

    dyshuffle evaluate runs/NAME/best.pt                 # the run's own validation split
    dyshuffle evaluate runs/NAME --data imagefolder --data-dir ../shared/data/cifar10-jpeg.tgz
    dyshuffle evaluate runs/NAME/last.pt --json eval.json --permutation both
    dyshuffle evaluate runs/NAME --assignment optimal   # the nearest permutations, not greedy

For models with dynamic-shuffle layers it reports the accuracy with hard permutations (the
deployed layer) and with the soft matrices; ``--permutation identity`` (or ``all``) adds the
accuracy with every layer's identity factors forced for every input (its fixed cross-group
shuffle): what the permutations the layers chose are worth to the trained network.
``--assignment`` binarizes the dynamic layers' factors another way than in training (e.g. the
nearest permutations, ``optimal``, of a network trained with the greedy ones): what the
binarization costs the trained network.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["PERMUTATION_CHOICES", "evaluate_checkpoint", "main"]

#: ``--permutation``: one mode of :func:`~dyshuffle.layers.permutation_mode`, or a group of them
PERMUTATION_CHOICES = ("both", "hard", "soft", "identity", "all")
_GROUPS = {"both": ["hard", "soft"], "all": ["hard", "soft", "identity"]}


def evaluate_checkpoint(
    checkpoint: str,
    *,
    data: str | None = None,
    data_dir: str | None = None,
    split: str = "val",
    batch_size: int = 500,
    device: str = "auto",
    amp: str = "none",
    weights: str = "auto",
    permutation: str = "both",
    assignment: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint; the data set defaults to the one it was trained on.

    Args:
        checkpoint: a checkpoint file or a run folder.
        data, data_dir: another data set (its classes must match the checkpoint's in number).
        split: ``"val"`` or ``"train"`` (the training images, without augmentation).
        batch_size: images per forward.
        device, amp: as in ``dyshuffle train``.
        weights: ``"auto"`` (the weights the run evaluated: its ``--eval-weights``, by default
            the EMA when kept), ``"model"`` or ``"ema"``.
        permutation: ``"hard"``, ``"soft"``, ``"identity"`` (the identity factors forced in
            every dynamic layer, :func:`~dyshuffle.layers.permutation_mode`), ``"both"`` (hard
            and soft) or ``"all"`` (the three); for dynamic models.
        assignment: the binarization of every dynamic layer (``"auto"``, ``"exact"``,
            ``"greedy"`` or ``"optimal"``, see :class:`~dyshuffle.layers.DynamicShuffle`) in
            place of the trained one; ``None``: the trained one. A ValueError for another
            value (the layers' check) or a model without dynamic layers.
        overrides: other data options of :class:`~dyshuffle.train.config.TrainConfig`
            (``cache_dir``, ``loader``, ``val_subset``, ...).
        progress: a bar of the batches on a terminal (stderr).

    Returns:
        ``top1``, ``top5``, ``count`` (and ``top1_hard``, ``top1_soft``, ``top1_identity``...
        of the modes evaluated, for dynamic models),
        ``checkpoint``, ``data``, ``weights``, ``assignment`` (of the dynamic layers evaluated,
        ``None`` without them).
    """
    from dyshuffle.layers import permutation_mode

    from .checkpoint import (
        assignment_options,
        layer_assignments,
        model_from_checkpoint,
        resolve_weights,
    )
    from .config import TrainConfig
    from .distributed import cleanup, setup
    from .engine import build_loaders, evaluate, has_dynamic_layers

    if split not in ("val", "train"):
        raise ValueError(f"unknown split {split!r}; valid: val, train")
    if permutation not in PERMUTATION_CHOICES:
        raise ValueError(
            f"unknown permutation {permutation!r}; valid: {', '.join(PERMUTATION_CHOICES)}"
        )
    options = assignment_options(assignment)
    model, state = model_from_checkpoint(checkpoint, weights=weights, layer_options=options)
    base = dict(state.get("config") or {})
    values = {k: v for k, v in base.items() if k in TrainConfig.__dataclass_fields__}
    if data is not None:
        values.update(data=data, data_dir=data_dir)
    elif data_dir is not None:
        values["data_dir"] = data_dir
    values.update(overrides or {})
    values.update(device=device, eval_batch_size=batch_size, train_subset=0, channels_last=False)
    cfg = TrainConfig(**values).validate()
    info = setup(cfg.device)
    try:
        loaded, train_loader, val_loader = build_loaders(cfg, info, verbose=False)
        n_classes = state["model_args"]["num_classes"]
        if loaded.num_classes != n_classes:
            raise ValueError(
                f"{cfg.data} at {cfg.data_dir} has {loaded.num_classes} classes, the checkpoint "
                f"{checkpoint} was trained for {n_classes}"
            )
        loader = val_loader
        if split == "train":
            from dyshuffle.data import ArrayData, FileLoader, InMemoryLoader

            common = dict(
                batch_size=batch_size, train=False, mean=state["mean"], std=state["std"],
                world_size=info.world_size, rank=info.rank,
            )  # fmt: skip
            if isinstance(loaded, ArrayData):
                loader = InMemoryLoader(
                    loaded.train_images.to(info.device),
                    loaded.train_labels.to(info.device),
                    **common,
                )
            else:
                loader = FileLoader(
                    loaded.train_samples,
                    image_size=loaded.image_size,
                    device=info.device,
                    workers=cfg.workers,
                    **common,
                )
        # normalize with the statistics the model was trained with
        import torch

        loader.mean = torch.tensor(state["mean"], dtype=torch.float32, device=info.device)
        loader.std = torch.tensor(state["std"], dtype=torch.float32, device=info.device)
        model = model.to(info.device)
        out: dict[str, Any] = {
            "checkpoint": str(checkpoint),
            "data": cfg.data,
            "data_dir": cfg.data_dir,
            "split": split,
            "weights": resolve_weights(state, weights),
            "epoch": state.get("epoch"),
            "assignment": ",".join(layer_assignments(model)) or None,
        }
        dynamic = has_dynamic_layers(model)
        modes = _GROUPS.get(permutation, [permutation])
        if not dynamic:
            modes = ["hard"]
        for mode in modes:
            with permutation_mode(model, mode):
                m = evaluate(
                    model, loader, info.device, amp=amp, dist_info=info, progress=progress,
                    desc=f"evaluate ({mode} permutations)" if dynamic else "evaluate",
                )  # fmt: skip
            if mode == modes[0]:
                out.update(
                    top1=m["top1"],
                    top5=m["top5"],
                    loss=m["loss"],
                    count=m["count"],
                    permutation=mode if dynamic else None,
                )
            if dynamic:
                out.update({f"top1_{mode}": m["top1"], f"top5_{mode}": m["top5"]})
        out["rank0"] = info.rank == 0
        return out
    finally:
        cleanup()


def main(argv: list[str] | None = None) -> int:
    """Run ``dyshuffle evaluate``; returns the exit status (2 on bad input)."""
    from .checkpoint import add_assignment_argument

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="dyshuffle evaluate",
        description="Top-1/top-5 of a checkpoint (soft and hard permutations for dynamic models).",
        allow_abbrev=False,
    )
    p.add_argument("checkpoint", help="a checkpoint file (last.pt, best.pt) or a run folder")
    p.add_argument(
        "--data",
        choices=("digits", "cifar10", "cifar100", "tiny-imagenet", "imagenet", "imagefolder"),
        help="data set (default: the training one)",
    )
    p.add_argument("--data-dir", help="its folder or archive (default: the training one)")
    p.add_argument(
        "--split",
        choices=("val", "train"),
        default="val",
        help="val (default) or train (every training image: --train-subset is not applied)",
    )
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument(
        "--weights",
        choices=("auto", "model", "ema"),
        default="auto",
        help="auto: the weights the run evaluated (its --eval-weights; the EMA when kept)",
    )
    p.add_argument(
        "--permutation",
        choices=PERMUTATION_CHOICES,
        default="both",
        help="both: hard and soft (default); identity: every dynamic layer's identity factors "
        "forced (its fixed cross-group shuffle); all: the three",
    )
    add_assignment_argument(
        p, "optimal: the nearest permutations at any size; greedy: the largest entries first"
    )
    p.add_argument("--cache-dir", help="decoded-data cache (default: the training one)")
    p.add_argument(
        "--loader", choices=("auto", "memory", "workers"), help="(default: the training one)"
    )
    p.add_argument("--workers", type=int, help="(default: the training one)")
    p.add_argument(
        "--val-subset",
        type=int,
        help="evaluate the first N of a fixed random order (default: the training run's, "
        "whose validation it repeats; 0: every image)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bar (on a terminal)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads (default 0: PyTorch's own choice)"
    )
    args = p.parse_args(argv)
    overrides = {
        k: getattr(args, k)
        for k in ("cache_dir", "loader", "workers", "val_subset")
        if getattr(args, k) is not None
    }
    from dyshuffle.data import DatasetError

    if args.threads < 0:
        print(
            f"dyshuffle evaluate: error: --threads must be 0 or more, got {args.threads}",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        out = evaluate_checkpoint(
            args.checkpoint, data=args.data, data_dir=args.data_dir, split=args.split,
            batch_size=args.batch_size, device=args.device, amp=args.amp, weights=args.weights,
            permutation=args.permutation, assignment=args.assignment, overrides=overrides,
            progress=args.progress,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, DatasetError) as e:
        print(f"dyshuffle evaluate: error: {e}", file=sys.stderr)
        return 2
    if not out.pop("rank0"):
        return 0
    line = f"top-1 {out['top1']:.2f}%  top-5 {out['top5']:.2f}%  "
    line += f"({out['count']} images, {out['data']} {out['split']}, {out['weights']} weights)"
    print(line)
    if "top1_soft" in out or "top1_hard" in out:
        parts = [
            f"{m}: top-1 {out[f'top1_{m}']:.2f}% top-5 {out[f'top5_{m}']:.2f}%"
            for m in ("hard", "soft", "identity")
            if f"top1_{m}" in out
        ]
        print(f"dynamic shuffle permutations ({out['assignment']}) | " + " | ".join(parts))
    if args.json:
        from .report import write_json

        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
