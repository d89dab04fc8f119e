"""Optional chart of a concurrency sweep. matplotlib is not a dependency: without it the
benchmark says how to get it and goes on."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def plot_sweep(path: str, levels: Sequence[int], ours: Sequence[float],
               theirs: Optional[Sequence[float]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: --plot {path} skipped: matplotlib is not installed (pip install matplotlib)",
              file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(levels, ours, marker="o", label="paraserve")
    if theirs is not None:
        ax.plot(levels, theirs, marker="s", label="transformers (static batch = concurrency)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(levels), [str(c) for c in levels])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title("paraserve bench serve")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)
    return True
