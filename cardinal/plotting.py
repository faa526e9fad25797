"""What every --plot shares: matplotlib without a display, and a PNG written or one clear error."""

from __future__ import annotations

from pathlib import Path

from cardinal.cli import CardinalError


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
    """Write ``figure`` as a PNG and close it, whether or not the write succeeds."""
    import matplotlib.pyplot as plt

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", dpi=110)
    except OSError as error:
        raise CardinalError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        plt.close(figure)
