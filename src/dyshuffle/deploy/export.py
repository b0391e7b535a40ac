"""``dyshuffle export``: a checkpoint to ONNX, TorchScript or a ``torch.export`` ExportedProgram.

The model is exported in ``eval()`` with the hard permutation (the deployed Dynamic Shuffle of
Gong et al., arXiv 2310.02776): the generator, the binarization (scores of the candidate
permutations, an ``ArgMax`` and a table lookup) and the channel gather are operations of the
graph, so the permutation is recomputed for every input. The batch dimension is dynamic; the
image size is the checkpoint's ``input_size``.

    dyshuffle export runs/cifar/last.pt --format onnx
    dyshuffle export runs/cifar/last.pt --format exported-program --output model.pt2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from dyshuffle.layers import DynamicShuffle, compact_index, permutation_mode
from dyshuffle.layers.permutation import EXACT_ASSIGNMENT_MAX, searches

from ..train.checkpoint import add_assignment_argument, assignment_options
from ._common import CheckpointError, input_size_of, load_model, metadata

__all__ = [
    "FORMATS",
    "export_model",
    "export_program",
    "load_exported",
    "main",
    "run_exported",
    "save_exported_program",
    "save_onnx",
    "save_torchscript",
]

#: export format -> file suffix
FORMATS: dict[str, str] = {"onnx": ".onnx", "torchscript": ".ts", "exported-program": ".pt2"}

#: ONNX files above this size keep their weights in a side file (the protobuf limit is 2 GiB)
_ONNX_INLINE_LIMIT = 1 << 30


#: loggers of the ONNX converter: torch's exporter, onnxscript (optimizer, version converter)
_CONVERTER_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _converter_quiet() -> Iterator[_Collect]:
    """Keep the ONNX converter's log messages and warnings (e.g. its opset down-conversion
    attempts, with tracebacks) off the terminal; they are printed to stderr only when the
    conversion raises. Every logger's handlers and ``propagate`` flag are restored."""
    collect = _Collect()
    saved = []
    for name in _CONVERTER_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [collect], False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield collect
    except BaseException:
        for record in collect.records:
            print(logging.Formatter("%(name)s: %(message)s").format(record), file=sys.stderr)
        raise
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    return fmt


@contextlib.contextmanager
def _deploy_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``eval()``, hard permutations, no autograd, no joint index tables (smaller files: see
    :func:`~dyshuffle.layers.compact_index`); every module's training flag is restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with permutation_mode(model, "hard"), compact_index(model), torch.no_grad():
            yield model
    finally:
        for m, training in flags:
            m.training = training


def _example(model: nn.Module, input_size: Sequence[int], batch_size: int) -> Tensor:
    param = next(model.parameters(), None)
    dtype = torch.float32 if param is None else param.dtype
    device = None if param is None else param.device
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *input_size, generator=gen, dtype=dtype).to(device)


def export_program(
    model: nn.Module, input_size: Sequence[int], batch_size: int = 2
) -> torch.export.ExportedProgram:
    """``torch.export`` the eval-mode model with a dynamic batch dimension.

    Args:
        model: an image classifier ``(N, C, H, W) -> (N, classes)``.
        input_size: ``(C, H, W)``.
        batch_size: batch of the example input used for tracing (not 1, which export would
            specialize).
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (1 is specialized), got {batch_size}")
    x = _example(model, input_size, batch_size)
    batch = torch.export.Dim("batch")
    with _deploy_mode(model):
        return torch.export.export(model, (x,), dynamic_shapes=({0: batch},))


def save_exported_program(
    program: torch.export.ExportedProgram, path: str | Path, meta: dict[str, str] | None = None
) -> Path:
    """Write ``program`` with :func:`torch.export.save` (``.pt2``); ``meta`` goes to extra files."""
    path = Path(path)
    extra = {f"{k}.json": v for k, v in (meta or {}).items()}
    torch.export.save(program, path, extra_files=extra)
    return path


def save_onnx(
    program: torch.export.ExportedProgram,
    path: str | Path,
    opset: int | None = None,
    meta: dict[str, str] | None = None,
) -> Path:
    """Convert an ExportedProgram to ONNX (input ``input``, output ``logits``, axis ``batch``).

    Args:
        program: from :func:`export_program`.
        path: the ``.onnx`` file; weights are inline unless the model exceeds 1 GiB.
        opset: ONNX opset (``None``: the exporter's default).
        meta: string key/values stored as ONNX ``metadata_props``.
    """
    path = Path(path)
    with _converter_quiet():
        onnx_program = torch.onnx.export(
            program,
            (),
            input_names=["input"],
            output_names=["logits"],
            opset_version=opset,
            verbose=False,
        )
    written = onnx_program.model.opset_imports.get("")
    if opset is not None and written != opset:
        # the exporter writes its own opset and converts down; a failed conversion only logs
        raise ValueError(
            f"the ONNX exporter could not convert the model to opset {opset} (it produced opset "
            f"{written}); use --opset {written} or above, or leave --opset out"
        )
    dims = [
        d
        for v in (onnx_program.model.graph.inputs[0], onnx_program.model.graph.outputs[0])
        for d in list(v.shape)[:1]
        if not isinstance(d, int)
    ]
    if dims:
        onnx_program.rename_axes({dims[0]: "batch"})
    for k, v in (meta or {}).items():
        onnx_program.model.metadata_props[k] = v
    nbytes = sum(p.numel() * p.element_size() for p in program.state_dict.values())
    external = nbytes > _ONNX_INLINE_LIMIT
    onnx_program.save(path, external_data=external)
    if not external:
        _dedupe_initializers(path)
    return path


def _dedupe_initializers(path: Path) -> int:
    """Store identical constant tensors once (e.g. the permutation tables of layers of one width).

    Returns the number of initializers removed.
    """
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(a.type in subgraphs for n in graph.node for a in n.attribute):
        return 0  # names could be captured by a subgraph; leave such graphs alone
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for init in graph.initializer:
        key = (init.data_type, tuple(init.dims), init.raw_data) if init.raw_data else None
        if key is not None and key in first:
            rename[init.name] = first[key]
        else:
            if key is not None:
                first[key] = init.name
            keep.append(init)
    if not rename:
        return 0
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    kept_info = [v for v in graph.value_info if v.name not in rename]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    onnx.save(proto, str(path))
    return len(rename)


def save_torchscript(
    model: nn.Module,
    path: str | Path,
    input_size: Sequence[int],
    meta: dict[str, str] | None = None,
    batch_size: int = 2,
) -> Path:
    """``torch.jit.trace`` the eval-mode model and save it (``meta`` goes to extra files).

    Tracing records the tensor operations of one forward, the per-input permutation included
    (its sizes are read from the input, so the batch dimension stays free).
    """
    path = Path(path)
    x = _example(model, input_size, batch_size)
    extra = {f"{k}.json": v for k, v in (meta or {}).items()}
    with _deploy_mode(model), warnings.catch_warnings():
        # the shape checks of the layers are Python branches (TracerWarning); torch.jit is
        # deprecated in favour of torch.export (FutureWarning), which the other formats use
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files=extra)
    return path


def export_model(
    model: nn.Module,
    path: str | Path,
    fmt: str,
    input_size: Sequence[int],
    opset: int | None = None,
    meta: dict[str, str] | None = None,
) -> Path:
    """Export ``model`` (in eval, hard permutations) to ``path`` in format ``fmt``.

    Args:
        model: the classifier.
        path: output file.
        fmt: one of :data:`FORMATS` (``"onnx"``, ``"torchscript"``, ``"exported-program"``).
        input_size: ``(C, H, W)`` of one image; the batch dimension is dynamic.
        opset: ONNX opset (ONNX only).
        meta: string key/values stored in the file (class names, normalization).
    """
    _check_format(fmt)
    if fmt == "torchscript":
        return save_torchscript(model, path, input_size, meta)
    program = export_program(model, input_size)
    if fmt == "onnx":
        return save_onnx(program, path, opset, meta)
    return save_exported_program(program, path, meta)


def load_exported(path: str | Path, fmt: str) -> Callable[[Tensor], Tensor]:
    """Load an exported file as a function ``(N, C, H, W) -> (N, classes)`` on the CPU.

    ONNX runs with ONNX Runtime, the others with torch (no ``dyshuffle`` code is needed).
    """
    _check_format(fmt)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_onnx(x: Tensor) -> Tensor:
            (out,) = session.run(["logits"], {"input": x.detach().cpu().numpy()})
            return torch.from_numpy(out)

        return run_onnx
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    else:
        module = torch.export.load(str(path)).module()

    def run_torch(x: Tensor) -> Tensor:
        with torch.no_grad():
            return module(x)

    return run_torch


def run_exported(path: str | Path, fmt: str, x: Tensor) -> Tensor:
    """Load an exported file and run it on ``x`` (see :func:`load_exported`)."""
    return load_exported(path, fmt)(x)


def _searching_layers(model: nn.Module) -> list[str]:
    """Names of the dynamic layers whose binarization cannot be exported (:func:`searches`)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, DynamicShuffle) and searches(m.assignment, max(m.a, m.b))
    ]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dyshuffle export",
        description="Export a checkpoint to ONNX, TorchScript or a torch.export program "
        "(eval mode, hard permutations, dynamic batch dimension).",
    )
    p.add_argument("checkpoint", help="checkpoint written by 'dyshuffle train'")
    p.add_argument("--format", required=True, choices=list(FORMATS), dest="fmt")
    p.add_argument(
        "--output",
        default=None,
        help="output file (default: the checkpoint with the format's "
        f"suffix: {', '.join(f'{k} -> {v}' for k, v in FORMATS.items())})",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    add_assignment_argument(
        p, "e.g. greedy for a model trained with 'optimal', which cannot be exported"
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip running the exported file against the eager model (batch sizes 1 and 3)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dyshuffle export``; returns the exit status."""
    args = _parser().parse_args(argv)
    options = assignment_options(args.assignment)
    try:
        model, state = load_model(args.checkpoint, layer_options=options)
        input_size = input_size_of(state)
    except CheckpointError as e:
        print(f"dyshuffle export: {e}", file=sys.stderr)
        return 2
    searching = _searching_layers(model)
    if searching:
        print(
            f"dyshuffle export: {len(searching)} dynamic layer(s) of {args.checkpoint!r} "
            f"({searching[0]}, ...) apply the nearest permutation of factors wider than "
            f"{EXACT_ASSIGNMENT_MAX} x {EXACT_ASSIGNMENT_MAX} (assignment 'optimal'), found in a "
            "number of steps that depends on the data, which no exported graph has; "
            "--assignment greedy exports the greedy choice ('dyshuffle evaluate CHECKPOINT "
            "--assignment greedy' measures its accuracy)",
            file=sys.stderr,
        )
        return 2
    ckpt = Path(args.checkpoint)
    ckpt = ckpt / "last.pt" if ckpt.is_dir() else ckpt
    out = Path(args.output) if args.output else ckpt.with_suffix(FORMATS[args.fmt])
    if out.is_dir():
        print(f"dyshuffle export: --output {str(out)!r} is a folder; name a file", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_model(model, out, args.fmt, input_size, args.opset, metadata(state))
    except ValueError as e:
        print(f"dyshuffle export: {e}", file=sys.stderr)
        return 2
    args_ = json.dumps(state.get("model_args", {}), default=str)
    print(f"wrote {out} ({args.fmt}, {out.stat().st_size / 1e6:.2f} MB) for {args_}")
    if not args.no_check:
        worst, exported = 0.0, load_exported(out, args.fmt)
        for n in (1, 3):
            x = _example(model, input_size, n)
            with _deploy_mode(model):
                ref = model(x)
            worst = max(worst, (exported(x) - ref).abs().max().item())
        print(f"check: max |exported - eager| = {worst:.3g} on random inputs, batch sizes 1 and 3")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
