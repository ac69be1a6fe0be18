"""Guards in the training loop: a run that notices when it goes wrong and says so.

``rlcore.run.Run`` hands every step's metrics to a :class:`LoopGuard` (the recipe picks one in a single
line: ``guards.supervised(config)`` or ``guards.online(config)``); the guard decides:

- **non-finite steps**: a step whose loss or gradient norm is NaN or infinite changed no weight
  (``rlcore.optim.optimizer_step`` skips the update and the schedule step); the guard logs it and stops the
  run after ``--max_skipped_steps`` such steps in a row (:class:`RunStopped`, exit code 1);
- **divergence**: a loss far above its running median (:func:`diverging`);
- **RL collapse**: every group without learning signal, the entropy near zero, or every completion cut at
  the length limit, for ``patience`` steps in a row (:func:`stuck`).

Divergence and collapse print a warning (and show ``warn`` on the progress bar); with ``--stop_on_collapse``
they stop the run. Degenerate data (identical pairs, empty completions after truncation) is counted when it
is loaded and refused when it is all of the data (:func:`check_pairs`, :func:`check_completions`).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm


class RunStopped(Exception):
    """The run stopped for a reason it explains in one line; ``exit_code`` is what the process exits with
    (``rlcore.run.cli``): 1 for a run that went wrong, 128 + signal for a preempted one."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------------------------------------
# pure checks


def nonfinite_keys(values: Mapping[str, float], keys: Sequence[str] = ("loss", "grad_norm")) -> list[str]:
    """The names among ``keys`` whose value in ``values`` is NaN or infinite (absent keys are fine)."""
    return [key for key in keys if key in values and not math.isfinite(values[key])]


def diverging(
    history: Sequence[float], value: float, *, factor: float = 4.0, margin: float = 1.0, min_history: int = 1
) -> bool:
    """Whether a loss ``value`` is far above the running median of the previous ones:

        value > factor * median(history) + margin,   judged only when median(history) > 0.

    A positive loss (NLL, DPO, Bradley-Terry; in nats) that climbs ``factor`` times above where it has been
    diverges (``sft --lr 10``: 4.7 at the first step, thousands from the second); ``margin`` keeps a small
    loss from warning on noise (a DPO loss of 0.02 that reads 0.1). Losses around 0 or below (policy
    gradients) are not judged. ``history``: the previous finite values (a window), oldest first.
    """
    if len(history) < min_history:
        return False
    median = statistics.median(history)
    return median > 0 and value > factor * median + margin


def stuck(history: Sequence[float], bad: Callable[[float], bool], patience: int) -> bool:
    """Whether the last ``patience`` values of ``history`` are all ``bad`` (and there are that many)."""
    return len(history) >= patience and all(bad(v) for v in list(history)[-patience:])


@dataclass(frozen=True)
class Collapse:
    """One collapse check: ``key`` was ``bad`` for ``patience`` steps in a row; ``message`` says what it means."""

    key: str
    bad: Callable[[float], bool]
    message: str


# ----------------------------------------------------------------------------------------------------------
# the guard


@dataclass
class LoopGuard:
    """Watches each step's metrics (python floats) for non-finite steps, divergence and collapse.

    Args:
        max_skipped_steps: stop after this many non-finite steps in a row (0 = never stop).
        stop_on_collapse: stop (instead of warning) on divergence or collapse.
        divergence_key: the metric judged by :func:`diverging` (None = none).
        collapses: the collapse checks; a check whose key a recipe does not log is ignored.
        patience: steps in a row that make a collapse.
        window: steps of history kept for the running median.
    """

    max_skipped_steps: int = 5
    stop_on_collapse: bool = False
    divergence_key: str | None = "loss"
    divergence_factor: float = 4.0
    divergence_margin: float = 1.0
    collapses: tuple[Collapse, ...] = ()
    patience: int = 20
    window: int = 100
    skipped_in_a_row: int = field(default=0, init=False)
    skipped_total: int = field(default=0, init=False)
    warning: str | None = field(default=None, init=False)  # the latest warning (shown on the progress bar)
    _history: dict[str, deque] = field(default_factory=dict, init=False)
    _warned: set[str] = field(default_factory=set, init=False)

    def check(self, step: int, values: Mapping[str, float]) -> bool:
        """Judge step ``step`` (1-based) from its metrics; returns whether the step was skipped (non-finite).

        Raises:
            RunStopped: ``max_skipped_steps`` non-finite steps in a row, or divergence/collapse with
                ``stop_on_collapse``.
        """
        bad = nonfinite_keys(values)
        if bad:
            self.skipped_in_a_row += 1
            self.skipped_total += 1
            described = ", ".join(f"{key} {values[key]}" for key in bad)
            self._say(f"step {step} skipped: non-finite {described} (no update, no schedule step)")
            if self.max_skipped_steps and self.skipped_in_a_row >= self.max_skipped_steps:
                raise RunStopped(
                    f"stopped at step {step}: {self.skipped_in_a_row} steps in a row had a non-finite loss or "
                    "gradient norm (lower --lr, check the data); the weights were not updated by them and the "
                    "final model was not written"
                )
            return True
        self.skipped_in_a_row = 0
        if self.divergence_key in values:
            history = self._history.setdefault(self.divergence_key, deque(maxlen=self.window))
            value = values[self.divergence_key]
            if diverging(history, value, factor=self.divergence_factor, margin=self.divergence_margin):
                median = statistics.median(history)
                self._problem(
                    "diverging",
                    f"step {step}: {self.divergence_key} {value:.4g} is over {self.divergence_factor:g}x its "
                    f"running median {median:.4g}: the run is diverging (lower --lr)",
                )
            history.append(value)
        for collapse in self.collapses:
            if collapse.key not in values:
                continue
            history = self._history.setdefault(collapse.key, deque(maxlen=self.patience))
            history.append(values[collapse.key])
            if stuck(history, collapse.bad, self.patience):
                self._problem(
                    collapse.key,
                    f"step {step}: {collapse.message} for {self.patience} steps ({collapse.key} "
                    f"{values[collapse.key]:.4g})",
                )
        return False

    def _problem(self, kind: str, message: str) -> None:
        if self.stop_on_collapse:
            raise RunStopped(f"stopped (--stop_on_collapse): {message}")
        self.warning = kind
        if kind not in self._warned:  # once per kind: a collapse lasts, the log should not fill with it
            self._warned.add(kind)
            self._say(f"WARNING {message}; --stop_on_collapse stops the run on this")

    @staticmethod
    def _say(message: str) -> None:
        tqdm.write(message)


def supervised(config) -> LoopGuard:
    """The guard of SFT, DPO and reward-model training: non-finite steps and divergence of ``loss``."""
    return LoopGuard(max_skipped_steps=config.max_skipped_steps, stop_on_collapse=config.stop_on_collapse)


def online(config, patience: int | None = None) -> LoopGuard:
    """The guard of the online recipes (GRPO, online DPO, PPO): non-finite steps, and the collapses of RL for
    ``--collapse_patience`` steps in a row: every group without signal, no decided pair, entropy below 0.01
    nats, every completion truncated."""
    collapses = (
        Collapse("frac_reward_zero_std", lambda v: v >= 1.0, "every group's rewards are equal (no learning signal)"),
        Collapse("pairs/decided_frac", lambda v: v <= 0.0, "no pair has a preferred completion (no learning signal)"),
        Collapse("entropy", lambda v: v < 0.01, "the policy's entropy collapsed below 0.01"),
        Collapse("completions/truncated_frac", lambda v: v >= 1.0, "every completion ran to --max_new_tokens"),
    )
    return LoopGuard(
        max_skipped_steps=config.max_skipped_steps,
        stop_on_collapse=config.stop_on_collapse,
        divergence_key=None,
        collapses=collapses,
        patience=patience if patience is not None else config.collapse_patience,
    )


# ----------------------------------------------------------------------------------------------------------
# degenerate data, at load time


def report_degenerate(counts: Mapping[str, int], total: int, what: str) -> dict[str, int]:
    """Print how many of ``total`` rows are degenerate in each way; refuse (ValueError) when one way covers
    every row. ``counts``: {description: rows}; ``what``: the rows, e.g. "training pairs". Returns the counts."""
    for description, count in counts.items():
        if total and count == total:
            raise ValueError(f"every one of the {total} {what} {description}: nothing to learn from")
        if count:
            print(f"warning: {count} of {total} {what} {description}")
    return dict(counts)


def check_pairs(chosen_ids: Sequence[Sequence[int]], rejected_ids: Sequence[Sequence[int]]) -> dict[str, int]:
    """Tokenised preference pairs: count the pairs whose chosen equals rejected (zero gradient, loss log 2 in
    DPO) and the empty completions (after truncation to --max_length); refuse if every pair is one of those."""
    counts = {
        "have chosen == rejected after tokenisation (no gradient)": sum(
            list(c) == list(r) for c, r in zip(chosen_ids, rejected_ids)
        ),
        "have an empty chosen or rejected completion after truncation": sum(
            not len(c) or not len(r) for c, r in zip(chosen_ids, rejected_ids)
        ),
    }
    return report_degenerate(counts, len(chosen_ids), "training pairs")


def check_completions(completion_masks: Sequence[Sequence[int]]) -> dict[str, int]:
    """SFT rows: count those with no loss token left (an empty completion after truncation); refuse if all."""
    empty = sum(not any(mask[1:]) for mask in completion_masks)
    return report_degenerate({"have no completion token left after truncation": empty}, len(completion_masks), "rows")
