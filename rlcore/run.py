"""The bookkeeping every recipe repeats, in one place, so that a recipe's loop holds only its algorithm.

A recipe builds its model, data and optimizer, then::

    run = Run(config, model, tokenizer, optimizer, scheduler, evaluate=evaluate)   # resume, run_config.json, tracker
    while run.running():                                    # steps left (and the optional --max_seconds stop)
        with run.timed("generation"):                       # optional: per-phase time, logged as time/<phase>
            ...
        ...                                                 # the algorithm: sample, score, loss, optimizer step
        run.end_step(stats)                                 # metrics; log, evaluate and checkpoint on cadence
    return run.finish()                                     # save the final model, THEN evaluate; summary.json

What it owns, and nothing else:
- **resume**: ``--resume`` restores model, optimizer, scheduler, extra modules, RNG, the step and the training
  time from the latest (or a named) checkpoint; the data order is a function of the step (rlcore.runtime).
- **config**: the resolved flags go to OUTPUT_DIR/run_config.json.
- **tracking**: OUTPUT_DIR/metrics.jsonl and curves.png (rlcore.tracking), every ``--logging_steps``.
- **cadence**: an evaluation before the first step (the "before" of before -> after), every
  ``--eval_steps`` and at the end; a checkpoint every ``--save_steps``.
- **time**: ``training_seconds`` counts the steps only (not evaluation or saving); ``--max_seconds`` is an
  opt-in safety stop that ends the run early and says so loudly.
- **the ending**: the final model is written before the final evaluation, so an evaluation error never
  loses it; OUTPUT_DIR/summary.json records steps, time, whether the run was cut short, and the first and
  last evaluations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from rlcore.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, save_final_model
from rlcore.config import save_config
from rlcore.runtime import timed
from rlcore.tracking import Tracker, read_metrics

SUMMARY_NAME = "summary.json"


class Run:
    """Bookkeeping of one training run (see the module docstring).

    Args:
        config: a ``rlcore.config.TrainConfig`` (output_dir, max_steps, max_seconds, logging/eval/save steps,
            resume, seed, save_total_limit are read).
        model, tokenizer: what checkpoints and the final model save.
        optimizer, scheduler: restored on resume and saved in checkpoints.
        evaluate: ``() -> {name: float}`` held-out metrics, or None for no evaluation.
        bar_keys: training metrics shown on the progress bar.
        extra_modules: other trained modules checkpointed beside the model (PPO's value model).
        save_extra: ``(output_dir) -> None``, writes what the final model directory holds beside the model.
    """

    def __init__(
        self,
        config,
        model: torch.nn.Module,
        tokenizer,
        optimizer: torch.optim.Optimizer,
        scheduler,
        *,
        evaluate: Callable[[], Mapping[str, float]] | None = None,
        bar_keys: tuple[str, ...] = ("loss",),
        extra_modules: Mapping[str, torch.nn.Module] | None = None,
        save_extra: Callable[[str], None] | None = None,
    ) -> None:
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.optimizer, self.scheduler = optimizer, scheduler
        self._evaluate, self._save_extra, self.extra_modules = evaluate, save_extra, extra_modules
        self.device = next(model.parameters()).device
        self.step, self.training_seconds = 0, 0.0
        resume_from = resolve_resume(config.resume, config.output_dir)
        if resume_from is not None:
            state = load_checkpoint(
                resume_from, model, optimizer, scheduler, seed=config.seed, extra_modules=extra_modules
            )
            self.step, self.training_seconds = state["step"], state["extra"].get("training_seconds", 0.0)
            print(f"resumed from {resume_from} at step {self.step}")
        self.start_step, self.start_seconds = self.step, self.training_seconds
        save_config(config, config.output_dir)
        self.tracker = Tracker(
            config.output_dir,
            config.max_steps,
            self.step,
            bar_keys=bar_keys,
            report_to=getattr(config, "report_to", "none"),
            run_config=dataclasses.asdict(config),
        )
        records = read_metrics(self.tracker.metrics_path)  # on resume: what the interrupted run logged
        evaluations = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in records if r.get("step") == 0]
        self.first_results: dict[str, float] = {k: v for e in evaluations for k, v in e.items()}
        self.results: dict[str, float] = {}
        self.stopped_early = False
        self.final_error: str | None = None
        # a checkpoint on the evaluation cadence was written after that step's evaluation
        on_cadence = self.step > 0 and config.eval_steps and self.step % config.eval_steps == 0
        self._evaluated_at: int | None = self.step if on_cadence else None
        self._seconds: dict[str, float] = {}
        self._step_started = 0.0
        self._lr: float | None = None

    # ------------------------------------------------------------------------------------------ the loop
    def running(self) -> bool:
        """Whether to take another step; starts its clock. Evaluates first when the run starts at step 0."""
        if self.step == 0 and self._evaluated_at is None:
            self.first_results = self.evaluate()
        if self.step >= self.config.max_steps:
            return False
        if self.config.max_seconds is not None and self.training_seconds >= self.config.max_seconds:
            self.stopped_early = True
            return False
        self._seconds = {}
        self._lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else None  # this step's learning rate
        self._step_started = time.perf_counter()
        return True

    def timed(self, phase: str) -> contextlib.AbstractContextManager:
        """Time a phase of the current step (logged as ``time/<phase>``; CUDA work is waited for)."""
        return timed(self._seconds, phase, self.device)

    def end_step(self, stats: Mapping[str, torch.Tensor | float]) -> None:
        """Close the step: add its metrics, timings (``time/<phase>``, ``time/step``) and learning rate
        (``lr``, the one the step used), then log, evaluate and checkpoint on cadence."""
        seconds = time.perf_counter() - self._step_started
        self.training_seconds += seconds
        self.step += 1
        timings = {f"time/{phase}": value for phase, value in self._seconds.items()}
        self.tracker.update(
            {**stats, **timings, "time/step": seconds, **({"lr": self._lr} if self._lr is not None else {})}
        )
        config = self.config
        if self.step % config.logging_steps == 0:
            self.tracker.log(self.step)
        if config.eval_steps and self.step % config.eval_steps == 0:
            self.evaluate()
        if config.save_steps and self.step % config.save_steps == 0:
            save_checkpoint(
                config.output_dir,
                self.step,
                self.model,
                self.tokenizer,
                self.optimizer,
                self.scheduler,
                seed=config.seed,
                extra_modules=self.extra_modules,
                extra_state={"training_seconds": self.training_seconds},
                keep_last=config.save_total_limit,
            )

    def evaluate(self) -> dict[str, float]:
        """Run the held-out evaluation now and log it at the current step ({} without one)."""
        self._evaluated_at = self.step
        if self._evaluate is None:
            return {}
        self.results = self.tracker.log_eval(self.step, self._evaluate())
        return self.results

    # ------------------------------------------------------------------------------------------ the ending
    def finish(self) -> dict[str, float]:
        """Log the last window, save the final model, then evaluate (unless this step just was); returns the
        last evaluation's metrics. An evaluation error is reported after the model is safely written."""
        self.tracker.log(self.step)
        steps = self.step - self.start_step
        print(
            f"trained {steps} steps in {self.training_seconds:.0f} s ({steps / max(self.training_seconds, 1e-9):.2f} steps/s)"
        )
        if self.stopped_early:
            print(
                f"\n*** STOPPED EARLY: --max_seconds {self.config.max_seconds:g} reached after {self.step} of "
                f"{self.config.max_steps} steps; the schedule was laid out for {self.config.max_steps} ***\n",
                flush=True,
            )
        phase = "saving the final model"
        try:
            save_final_model(self.model, self.tokenizer, self.config.output_dir)
            if self._save_extra is not None:
                self._save_extra(self.config.output_dir)
            print(f"final model: {self.config.output_dir}")
            phase = "final evaluation"
            if self._evaluated_at != self.step:
                self.evaluate()
        except Exception as error:
            self.final_error, self.results = f"{phase}: {type(error).__name__}: {error}", {}
            saved = phase == "final evaluation"
            where = (
                f"the trained model is saved in {self.config.output_dir}" if saved else "the final model was not saved"
            )
            print(f"{phase} failed ({type(error).__name__}: {error}); {where}", file=sys.stderr)
            raise
        finally:
            self._write_summary()
            self.tracker.close()
        return self.results

    def _write_summary(self) -> None:
        summary = {
            "steps": self.step,
            "max_steps": self.config.max_steps,
            "training_seconds": round(self.training_seconds, 1),
            "stopped_early": self.stopped_early,
            "first_eval": self.first_results,
            "last_eval": self.results,
            "final_error": self.final_error,  # the ending's error (saving or the final evaluation), or None
        }
        path = Path(self.config.output_dir) / SUMMARY_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, path)


def read_summary(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """OUTPUT_DIR/summary.json of a finished run, or None."""
    path = Path(output_dir) / SUMMARY_NAME
    return json.loads(path.read_text()) if path.exists() else None


def cli(main: Callable[[], Any]) -> None:
    """Run a recipe's ``main`` from the command line: bad input (a ``ValueError`` or a missing file, raised by
    the checks that run before training) is one line on stderr and exit code 2, not a traceback.
    ``RLCORE_TRACEBACK=1`` shows the traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("RLCORE_TRACEBACK"):
            raise
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        sys.exit(2)
