"""Metrics: a progress bar, OUTPUT_DIR/metrics.jsonl and a PNG of the curves.

Recipes hand :meth:`Tracker.update` the detached tensors their losses return, every step; the tracker sums
them on the device and converts to python numbers (the only host sync) when a step is logged, writing for
each key the mean over the steps since the previous log that produced that key (a key that some steps did
not report, such as a ratio of a step with nothing to learn, is averaged over the steps that did). Evaluations are written with ``eval/`` keys on their own lines.

metrics.jsonl holds one JSON object per line: ``{"step": 10, "loss": 1.23, "lr": 0.001, ...}`` or
``{"step": 50, "eval/accuracy": 0.61}``. ``step`` counts optimizer steps completed (1-based).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"


class Tracker:
    """Progress bar + JSON-lines metrics for one run.

    Args:
        output_dir: where metrics.jsonl and curves.png go.
        total_steps: length of the progress bar (optimizer steps).
        start_step: steps already done (on resume); lines of an existing metrics.jsonl with a larger step
            are dropped, so the file of a resumed run reads like the uninterrupted run's.
        bar_keys: training metrics shown on the progress bar next to the latest evaluation (keep it short).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        total_steps: int,
        start_step: int = 0,
        bar_keys: tuple[str, ...] = ("loss",),
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / METRICS_NAME
        self.bar_keys = bar_keys
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, int] = {}  # steps of the window that reported each key
        self._bar_values: dict[str, float] = {}
        _truncate_metrics(self.metrics_path, start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def update(self, stats: Mapping[str, torch.Tensor | float]) -> None:
        """Add one step's metrics (0-d tensors or numbers) to the running window, without a host sync."""
        for key, value in stats.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            self._sums[key] = self._sums[key] + value if key in self._sums else value
            self._counts[key] = self._counts.get(key, 0) + 1
        self.bar.update(1)

    def log(self, step: int) -> dict[str, float]:
        """Write the window's means at ``step`` to metrics.jsonl and the bar; start a new window."""
        if not self._counts:
            return {}
        means = {key: _to_float(total) / self._counts[key] for key, total in self._sums.items()}
        self._sums, self._counts = {}, {}
        self._write({"step": step, **means})
        return means

    def log_eval(self, step: int, metrics: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
        """Write evaluation metrics at ``step`` under ``eval/<name>`` keys (and print them)."""
        values = {key if key.startswith("eval/") else f"eval/{key}": _to_float(v) for key, v in metrics.items()}
        self._write({"step": step, **values})
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        return values

    def close(self) -> Path | None:
        """Close the bar, draw the curves to OUTPUT_DIR/curves.png, print and return its path."""
        self.bar.close()
        path = plot_metrics(self.metrics_path, self.output_dir / CURVES_NAME)
        if path is not None:
            print(f"curves: {path}")
        return path

    def _write(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._bar_values.update({k: v for k, v in record.items() if k in self.bar_keys or k.startswith("eval/")})
        if self._bar_values:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in self._bar_values.items()}, refresh=False)


def accumulate(stats: dict, new: Mapping[str, torch.Tensor | float], weight: float = 1.0) -> dict:
    """``stats[key] += weight * new[key]`` for every key (missing keys start at 0), in place; returns ``stats``.

    How a recipe sums the metrics of its micro-batches into the step's: with weight ``1 / n`` over n equal
    micro-batches the sum is their mean; with weight 1 a loss already normalised by the whole step's count
    adds up to the step's loss. Values stay tensors (no host sync).
    """
    for key, value in new.items():
        stats[key] = stats.get(key, 0.0) + value * weight
    return stats


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file, in order."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """One panel per metric (x = step) from a metrics.jsonl file; returns the PNG path (None if no data)."""
    records = read_metrics(metrics_path)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(series))
    rows = math.ceil(len(series) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3 * rows), squeeze=False)
    for axis, (key, (steps, values)) in zip(axes.flat, sorted(series.items())):
        axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        axis.set_title(key, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(series) :]:
        axis.set_visible(False)
    figure.tight_layout()
    png_path = Path(png_path)
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return png_path


def _to_float(value: torch.Tensor | float) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only records with step <= last_step (all of them are dropped for a fresh run at step 0)."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step] if last_step > 0 else []
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
