"""Metrics: a progress bar, OUTPUT_DIR/metrics.jsonl and a PNG of the curves.

Recipes hand :meth:`Tracker.update` the detached tensors their losses return, every step; the tracker sums
them on the device and converts to python numbers (the only host sync) when a step is logged, writing for
each key the mean over the steps since the previous log that produced that key (a key that some steps did
not report, such as a ratio of a step with nothing to learn, is averaged over the steps that did). Evaluations are written with ``eval/`` keys on their own lines.

metrics.jsonl holds one JSON object per line: ``{"step": 10, "loss": 1.23, "lr": 0.001, ...}`` or
``{"step": 50, "eval/accuracy": 0.61}``. ``step`` counts optimizer steps completed (1-based).

Experiment trackers (``--report_to tensorboard,wandb,trackio``; optional extras: ``pip install
rlcore[tensorboard]``, ``rlcore[wandb]``, ``rlcore[trackio]``) receive every record written to metrics.jsonl,
at the same step, beside it:

- ``tensorboard``: event files in OUTPUT_DIR/runs (``tensorboard --logdir OUTPUT_DIR/runs``), through
  ``torch.utils.tensorboard``;
- ``wandb``: a run named after OUTPUT_DIR in project ``$WANDB_PROJECT`` (default ``rlcore``), its files
  under OUTPUT_DIR/wandb, the resolved flags as its config; ``WANDB_MODE=offline`` needs no network
  (``wandb sync`` uploads later);
- ``trackio``: ``trackio.init`` / ``log`` / ``finish`` in project ``$TRACKIO_PROJECT`` (default ``rlcore``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
TRACKERS = ("tensorboard", "wandb", "trackio")


class Tracker:
    """Progress bar + JSON-lines metrics for one run.

    Args:
        output_dir: where metrics.jsonl and curves.png go.
        total_steps: length of the progress bar (optimizer steps).
        start_step: steps already done (on resume); lines of an existing metrics.jsonl with a larger step
            are dropped, so the file of a resumed run reads like the uninterrupted run's.
        bar_keys: training metrics shown on the progress bar next to the latest evaluation (keep it short).
        report_to: ``"none"`` or comma-separated tracker names (``TRACKERS``), or a sequence of them.
        run_config: the resolved flags, given to trackers that record a run's config (wandb, trackio).
        enabled: False on the processes other than rank 0 under torchrun: no bar, no files, no printing.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        total_steps: int,
        start_step: int = 0,
        bar_keys: tuple[str, ...] = ("loss",),
        report_to: str | Sequence[str] = "none",
        run_config: Mapping | None = None,
        enabled: bool = True,
    ) -> None:
        self.output_dir, self.enabled = Path(output_dir), enabled
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / METRICS_NAME
        self.bar_keys = bar_keys
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, int] = {}  # steps of the window that reported each key
        self._bar_values: dict[str, float] = {}
        if enabled:
            _truncate_metrics(self.metrics_path, start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, disable=not enabled)
        self.trackers = (
            [_open_tracker(name, self.output_dir, dict(run_config or {})) for name in parse_report_to(report_to)]
            if enabled
            else []
        )

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
        if self.enabled:
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        return values

    def close(self) -> Path | None:
        """Close the bar, draw the curves to OUTPUT_DIR/curves.png, print and return its path."""
        self.bar.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        if not self.enabled:
            return None
        path = plot_metrics(self.metrics_path, self.output_dir / CURVES_NAME)
        if path is not None:
            print(f"curves: {path}")
        return path

    def _write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        values = {key: value for key, value in record.items() if key != "step"}
        for tracker in self.trackers:
            tracker.log(values, record["step"])
        self._bar_values.update({k: v for k, v in record.items() if k in self.bar_keys or k.startswith("eval/")})
        if self._bar_values:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in self._bar_values.items()}, refresh=False)


def parse_report_to(report_to: str | Sequence[str]) -> list[str]:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]``; ``"none"`` -> ``[]``; unknown names raise."""
    names = [n.strip() for n in report_to.split(",")] if isinstance(report_to, str) else list(report_to)
    names = [name for name in names if name and name != "none"]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"--report_to: unknown tracker(s) {unknown}; expected none or some of {', '.join(TRACKERS)}")
    return list(dict.fromkeys(names))


class _TensorBoard:
    def __init__(self, output_dir: Path, run_config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (rlcore[tensorboard])

        self.writer = SummaryWriter(log_dir=str(output_dir / "runs"))
        if run_config:
            self.writer.add_text("run_config", json.dumps(run_config, indent=2))

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, output_dir: Path, run_config: dict) -> None:
        import wandb  # rlcore[wandb]; WANDB_MODE=offline works without a network

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "rlcore"),
            name=output_dir.resolve().name,
            dir=str(output_dir),
            config=run_config,
        )

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, output_dir: Path, run_config: dict) -> None:
        import trackio  # rlcore[trackio]

        self.trackio = trackio
        trackio.init(
            project=os.environ.get("TRACKIO_PROJECT", "rlcore"), name=output_dir.resolve().name, config=run_config
        )

    def log(self, values: dict, step: int) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


def _open_tracker(name: str, output_dir: Path, run_config: dict):
    """A tracker with ``log(values, step)`` and ``close()``; a missing package is one clear ``ValueError``."""
    try:
        return {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio}[name](output_dir, run_config)
    except ImportError as error:
        raise ValueError(f"--report_to {name}: {error}; install it with pip install 'rlcore[{name}]'") from None


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
