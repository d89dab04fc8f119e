"""What a benchmark hands back: statistics, one aligned plain-text table, machine info, JSON."""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

Cell = Union[str, int, float, None]

NOISE_NOTE = ("note: absolute times on shared machines are noise; the ratios within one run "
              "(paraserve vs transformers, same process, same machine) are what count")


def percentile(values: Sequence[float], q: float) -> float:
    """q in [0, 100], linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(values: Sequence[float]) -> dict[str, float]:
    """mean, p50 (= median) and p99: the figures every latency in the suite reports."""
    return {"mean": sum(values) / len(values), "p50": percentile(values, 50), "p99": percentile(values, 99)}


def fmt(x: Cell) -> str:
    """Enough digits to compare, never scientific notation."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, bool) or isinstance(x, int):
        return str(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    digits = 1 if abs(x) >= 100 else 2 if abs(x) >= 10 else 3
    return f"{x:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """First column left-aligned (labels), the others right-aligned (numbers)."""
    cells = [list(headers)] + [[fmt(c) for c in row] for row in rows]
    if any(len(r) != len(headers) for r in cells):
        raise ValueError("every row needs one cell per header")
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def ratio(ours: Optional[float], theirs: Optional[float]) -> Optional[float]:
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def verdict(r: Optional[float], higher_is_better: bool) -> str:
    """'2.31x faster' or '1.20x slower', from paraserve/transformers of a rate or a time."""
    if r is None or r <= 0:
        return "-"
    speedup = r if higher_is_better else 1 / r
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def comparison_row(label: str, ours: Optional[float], theirs: Optional[float],
                   higher_is_better: bool) -> list[Cell]:
    """metric | paraserve | transformers | paraserve/transformers | paraserve is"""
    r = ratio(ours, theirs)
    return [label, ours, theirs, r, verdict(r, higher_is_better)]


COMPARISON_HEADERS = ["metric", "paraserve", "transformers", "paraserve/transformers", "paraserve is"]


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(dtype: str, model: str) -> dict[str, Any]:
    import torch
    import transformers

    import paraserve

    return {"cpu_model": cpu_model_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "paraserve_version": paraserve.__version__,
            "python_version": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "dtype": dtype, "model": model}


def header_lines(command: str, machine: dict[str, Any]) -> list[str]:
    gpu = f" | GPU {machine['cuda']}" if machine.get("cuda") else ""
    return [f"paraserve bench {command}: model {machine['model']}, dtype {machine['dtype']}",
            f"CPU {machine['cpu_model']} | {machine['cpu_count']} cores | {machine['torch_threads']} "
            f"torch threads | torch {machine['torch_version']} | "
            f"transformers {machine['transformers_version']}{gpu}",
            NOISE_NOTE]


@dataclass
class Report:
    """One benchmark's outcome: the table a person reads and the figures a script reads."""
    command: str
    machine: dict[str, Any]
    config: dict[str, Any]
    headers: list[str]
    rows: list[list[Cell]]
    results: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # workload and method, printed above the table
    ok: bool = True  # False: the run found a correctness problem; the command exits 1

    def render(self) -> str:
        return "\n".join(header_lines(self.command, self.machine) + self.notes
                         + ["", format_table(self.headers, self.rows)])

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.command, "config": self.config, "machine": self.machine,
                "notes": self.notes, "results": self.results,
                "table": {"headers": self.headers, "rows": [[_plain(c) for c in r] for r in self.rows]}}


def _plain(c: Cell) -> Cell:
    # JSON has no NaN or infinity
    return None if isinstance(c, float) and not math.isfinite(c) else c


def write_json(report: Report, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=2, allow_nan=False)
        f.write("\n")


def emit(report: Report, json_path: str) -> None:
    print(report.render(), flush=True)
    write_json(report, json_path)
    print(f"\nresults written to {json_path}", file=sys.stderr)
