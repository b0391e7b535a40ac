"""The ``dyshuffle`` command: one entry point, one subcommand per tool.

Each subcommand lives in its own module and exposes ``main(argv: list[str] | None) -> int``;
it is imported only when called, so ``dyshuffle --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys
import warnings

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dyshuffle.train.cli", "train a model (embedded digits data by default)"),
    "evaluate": ("dyshuffle.train.evaluate", "evaluate a checkpoint on a data set"),
    "bench": ("dyshuffle.bench", "measure speed, memory, parameters and MACs of every mixer"),
    "table": ("dyshuffle.tools.model_table", "parameter and MAC table of every model and mixer"),
    "sweep": ("dyshuffle.sweep", "run configurations x seeds and regenerate RESULTS.md"),
    "export": (
        "dyshuffle.deploy.export",
        "export a checkpoint to ONNX / TorchScript / ExportedProgram",
    ),
    "predict": ("dyshuffle.deploy.predict", "top-5 classes of images with a checkpoint"),
    "inspect": (
        "dyshuffle.deploy.inspect",
        "figures and a report of the permutations a model chooses",
    ),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dyshuffle COMMAND [options]   (dyshuffle COMMAND --help)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from dyshuffle import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dyshuffle: unknown command {name!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    # warnings read as the command's own lines, not as Python's (file and line of the source)
    before = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_, **__: (
        f"dyshuffle {name}: warning: {message}\n"
    )
    try:
        return int(module.main(rest) or 0)
    finally:
        warnings.formatwarning = before


if __name__ == "__main__":
    raise SystemExit(main())
