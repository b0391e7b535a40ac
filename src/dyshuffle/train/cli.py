"""``dyshuffle train``: train a model; with no options, a dynamic-shuffle ShuffleNetV2 on digits.

Examples::

    dyshuffle train                                        # embedded digits, CPU, ~1-2 minutes
    dyshuffle train --config configs/cifar10.yaml --data-dir data/
    dyshuffle train --data imagefolder --data-dir ../shared/data/cifar10-jpeg.tgz --epochs 5
    dyshuffle train --resume runs/NAME                     # continue exactly where it stopped
    dyshuffle train --init-checkpoint runs/NAME/best.pt    # fine-tune: a new run from its weights
    torchrun --nproc_per_node=8 -m dyshuffle.cli train --config configs/imagenet.yaml --data-dir X
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from .config import ConfigError, add_config_arguments, build_parser, resolve_config, unknown_options

__all__ = ["main"]

EXIT_USAGE, EXIT_NAN, EXIT_INTERRUPTED = 2, 1, 130
_RESUME_AND_INIT = (
    "--init-checkpoint starts a new run from a checkpoint's weights, --resume continues a run "
    "from its last.pt: give one of them (a run started with --init-checkpoint resumes with "
    "--resume alone and does not load that checkpoint again)"
)


def _parser():
    parser = build_parser(
        "dyshuffle train",
        "Train a model. Options come from defaults, then --config YAML, then the command line; "
        "the resolved configuration is saved as config.yaml in the run folder.",
    )
    parser.add_argument("--config", metavar="YAML", help="a recipe, e.g. configs/cifar10.yaml")
    parser.add_argument(
        "--resume",
        metavar="PATH",
        help="continue a run from its folder (its last.pt) or a checkpoint file; the saved "
        "configuration is the base, options given here override it",
    )
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dyshuffle train``; returns the exit status (0, 1 NaN loss, 2 bad input, 130 signal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if extra:
            raise unknown_options(extra, parser)
        cli = {k: v for k, v in vars(args).items() if k not in ("config", "resume")}
        resume_state, base = None, None
        if args.resume and "init_checkpoint" in cli:
            raise ConfigError(_RESUME_AND_INIT)
        if args.resume:
            from .checkpoint import load_checkpoint

            path = Path(args.resume)
            resume_state = load_checkpoint(path)
            base = resume_state["config"]
            cli.setdefault("output", str(path if path.is_dir() else path.parent))
        cfg = resolve_config(cli, args.config, base)
        if base is not None and cfg.init_checkpoint != base.get("init_checkpoint"):
            raise ConfigError(_RESUME_AND_INIT)  # (set by the --config recipe)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"dyshuffle train: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    from .engine import NonFiniteLossError, SetupError, TrainingInterrupted, train

    command = ["dyshuffle", "train", *argv]
    try:
        train(cfg, resume=resume_state, command=shlex.join(command))
    except SetupError as e:
        print(f"dyshuffle train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as e:
        print(f"dyshuffle train: {e}", file=sys.stderr)
        return EXIT_NAN
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") == "0":  # once, not from every process of torchrun
            print(f"dyshuffle train: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
