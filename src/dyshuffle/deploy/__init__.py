"""Deployment tools: export to ONNX / TorchScript / ExportedProgram, prediction, inspection.

Thin users of the library: they build models through :func:`dyshuffle.models.create_model`
(via the checkpoint) and never change the layers. Each command module exposes
``main(argv) -> int`` for the ``dyshuffle`` console script.
"""

from .export import FORMATS, export_model, export_program, save_onnx, save_torchscript
from .inspect import InspectionStats, collect_statistics, write_report
from .predict import predict, preprocess

__all__ = [
    "FORMATS",
    "InspectionStats",
    "collect_statistics",
    "export_model",
    "export_program",
    "predict",
    "preprocess",
    "save_onnx",
    "save_torchscript",
    "write_report",
]
