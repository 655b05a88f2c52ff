"""Plotting shared by the examples: matplotlib is optional, figures go to a
path the user names (by default in the temporary directory, never the
repository)."""

import os
import tempfile


def default_path(name):
    """``<temporary directory>/fastxent-<name>.png``."""
    return os.path.join(tempfile.gettempdir(), f"fastxent-{name}.png")


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    return plt


def save(fig, path, what="convergence plot"):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"{what} written to {path}")
