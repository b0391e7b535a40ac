"""``dyshuffle inspect``: which permutations a trained Dynamic Shuffle model chooses, and why.

For every :class:`~dyshuffle.layers.DynamicShuffle` of a model (the mixers ``dynamic`` and
``learned`` and the dynamic part of each static-dynamic shuffle) it records over a data set:

- the hard permutation of every sample (the one ``eval()`` applies): how many distinct ones each
  layer uses, their frequencies, and how they depend on the class (per class, the divergence of
  the permutation distribution from the layer's overall distribution; weighted by the class
  frequencies it sums to the mutual information between permutation and class);
- the orthogonality error ``||A A^T - I||_F^2`` of the soft (softmax) factor matrices, which is 0
  exactly when the soft matrix already is a permutation (Gong et al., arXiv 2310.02776);
- the decision margin of every sample (:meth:`~dyshuffle.layers.DynamicShuffle.decision_margin`):
  how far its soft factors are from choosing another permutation (0: a tie, 2: permutation
  matrices), which tells a layer that could switch from one that cannot;
- for a few images, the chosen ``C x C`` permutation matrices.

:func:`collect_statistics` takes a model and any iterable of ``(images, labels)`` batches;
:func:`write_report` draws the figures (matplotlib, Agg) and writes ``report.md``.

    dyshuffle inspect runs/cifar/last.pt --data cifar10 --data-dir ../shared/data --output insp/
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dyshuffle.layers import DynamicShuffle, compose_index, orthogonality, permutation_matrix

from .._progress import progress_bar
from ..data.common import subset_indices
from ..data.datasets import list_datasets
from ..train.checkpoint import add_assignment_argument, assignment_options, layer_assignments
from ._common import CheckpointError, fields_of, input_size_of, load_model

__all__ = [
    "ORTHO_BINS",
    "Example",
    "InspectionStats",
    "LayerStats",
    "collect_statistics",
    "main",
    "write_report",
]

#: edges of the orthogonality-error histogram in log10 units; smaller errors fall in the first bin
ORTHO_BINS = np.linspace(-8.0, 3.0, 111)


@dataclass
class LayerStats:
    """What one dynamic layer chose over a data set.

    Attributes:
        name: the module name in the model.
        channels, groups, a, b: the layer's shape (``C = groups * a * b``).
        permutations: the distinct hard permutations (``(C,)`` index tuples), in order of first
            appearance; permutation ``i`` is row ``i`` of ``counts``.
        counts: ``(P, K)`` int array, samples of class ``k`` that chose permutation ``p``.
        ortho_hist: histogram of ``log10`` orthogonality errors over :data:`ORTHO_BINS` (one entry
            per soft factor matrix and sample).
        ortho_sum, ortho_min, ortho_max, ortho_count: exact summary of the same errors.
        reference: the permutation of the identity factors (what the layer applies when ``A`` and
            ``B`` are identities: its fixed cross-group shuffle), or ``None`` when unknown.
        margins: the decision margin of every sample, in order (``float64``; ``inf`` for a layer
            with nothing to choose; negative where a greedily binarized factor applied a
            permutation that is not its nearest one).
        logit_std: standard deviation over the samples of each logit of the softmax factors
            (capped, over ``tau``), averaged over the logits: how much the input moves them
            (0 for a layer that ignores its input).
        logit_range: the range (largest minus smallest) of the logits of one row of a factor,
            averaged over the rows of factors larger than 1 x 1 and over the samples: how far
            apart the logits the input has to move are.
    """

    name: str
    channels: int
    groups: int
    a: int
    b: int
    num_classes: int
    permutations: list[tuple[int, ...]] = field(default_factory=list)
    counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    ortho_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(ORTHO_BINS) - 1))
    ortho_sum: float = 0.0
    ortho_min: float = math.inf
    ortho_max: float = 0.0
    ortho_count: int = 0
    reference: tuple[int, ...] | None = None
    _ids: dict[bytes, int] = field(default_factory=dict, repr=False)
    _margins: list[np.ndarray] = field(default_factory=list, repr=False)
    _logit_sum: np.ndarray | None = field(default=None, repr=False)
    _logit_sq: np.ndarray | None = field(default=None, repr=False)
    _logit_n: int = field(default=0, repr=False)
    _range_sum: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        if self.counts.size == 0:
            self.counts = np.zeros((0, self.num_classes), dtype=np.int64)

    # -- accumulation ------------------------------------------------------------------------
    def add(
        self,
        perms: np.ndarray,
        labels: np.ndarray,
        a_err: Tensor,
        b_err: Tensor,
        margins: Tensor | None = None,
        logits: Tensor | None = None,
    ) -> None:
        """Count one batch: ``perms`` ``(N, C)``, ``labels`` ``(N,)``, errors ``(N or 1, Gf)``,
        decision margins ``(N,)`` and the softmax factors' logits ``(N or 1, Gf, a*a + b*b)``
        (both optional)."""
        if margins is not None:
            self._margins.append(margins.detach().double().cpu().numpy().reshape(-1))
        if logits is not None:
            self._add_logits(logits.detach().double().cpu().expand(len(perms), -1, -1))
        uniq, inverse = np.unique(perms, axis=0, return_inverse=True)
        ids = np.empty(len(uniq), dtype=np.int64)
        for i, row in enumerate(uniq):
            key = row.astype(np.int32).tobytes()
            if key not in self._ids:
                self._ids[key] = len(self.permutations)
                self.permutations.append(tuple(int(v) for v in row))
            ids[i] = self._ids[key]
        if len(self.permutations) > self.counts.shape[0]:
            grow = len(self.permutations) - self.counts.shape[0]
            self.counts = np.pad(self.counts, ((0, grow), (0, 0)))
        np.add.at(self.counts, (ids[inverse.reshape(-1)], labels), 1)
        n = perms.shape[0]
        errs = torch.cat([e.expand(n, -1) for e in (a_err, b_err)], dim=1)  # (N, 2 * Gf)
        errs = errs.detach().double().cpu().numpy().reshape(-1)
        logs = np.log10(np.maximum(errs, 10.0 ** ORTHO_BINS[0]))
        self.ortho_hist += np.histogram(np.clip(logs, ORTHO_BINS[0], ORTHO_BINS[-1]), ORTHO_BINS)[0]
        self.ortho_sum += float(errs.sum())
        self.ortho_min = min(self.ortho_min, float(errs.min()))
        self.ortho_max = max(self.ortho_max, float(errs.max()))
        self.ortho_count += errs.size

    def _add_logits(self, logits: Tensor) -> None:
        flat = logits.flatten(1).numpy()  # (N, Gf * (a*a + b*b))
        if self._logit_sum is None:
            self._logit_sum, self._logit_sq = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
        self._logit_sum += flat.sum(axis=0)
        self._logit_sq += (flat**2).sum(axis=0)
        self._logit_n += flat.shape[0]
        la, lb = logits.split([self.a * self.a, self.b * self.b], dim=-1)
        ranges = [
            (m.unflatten(-1, (n, n)).amax(-1) - m.unflatten(-1, (n, n)).amin(-1)).flatten(1)
            for m, n in ((la, self.a), (lb, self.b))
            if n > 1
        ]
        if ranges:
            self._range_sum += float(torch.cat(ranges, dim=1).mean(dim=1).sum())

    # -- summaries ---------------------------------------------------------------------------
    @property
    def logit_std(self) -> float:
        """Std over the samples of each logit, averaged over the logits (NaN: none recorded)."""
        if not self._logit_n:
            return math.nan
        mean = self._logit_sum / self._logit_n
        var = np.maximum(self._logit_sq / self._logit_n - mean**2, 0.0)
        return float(np.sqrt(var).mean())

    @property
    def logit_range(self) -> float:
        """Mean range of the logits in a factor row (NaN: none recorded, or 1 x 1 factors)."""
        if not self._logit_n or max(self.a, self.b) == 1:
            return math.nan
        return self._range_sum / self._logit_n

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    @property
    def distinct(self) -> int:
        """Number of distinct permutations chosen."""
        return len(self.permutations)

    @property
    def identity_share(self) -> float | None:
        """Fraction of the samples that chose the identity factors (``None``: no reference)."""
        if self.reference is None or not self.num_samples:
            return None
        if self.reference not in self.permutations:
            return 0.0
        row = self.permutations.index(self.reference)
        return float(self.counts[row].sum()) / self.num_samples

    def frequencies(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, fractions)`` of the permutations, most frequent first."""
        totals = self.counts.sum(axis=1)
        order = np.argsort(-totals, kind="stable")
        return order, totals[order] / max(1, totals.sum())

    def entropy(self) -> float:
        """``H(permutation)`` in bits (plug-in estimate)."""
        p = self.counts.sum(axis=1) / max(1, self.num_samples)
        p = p[p > 0]
        return float(-(p * np.log2(p)).sum()) + 0.0  # no -0.0

    def class_divergence(self) -> np.ndarray:
        """Per class ``KL(p(perm | class) || p(perm))`` in bits; NaN for classes with no sample.

        Weighted by the class frequencies, these sum to :meth:`mutual_information`.
        """
        joint = self.counts.astype(np.float64)
        per_class = joint.sum(axis=0)  # (K,)
        p_perm = joint.sum(axis=1) / max(1.0, joint.sum())  # (P,)
        out = np.full(self.num_classes, np.nan)
        for k in np.flatnonzero(per_class):
            q = joint[:, k] / per_class[k]
            nz = q > 0
            out[k] = float((q[nz] * np.log2(q[nz] / p_perm[nz])).sum())
        return out

    def mutual_information(self) -> float:
        """``I(permutation; class)`` in bits (plug-in estimate, biased upwards for few samples)."""
        per_class = self.counts.sum(axis=0)
        div = self.class_divergence()
        w = per_class / max(1, per_class.sum())
        return float(np.nansum(w * div))

    def modal_fraction(self) -> np.ndarray:
        """Per class, the fraction of its samples that chose its own most frequent permutation."""
        per_class = self.counts.sum(axis=0)
        out = np.full(self.num_classes, np.nan)
        nz = per_class > 0
        if self.counts.shape[0]:
            out[nz] = self.counts.max(axis=0)[nz] / per_class[nz]
        return out

    @property
    def ortho_mean(self) -> float:
        return self.ortho_sum / self.ortho_count if self.ortho_count else math.nan

    @property
    def margins(self) -> np.ndarray:
        return np.concatenate(self._margins) if self._margins else np.zeros(0)

    def margin_summary(self) -> tuple[float, float, float]:
        """``(min, median, max)`` of the decision margins (NaN when none were recorded)."""
        m = self.margins
        if not m.size or np.isnan(m).all():
            return math.nan, math.nan, math.nan
        return float(np.nanmin(m)), float(np.nanmedian(m)), float(np.nanmax(m))


@dataclass
class Example:
    """One image, its label and prediction, and the permutation each layer chose for it."""

    image: Tensor  # (C, H, W), normalized as the model saw it
    label: int
    predicted: int | None
    permutations: dict[str, Tensor]  # layer name -> (C,) index


@dataclass
class InspectionStats:
    """Everything :func:`collect_statistics` measured; input of :func:`write_report`."""

    layers: list[LayerStats]
    class_names: list[str]
    num_samples: int
    correct: int | None
    examples: list[Example]

    def layer(self, name: str) -> LayerStats:
        for s in self.layers:
            if s.name == name:
                return s
        raise KeyError(f"no dynamic layer {name!r}; layers: {[s.name for s in self.layers]}")


def dynamic_layers(model: nn.Module) -> list[tuple[str, DynamicShuffle]]:
    """``(name, layer)`` of every dynamic (or learned) shuffle in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicShuffle)]


def _identity_factors(layer: DynamicShuffle) -> tuple[int, ...]:
    """The index ``layer`` applies when both factors are identities."""
    alpha = torch.arange(layer.a).view(1, 1, -1)
    beta = torch.arange(layer.b).view(1, 1, -1)
    idx = compose_index(alpha, beta, layer.groups, layer.cross_shuffle)[0]
    return tuple(int(v) for v in idx)


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    class_names: Sequence[str],
    *,
    max_samples: int | None = None,
    num_examples: int = 4,
    progress: bool = False,
) -> InspectionStats:
    """Run ``model`` in ``eval()`` over ``batches`` and record every dynamic layer's choices.

    Args:
        model: a model containing :class:`~dyshuffle.layers.DynamicShuffle` layers.
        batches: ``(images, labels)`` pairs, images normalized as the model expects.
        class_names: one name per label.
        max_samples: stop after this many samples (``None``: the whole iterable).
        num_examples: images kept with their permutations (the first of distinct classes).
        progress: a bar of the images seen, on a terminal (stderr).

    Raises:
        ValueError: the model has no dynamic layer, or a label is out of range.
    """
    layers = dynamic_layers(model)
    if not layers:
        raise ValueError(
            "the model has no dynamic shuffle layer (mixer 'dynamic', 'learned' or "
            "'static_dynamic', or pointwise 'sds'); nothing to inspect"
        )
    k = len(class_names)
    stats = {
        n: LayerStats(
            n, m.channels, m.groups, m.a, m.b, num_classes=k, reference=_identity_factors(m)
        )
        for n, m in layers
    }
    state: dict[str, Any] = {}

    def hook(name: str):
        def fn(module: DynamicShuffle, args: tuple[Tensor, ...], kwargs: dict) -> None:
            # args: the input, or the parts of a channel concatenation (mix_concat); kwargs:
            # the context of a layer that reads one (context_channels)
            # one evaluation of the generator: (N, C) permutations, (N or 1, Gf, a, a) and
            # (N or 1, Gf, b, b) softmax factors, (N,) margins, (N or 1, Gf, a*a + b*b) logits
            perms, a_mat, b_mat, margins, logits = module.decide(*args, **kwargs)
            stats[name].add(
                perms.cpu().numpy(),
                state["labels"],
                orthogonality(a_mat),
                orthogonality(b_mat),
                margins,
                logits,
            )
            state["perms"][name] = perms.cpu()

        return fn

    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in layers]
    examples: list[Example] = []
    seen_classes: set[int] = set()
    total, correct = 0, 0
    param = next(model.parameters(), None)
    bar = progress_bar(max_samples, "inspect", enabled=progress, unit="img")
    try:
        for images, labels in batches:
            if max_samples is not None and total >= max_samples:
                break
            if max_samples is not None:
                images, labels = images[: max_samples - total], labels[: max_samples - total]
            labels_np = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
            labels_np = labels_np.astype(np.int64).reshape(-1)
            if labels_np.size and (labels_np.min() < 0 or labels_np.max() >= k):
                raise ValueError(
                    f"label {int(labels_np.max())} out of range for {k} classes {list(class_names)}"
                )
            state["labels"], state["perms"] = labels_np, {}
            x = images if param is None else images.to(device=param.device, dtype=param.dtype)
            pred = model(x).argmax(dim=-1).cpu().numpy()
            correct += int((pred == labels_np).sum())
            for i, label in enumerate(labels_np.tolist()):
                if len(examples) < num_examples and label not in seen_classes:
                    seen_classes.add(label)
                    examples.append(
                        Example(
                            images[i].detach().cpu().float(),
                            label,
                            int(pred[i]),
                            {n: p[i] for n, p in state["perms"].items()},
                        )
                    )
            total += len(labels_np)
            bar.update(len(labels_np))
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for m, training in flags:
            m.training = training
    return InspectionStats(
        [stats[n] for n, _ in layers], [str(c) for c in class_names], total, correct, examples
    )


# -- figures -----------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _short(name: str) -> str:
    return name if len(name) <= 40 else "..." + name[-37:]


def plot_permutation_counts(stats: InspectionStats, path: Path, top: int = 8) -> Path:
    """Stacked bars: per layer, the frequencies of its ``top`` most frequent permutations."""
    layers = stats.layers
    fig = _figure(9.0, 1.2 + 0.35 * len(layers))
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    for row, s in enumerate(layers):
        _, fr = s.frequencies()
        left = 0.0
        for j, f in enumerate(fr[:top]):
            ax.barh(row, f, left=left, color=cmap(j % 10), edgecolor="white", linewidth=0.5)
            left += f
        if left < 1.0:
            ax.barh(row, 1.0 - left, left=left, color="0.75", edgecolor="white", linewidth=0.5)
        ax.text(1.01, row, f"{s.distinct}", va="center", fontsize=8)
    ax.set_yticks(range(len(layers)), [_short(s.name) for s in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(f"fraction of {stats.num_samples} samples")
    ax.set_title(
        f"Permutations chosen per layer (colors: the {top} most frequent of each layer, "
        "gray: the rest;\nnumber at the right: distinct permutations)",
        fontsize=9,
    )
    fig.savefig(path)
    return path


def plot_class_dependence(stats: InspectionStats, path: Path) -> Path:
    """Heat maps layer x class: KL(p(perm | class) || p(perm)) in bits, and the modal fraction."""
    layers, names = stats.layers, stats.class_names
    kl = np.stack([s.class_divergence() for s in layers])  # (L, K)
    modal = np.stack([s.modal_fraction() for s in layers])
    width = min(24.0, 7.0 + 0.3 * len(names))
    fig = _figure(width, 2.0 + 0.3 * len(layers))
    axes = fig.subplots(1, 2)
    panels = (
        (kl, "KL(p(perm | class) || p(perm))\n[bits]", "magma", None),
        (modal, "fraction of the class choosing\nits most frequent permutation", "viridis", (0, 1)),
    )
    for ax, (data, title, cmap, lim) in zip(axes, panels):
        vmin, vmax = lim if lim else (0.0, max(0.1, float(np.nanmax(data, initial=0.0))))
        im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="none")
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(len(layers)), [_short(s.name) for s in layers], fontsize=6)
        if len(names) <= 40:
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        else:
            ax.set_xlabel("class index")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("How the chosen permutation depends on the class")
    fig.savefig(path)
    return path


def plot_orthogonality(stats: InspectionStats, path: Path) -> Path:
    """Histogram of log10 ``||A A^T - I||^2`` of the soft factor matrices, and per-layer means."""
    fig = _figure(11.0, 1.5 + max(3.0, 0.3 * len(stats.layers)))
    ax, ax2 = fig.subplots(1, 2, width_ratios=(3, 2))
    hist = np.sum([s.ortho_hist for s in stats.layers], axis=0)
    ax.stairs(hist, ORTHO_BINS, fill=True, color="tab:blue")
    used = np.flatnonzero(hist)
    if used.size:  # the occupied range, with half a decade of margin
        ax.set_xlim(ORTHO_BINS[used[0]] - 0.5, ORTHO_BINS[used[-1] + 1] + 0.5)
    ax.set_yscale("log" if hist.max() > 100 * max(1, hist[hist > 0].min()) else "linear")
    ax.set_xlabel(
        f"log10 ||A A^T - I||_F^2 of each soft factor matrix (all layers; <= {ORTHO_BINS[0]:g} "
        "in the first bin)"
    )
    ax.set_ylabel("matrices")
    ax.set_title("Orthogonality error: 0 = the softmax matrix is a permutation")
    means = [s.ortho_mean for s in stats.layers]
    ax2.barh(range(len(means)), means, color="tab:orange")
    ax2.set_yticks(range(len(means)), [_short(s.name) for s in stats.layers], fontsize=6)
    ax2.invert_yaxis()
    if min(means) > 0 and max(means) > 100 * min(means):
        ax2.set_xscale("log")
    ax2.set_xlabel("mean error per layer")
    fig.savefig(path)
    return path


def plot_margins(stats: InspectionStats, path: Path) -> Path:
    """Per layer, the distribution of the samples' decision margins (box: quartiles, whiskers:
    minimum and maximum), on the margin's whole range 0-2 (below 0 too when a greedily binarized
    factor missed its nearest permutation)."""
    layers = stats.layers
    fig = _figure(9.0, 1.4 + 0.35 * len(layers))
    ax = fig.add_subplot()
    data = [s.margins[np.isfinite(s.margins)] for s in layers]
    rows = [i for i, d in enumerate(data) if d.size]
    if rows:
        ax.boxplot(
            [data[i] for i in rows],
            positions=rows,
            orientation="horizontal",
            whis=(0, 100),
            widths=0.6,
            showfliers=False,
            medianprops={"color": "tab:red"},
        )
    ax.set_yticks(range(len(layers)), [_short(s.name) for s in layers], fontsize=7)
    ax.set_ylim(len(layers) - 0.5, -0.5)
    low = min((float(d.min()) for d in data if d.size), default=0.0)
    ax.set_xlim(min(0.0, low - 0.05), 2.05)
    if low < 0:
        ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle=":")
    ax.axvline(2.0, color="0.6", linewidth=0.8, linestyle="--")
    ax.set_xlabel(
        f"decision margin over {stats.num_samples} samples: score gap between the chosen "
        "permutation and the next one\n(0: a tie, the choice can flip; 2: every factor is a "
        "permutation matrix"
        + ("; below 0: a greedy choice that is not the nearest permutation)" if low < 0 else ")")
    )
    ax.set_title("How far each layer's soft factors are from choosing another permutation")
    fig.savefig(path)
    return path


def _image_for_display(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    c = image.shape[0]
    m = torch.tensor(list(mean)[:c], dtype=image.dtype).view(-1, 1, 1)
    s = torch.tensor(list(std)[:c], dtype=image.dtype).view(-1, 1, 1)
    x = (image * s + m).clamp(0, 1) if len(mean) >= c and len(std) >= c else image
    x = (x - x.min()) / (x.max() - x.min() + 1e-12) if len(mean) < c else x
    arr = x.permute(1, 2, 0).numpy()
    return arr[..., 0] if c == 1 else arr[..., :3]


def plot_examples(
    stats: InspectionStats,
    path: Path,
    mean: Sequence[float] = (),
    std: Sequence[float] = (),
    max_layers: int = 12,
) -> Path:
    """Each example image next to the ``C x C`` permutation matrices chosen for it."""
    examples = stats.examples
    names = [s.name for s in stats.layers]
    if len(names) > max_layers:  # evenly spaced layers, first and last included
        names = [names[round(i)] for i in np.linspace(0, len(names) - 1, max_layers)]
    cols = 1 + len(names)
    fig = _figure(1.6 * cols, 1.8 * max(1, len(examples)))
    axes = np.asarray(fig.subplots(max(1, len(examples)), cols, squeeze=False))
    for r, ex in enumerate(examples):
        ax = axes[r, 0]
        img = _image_for_display(ex.image, mean, std)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        true = stats.class_names[ex.label]
        pred = "?" if ex.predicted is None else stats.class_names[ex.predicted]
        ax.set_title(f"{true}\n(pred. {pred})", fontsize=7)
        for j, name in enumerate(names, start=1):
            p = permutation_matrix(ex.permutations[name].unsqueeze(0))[0]  # (C, C)
            axes[r, j].imshow(p.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            if r == 0:
                axes[r, j].set_title(_short(name).replace(".", ".\n", 1), fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Chosen permutation matrices (row c reads input channel idx[c])", fontsize=9)
    fig.savefig(path)
    return path


def _fmt_freq(s: LayerStats, top: int = 3) -> str:
    _, fr = s.frequencies()
    return ", ".join(f"{100 * f:.1f}%" for f in fr[:top])


def _fmt_margin(s: LayerStats) -> str:
    lo, med, _ = s.margin_summary()
    return "-" if math.isnan(med) else f"{lo:.3g} / {med:.3g}"


def _fmt_logits(s: LayerStats) -> str:
    std, rng = s.logit_std, s.logit_range
    return "-" if math.isnan(std) else f"{std:.3g} / {rng:.3g}"


def _fmt_share(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def write_report(
    stats: InspectionStats,
    output: str | Path,
    *,
    title: str = "Permutations chosen by the model",
    context: Sequence[str] = (),
    mean: Sequence[float] = (),
    std: Sequence[float] = (),
) -> Path:
    """Write the figures and ``report.md`` into ``output``; returns the report's path.

    Args:
        stats: from :func:`collect_statistics`.
        output: a folder (created).
        title: the report's heading.
        context: lines describing the checkpoint, the data and the command.
        mean, std: normalization of the example images (to display them).
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    figs = {
        "counts": plot_permutation_counts(stats, out / "permutation_counts.png"),
        "class": plot_class_dependence(stats, out / "class_dependence.png"),
        "ortho": plot_orthogonality(stats, out / "orthogonality.png"),
        "margins": plot_margins(stats, out / "decision_margins.png"),
    }
    if stats.examples:
        figs["examples"] = plot_examples(stats, out / "examples.png", mean, std)
    h_class = _class_entropy(stats)
    lines = [f"# {title}", ""]
    lines += [f"- {c}" for c in context]
    acc = (
        f", top-1 accuracy {100 * stats.correct / stats.num_samples:.2f}%"
        if stats.correct is not None and stats.num_samples
        else ""
    )
    lines += [
        f"- {stats.num_samples} samples, {len(stats.class_names)} classes "
        f"(class entropy {h_class:.3f} bits){acc}; {len(stats.layers)} dynamic layers.",
        "",
        "## Per layer",
        "",
        "| layer | C | G x (a x b) | distinct permutations | top frequencies "
        "| identity factors | H(perm) bits | I(perm; class) bits | mean orthogonality error "
        "| decision margin min / median | logits: std over samples / range in a row |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stats.layers:
        lines.append(
            f"| `{s.name}` | {s.channels} | {s.groups} x ({s.a} x {s.b}) | {s.distinct} | "
            f"{_fmt_freq(s)} | {_fmt_share(s.identity_share)} | {s.entropy():.3f} | "
            f"{s.mutual_information():.3f} | {s.ortho_mean:.3g} | {_fmt_margin(s)} | "
            f"{_fmt_logits(s)} |"
        )
    lines += [
        "",
        "## How to read it",
        "",
        "- *distinct permutations* counts the different hard permutations (the ones `eval()` "
        "applies) a layer chose over the samples; *top frequencies* are the shares of its three "
        "most frequent ones. A layer with one permutation is static in practice.",
        "- *identity factors* is the share of samples for which both factors are identities, i.e. "
        "the layer applied only its fixed cross-group shuffle (100%: the layer learned nothing "
        "beyond its initialization's permutation).",
        "- *I(perm; class)* is the mutual information between the permutation a layer chooses "
        "and the class of the image (plug-in estimate, biased upwards when a layer has many "
        "distinct permutations compared with the samples per class). It is at most "
        "min(H(perm), H(class)).",
        "- `class_dependence.png`, left: for each layer and class, "
        "KL(p(perm | class) || p(perm)) in bits: how much the permutations of that class differ "
        "from the layer's overall distribution (0: the class does not change the choice); "
        "averaged with the class frequencies as weights it equals I(perm; class). Right: the "
        "fraction of the class's samples that chose the class's own most frequent permutation "
        "(1: one permutation per class).",
        "- *orthogonality error* is ||A A^T - I||_F^2 of each soft (softmax) factor matrix, one "
        "value per matrix and sample; it is 0 exactly when the soft matrix is a permutation, so "
        "small values mean soft and hard forwards agree. `orthogonality.png` shows its "
        "distribution.",
        "- *decision margin*: for each sample, the smallest gap, over the layer's factor "
        "matrices M, between the score <M, P> of the permutation chosen and of the next best "
        "one: how much the soft factors would have to change before the hard permutation does "
        "(0: a tie; 2: every factor is a permutation matrix; below 0: a factor binarized "
        'greedily, wider than 6 x 6 or with `assignment="greedy"`, applied a permutation '
        "that is not its nearest one, by that much). A layer whose margins are all "
        "large and nearly equal keeps its choice whatever the input; `decision_margins.png` "
        "shows their spread per layer.",
        "- *logits*: the standard deviation over the samples of each logit of the softmax "
        "factors (after `logit_cap` and the temperature), averaged over the logits, next to the "
        "range of the logits within a factor row (largest minus smallest, averaged over rows "
        "and samples). For the input to change a layer's choice, it has to move the logits by "
        "a sizeable part of that range; a standard deviation that is a small fraction of it "
        "means the generator gives nearly the same logits to every input.",
        "- `examples.png`: images with the permutation matrices chosen for them (row c has its "
        "1 in column idx[c]).",
        "",
        "## Figures",
        "",
    ]
    for key, caption in (
        ("counts", "Permutation frequencies per layer"),
        ("class", "Class dependence"),
        ("ortho", "Orthogonality error of the soft matrices"),
        ("margins", "Decision margins per layer"),
        ("examples", "Permutation matrices of example images"),
    ):
        if key in figs:
            lines += [f"![{caption}]({figs[key].name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _class_entropy(stats: InspectionStats) -> float:
    per_class = stats.layers[0].counts.sum(axis=0) if stats.layers else np.zeros(1)
    p = per_class[per_class > 0] / max(1, per_class.sum())
    return float(-(p * np.log2(p)).sum())


# -- command line ------------------------------------------------------------------------------
def _batches_from_data(
    spec: str,
    data_dir: str | None,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    max_samples: int | None,
) -> tuple[Iterable[tuple[Tensor, Tensor]], list[str]]:
    """Normalized validation batches of a data set known to :func:`dyshuffle.data.load_data`."""
    from dyshuffle.data import EVAL_CROP_FRACTION, ArrayData, load_data

    data = load_data(spec, data_dir, image_size=int(input_size[-1]))
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    if isinstance(data, ArrayData):
        images, labels = data.val_images, data.val_labels
        if tuple(images.shape[1:]) != tuple(input_size):
            raise ValueError(
                f"data set {spec!r} has images of shape {tuple(images.shape[1:])}, the checkpoint "
                f"expects {tuple(input_size)}"
            )
        keep = _subset(len(labels), max_samples)
        n = len(keep)

        def gen():
            for i in range(0, n, batch_size):
                rows = keep[i : i + batch_size]
                x = images[rows].float().div_(255.0)
                yield (x - m) / s, labels[rows]

        return gen(), list(data.class_names)

    from PIL import Image

    from .predict import preprocess

    samples = [data.val_samples[i] for i in _subset(len(data.val_samples), max_samples)]

    def gen_files():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            xs = []
            for path, _ in chunk:
                with Image.open(path) as im:  # as the file loader evaluates them
                    xs.append(preprocess(im, input_size, mean, std, EVAL_CROP_FRACTION))
            yield torch.stack(xs), torch.tensor([lab for _, lab in chunk])

    return gen_files(), list(data.class_names)


def _subset(total: int, max_samples: int | None) -> Tensor:
    """Indices of the samples to use: all, or ``max_samples`` drawn at random (seed 0), in order.

    Validation splits are often sorted by class, so their first N samples would cover few classes.
    """
    keep = subset_indices(total, max_samples or 0)  # the images of a run's --val-subset N
    return torch.arange(total) if keep is None else keep


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dyshuffle inspect",
        description="Figures and a markdown report of the permutations a checkpoint's dynamic "
        "shuffle layers choose on a data set's validation split.",
    )
    p.add_argument("checkpoint", help="checkpoint written by 'dyshuffle train'")
    p.add_argument(
        "--data",
        required=True,
        choices=list_datasets(),
        help="data set name understood by dyshuffle.data.load_data",
    )
    p.add_argument("--data-dir", default=None, help="the data set's folder (not for digits)")
    p.add_argument("--output", required=True, help="folder for report.md and the PNG figures")
    p.add_argument(
        "--max-samples", type=int, default=None, help="use N samples drawn at random (seed 0)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--examples", type=int, default=4, help="images drawn with their matrices")
    add_assignment_argument(p, "e.g. optimal: the nearest permutations")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bar (on a terminal)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dyshuffle inspect``; returns the exit status."""
    args = _parser().parse_args(argv)
    options = assignment_options(args.assignment)
    try:
        model, state = load_model(args.checkpoint, layer_options=options)
        input_size = input_size_of(state)
        mean, std = fields_of(state, args.checkpoint, "mean", "std")
    except CheckpointError as e:
        print(f"dyshuffle inspect: {e}", file=sys.stderr)
        return 2
    for name in ("max_samples", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            print(
                f"dyshuffle inspect: {flag} must be a positive integer, got {value}",
                file=sys.stderr,
            )
            return 2
    if args.examples < 0:
        print(
            f"dyshuffle inspect: --examples must be 0 or more, got {args.examples}", file=sys.stderr
        )
        return 2
    if args.data != "digits" and not args.data_dir:
        print(f"dyshuffle inspect: data set {args.data!r} needs --data-dir PATH", file=sys.stderr)
        return 2
    try:
        batches, data_classes = _batches_from_data(
            args.data, args.data_dir, input_size, mean, std, args.batch_size, args.max_samples
        )
    except ValueError as e:  # DatasetError is a ValueError
        print(f"dyshuffle inspect: {e}", file=sys.stderr)
        return 2
    class_names = [str(c) for c in state.get("class_names", data_classes)]
    if len(class_names) != len(data_classes):
        print(
            f"dyshuffle inspect: the checkpoint has {len(class_names)} classes, data set "
            f"{args.data!r} has {len(data_classes)}",
            file=sys.stderr,
        )
        return 2
    try:
        stats = collect_statistics(
            model,
            batches,
            class_names,
            max_samples=args.max_samples,
            num_examples=args.examples,
            progress=args.progress,
        )
    except ValueError as e:
        print(f"dyshuffle inspect: {e}", file=sys.stderr)
        return 2
    margs = state.get("model_args", {})
    context = [
        f"checkpoint `{args.checkpoint}` (epoch {state.get('epoch', '?')}): model "
        f"`{margs.get('name', '?')}`, mixer `{margs.get('mixer', '?')}`, pointwise "
        f"`{margs.get('pointwise', '?')}`, assignment "
        + ", ".join(f"`{a}`" for a in layer_assignments(model)),
        f"data: `{args.data}` validation split"
        + (f" from `{args.data_dir}`" if args.data_dir else ""),
        "command: `dyshuffle inspect " + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
    ]
    report = write_report(stats, args.output, context=context, mean=mean, std=std)
    print(f"wrote {report} and {len(list(Path(args.output).glob('*.png')))} figures")
    for s in stats.layers:
        print(
            f"  {s.name}: {s.distinct} distinct permutations, identity factors "
            f"{_fmt_share(s.identity_share)}, I(perm; class) = "
            f"{s.mutual_information():.3f} bits, mean orthogonality error {s.ortho_mean:.3g}, "
            f"decision margin min / median {_fmt_margin(s)}, "
            f"logits std over samples / range in a row {_fmt_logits(s)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
