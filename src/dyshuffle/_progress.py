"""Progress bars of long work: tqdm on stderr, drawn only on a terminal.

Training, evaluation, the first decode of an image folder, the extraction of an archive and
``dyshuffle inspect`` report their progress through :func:`progress_bar`; on a terminal the bar
is drawn and cleared when the work is done (``leave=False``), elsewhere (a log file, CI) nothing
is written. The commands' ``--no-progress`` turns them off (``enabled=False``).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(
    total: int | float | None = None,
    desc: str = "",
    *,
    enabled: bool = True,
    unit: str = "it",
    **kwargs: Any,
) -> Any:
    """A ``tqdm`` bar on stderr: ``update(n)`` as work is done, ``close()`` at the end.

    Args:
        total: the amount of work (``None``: unknown, the bar counts).
        desc: what is being done.
        enabled: ``False`` gives a bar that draws nothing (e.g. on other ranks than the first).
        unit: of the counts (``img``, ``batch``, ``B``...).
        kwargs: further ``tqdm`` arguments (``unit_scale``, ``initial``...).
    """
    from tqdm.auto import tqdm

    options: dict[str, Any] = {"leave": False, "dynamic_ncols": True, "file": sys.stderr}
    options.update(kwargs)
    # disable=None: tqdm draws on a terminal only
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, **options)
