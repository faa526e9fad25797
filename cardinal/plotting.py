"""What every --plot shares: matplotlib without a display, and a PNG written or one clear error."""

from __future__ import annotations

from pathlib import Path

from cardinal.cli import CardinalError
from cardinal.fileio import atomic_target, cannot_write


def pyplot():
    """matplotlib.pyplot on the Agg backend; a missing matplotlib is one line naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CardinalError("--plot needs matplotlib: pip install 'cardinal[plot]'") from None
    return plt


def save_figure(figure, path: Path) -> None:
    """Write ``figure`` as a PNG and close it, whether or not the write succeeds; a full disk leaves an
    earlier plot of that name as it was."""
    import matplotlib.pyplot as plt

    try:
        with atomic_target(path) as temp:
            figure.savefig(temp, format="png", dpi=110)
    except OSError as error:
        raise cannot_write(path, error) from None
    finally:
        plt.close(figure)
