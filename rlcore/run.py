"""The bookkeeping every recipe repeats, in one place, so that a recipe's loop holds only its algorithm.

A recipe builds its model, data and optimizer, then::

    run = Run(config, model, tokenizer, optimizer, scheduler, evaluate=evaluate,   # resume, run_config.json, tracker
              guard=guards.supervised(config))                 # or guards.online(config) (rlcore.guards)
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
- **several processes** (``torchrun``, rlcore.distributed): step metrics averaged over the processes; the bar,
  metrics.jsonl, curves, run_config.json, summary.json, checkpoints (with every process's RNG state) and the
  final model written by rank 0 only.
- **the ending**: the final model is written before the final evaluation, so an evaluation error never
  loses it; OUTPUT_DIR/summary.json records steps, time, whether the run was cut short, and the first and
  last evaluations. A model whose weights are not finite is never written as the final model.
- **guards** (rlcore.guards): each step's loss, gradient norm and collapse metrics go to the recipe's
  ``guard``: non-finite steps are skipped and stop the run after ``--max_skipped_steps`` in a row;
  divergence and RL collapse warn (or stop, ``--stop_on_collapse``).
- **a run owns its directory**: a fresh run refuses an OUTPUT_DIR holding checkpoints (``--resume`` continues
  them, ``--overwrite_output_dir`` deletes them); a resume compares the flags with the checkpoint's and refuses
  changes that break the run (:data:`RESUMABLE_FLAGS` may change), verifies each file's sha256 and falls back
  to the previous checkpoint of the same run when the newest is damaged.
- **preemption**: SIGTERM or Ctrl-C ends the current step, writes a checkpoint and exits with 128 + the
  signal number (143, 130); a second signal exits at once. ``--resume`` continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from rlcore import distributed, guards
from rlcore.checkpoint import (
    DamagedCheckpoint,
    clear_partial_saves,
    delete_checkpoints,
    disk_errors,
    list_checkpoints,
    load_checkpoint,
    read_manifest,
    restore_rng_state,
    resume_candidates,
    rng_state,
    save_checkpoint,
    save_final_model,
)
from rlcore.config import save_config
from rlcore.models import describe_parameters
from rlcore.runtime import timed
from rlcore.tracking import Tracker, read_metrics

SUMMARY_NAME = "summary.json"

# flags a resumed run may change (bookkeeping, evaluation, hardware); any other change breaks the run (the
# schedule, the data order, the model) and is refused
RESUMABLE_FLAGS = frozenset(
    {
        "resume",
        "output_dir",
        "overwrite_output_dir",
        "logging_steps",
        "eval_steps",
        "eval_batch_size",
        "num_eval_rows",
        "eval_split",
        "eval_dataset",
        "eval_metric",
        "save_steps",
        "save_total_limit",
        "report_to",
        "max_seconds",
        "max_skipped_steps",
        "stop_on_collapse",
        "collapse_patience",
        "device",
        "bf16",
        "threads",
        "compile",
    }
)


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
        save_extra: ``(output_dir, full_states) -> None``, writes what the final model directory holds beside the
            model (rank 0); ``full_states[name]`` is the extra module's full state dict under FSDP2, else None.
        guard: the loop's guard (``rlcore.guards.supervised(config)`` when None).
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
        guard: guards.LoopGuard | None = None,
    ) -> None:
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.optimizer, self.scheduler = optimizer, scheduler
        self._evaluate, self._save_extra, self.extra_modules = evaluate, save_extra, extra_modules
        self.guard = guard if guard is not None else guards.supervised(config)
        self.device = next(model.parameters()).device
        print(describe_parameters(model, *(extra_modules or {}).values()))
        self.step, self.training_seconds = 0, 0.0
        self.run_id, self.changed_on_resume = uuid.uuid4().hex, {}
        if distributed.is_main():  # torchrun: one process checks and clears the directory, the others wait
            self._claim_output_dir()
        distributed.barrier()
        self._resume()
        self.start_step, self.start_seconds = self.step, self.training_seconds
        if distributed.is_main():
            with disk_errors(config.output_dir):
                save_config(config, config.output_dir)
        self.tracker = Tracker(
            config.output_dir,
            config.max_steps,
            self.step,
            bar_keys=bar_keys,
            report_to=getattr(config, "report_to", "none"),
            run_config=dataclasses.asdict(config),
            enabled=distributed.is_main(),
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
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._install_signal_handlers()

    # ------------------------------------------------------------------------------------------ the loop
    def running(self) -> bool:
        """Whether to take another step; starts its clock. Evaluates first when the run starts at step 0.
        After SIGTERM/SIGINT: writes a checkpoint and raises ``RunStopped`` (exit code 128 + signal)."""
        if distributed.world_size() > 1:  # torchrun: every process stops at the same step if any got a signal
            self._signal = distributed.all_reduce_max(self._signal or 0) or None
        if self._signal is not None:
            self._stop_for_signal()
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

    def end_step(
        self, stats: Mapping[str, torch.Tensor | float], counts: Mapping[str, torch.Tensor | float] | None = None
    ) -> None:
        """Close the step: add its metrics, timings (``time/<phase>``, ``time/step``) and learning rate
        (``lr``, the one the step used), then log, evaluate and checkpoint on cadence. ``counts``: for metrics
        that are means over this process's items (tokens, rows), their numbers, so that under torchrun the
        logged value is the whole batch's mean (``rlcore.distributed.reduce_stats``)."""
        seconds = time.perf_counter() - self._step_started
        self.training_seconds += seconds
        self.step += 1
        timings = {f"time/{phase}": value for phase, value in self._seconds.items()}
        stats = distributed.reduce_stats(stats, counts)  # torchrun: the mean over the processes (or the batch)
        self.tracker.update(
            {**stats, **timings, "time/step": seconds, **({"lr": self._lr} if self._lr is not None else {})}
        )
        self._guard_step(stats)
        config = self.config
        if self.step % config.logging_steps == 0:
            self.tracker.log(self.step)
        if config.eval_steps and self.step % config.eval_steps == 0:
            self.evaluate()
        if config.save_steps and self.step % config.save_steps == 0:
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Write OUTPUT_DIR/checkpoint-<step> now (atomically; see rlcore.checkpoint). Under torchrun rank 0
        writes it, with every process's RNG state (under FSDP2 every process first writes its shards), and the
        others wait until it is in place."""
        config, rank_rng = self.config, distributed.gather_objects(rng_state())
        path = Path(config.output_dir) / f"checkpoint-{self.step}"
        if distributed.is_main() or distributed.is_sharded(self.model):  # FSDP2: every process writes its shards
            path = save_checkpoint(
                config.output_dir,
                self.step,
                self.model,
                self.tokenizer,
                self.optimizer,
                self.scheduler,
                seed=config.seed,
                extra_modules=self.extra_modules,
                extra_state={"training_seconds": self.training_seconds, "rank_rng": rank_rng},
                keep_last=config.save_total_limit,
                run_id=self.run_id,
                config=_config_values(config),
            )
        distributed.barrier()
        return path

    @staticmethod
    def print(*args, **kwargs) -> None:
        """``print`` on rank 0 only (every process runs the same lines under torchrun)."""
        if distributed.is_main():
            print(*args, **kwargs)

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
        self.print(
            f"trained {steps} steps in {self.training_seconds:.0f} s ({steps / max(self.training_seconds, 1e-9):.2f} steps/s)"
        )
        if self.stopped_early:
            self.print(
                f"\n*** STOPPED EARLY: --max_seconds {self.config.max_seconds:g} reached after {self.step} of "
                f"{self.config.max_steps} steps; the schedule was laid out for {self.config.max_steps} ***\n",
                flush=True,
            )
        phase = "saving the final model"
        try:
            broken = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
            if broken:
                raise guards.RunStopped(
                    f"the weights are not finite ({broken[0]}, ...): the final model was not written"
                )
            full_state = distributed.full_state_dict(self.model)  # FSDP2: gathered on rank 0 (None otherwise)
            extra_states = {name: distributed.full_state_dict(m) for name, m in (self.extra_modules or {}).items()}
            if distributed.is_main():
                save_final_model(self.model, self.tokenizer, self.config.output_dir, full_state)
                if self._save_extra is not None:
                    self._save_extra(self.config.output_dir, extra_states)
            distributed.barrier()
            self.print(f"final model: {self.config.output_dir}")
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
            if distributed.is_main():
                self._write_summary()
            self.tracker.close()
            self._restore_signal_handlers()
        return self.results

    # ------------------------------------------------------------------------------------------ guards
    def _guard_step(self, stats: Mapping[str, torch.Tensor | float]) -> None:
        """Hand the step's watched metrics to the guard (one host sync); on a stop, close the run and re-raise."""
        keys = ["loss", "grad_norm", self.guard.divergence_key, *(c.key for c in self.guard.collapses)]
        watched = [k for k in dict.fromkeys(keys) if k is not None and k in stats]
        if not watched:
            return
        on_device = [torch.as_tensor(stats[k], dtype=torch.float32, device=self.device) for k in watched]
        values = torch.stack(on_device).tolist()
        try:
            self.guard.check(self.step, dict(zip(watched, values)))
        except guards.RunStopped as error:
            self.final_error = str(error)
            self._close()
            raise
        if self.guard.warning is not None:
            self.tracker.bar.set_description(f"train [{self.guard.warning}]", refresh=False)

    def _close(self, log_window: bool = True) -> None:
        """Summary, curves and signal handlers, for a run that ends without its final model. A preempted run
        does not log its partial window: the resumed run logs it, as the uninterrupted run would."""
        if log_window:
            self.tracker.log(self.step)
        self._write_summary()
        self.tracker.close()
        self._restore_signal_handlers()

    # ------------------------------------------------------------------------------------------ resume
    def _claim_output_dir(self) -> None:
        """A fresh run refuses a directory holding checkpoints (another run's: rotation would keep them and
        ``--resume`` would pick them) unless ``--overwrite_output_dir``; leftovers of killed saves are deleted."""
        config, output_dir = self.config, Path(self.config.output_dir)
        existing = [p.name for p in list_checkpoints(output_dir)]
        if config.resume is None and existing:
            if not config.overwrite_output_dir:
                raise ValueError(
                    f"--output_dir {output_dir} holds checkpoints of an earlier run ({', '.join(existing)}): "
                    "continue it with --resume, or start afresh with --overwrite_output_dir (deletes them)"
                )
            deleted = delete_checkpoints(output_dir)
            print(f"--overwrite_output_dir: deleted {len(deleted)} checkpoint(s) of the earlier run in {output_dir}")
        for path in clear_partial_saves(output_dir):
            print(f"deleted {path} (the leftover of a save that was killed)")

    def _resume(self) -> None:
        """``--resume``: load the newest usable checkpoint of this run; a damaged one (named) falls back to the
        previous one; flags that break the run (not in RESUMABLE_FLAGS) must match the checkpoint's."""
        config = self.config
        candidates = resume_candidates(config.resume, config.output_dir)
        if config.resume == "auto" and not candidates:
            print(f"--resume: no checkpoint in {config.output_dir}; starting a new run at step 0")
            return
        problems = []
        for path in candidates:
            try:
                manifest = read_manifest(path)
                self.changed_on_resume = check_resumed_config(manifest.get("config"), _config_values(config), path)
                state = load_checkpoint(
                    path, self.model, self.optimizer, self.scheduler, seed=config.seed, extra_modules=self.extra_modules
                )
            except DamagedCheckpoint as error:
                if config.resume != "auto":
                    raise ValueError(f"--resume {config.resume}: {error}") from None
                problems.append(str(error))
                print(f"WARNING: {error}; falling back to the previous checkpoint", file=sys.stderr)
                continue
            self.step, self.training_seconds = state["step"], state["extra"].get("training_seconds", 0.0)
            self.run_id = manifest.get("run_id") or self.run_id
            _restore_rank_rng(state["extra"])  # torchrun: each process's own RNG state
            print(f"resumed from {path} at step {self.step}")
            for name, (old, new) in self.changed_on_resume.items():
                print(f"resumed with --{name} changed: {old!r} -> {new!r}")
            return
        if problems:
            raise ValueError(f"--resume: no usable checkpoint in {config.output_dir}: {'; '.join(problems)}")

    # ------------------------------------------------------------------------------------------ preemption
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._signal is not None:  # the second signal: leave now (checkpoints are written atomically)
            os.write(2, f"\n{name} again: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)
        self._signal = signum
        os.write(
            2,
            f"\n{name}: finishing step {self.step + 1}, then writing a checkpoint ({name} again exits now)\n".encode(),
        )

    def _stop_for_signal(self) -> None:
        name, signum = signal.Signals(self._signal).name, self._signal
        path = self.save_checkpoint()
        self.final_error = f"stopped by {name} after step {self.step}"
        self._close(log_window=False)
        raise guards.RunStopped(
            f"stopped by {name} after step {self.step}; checkpoint written to {path}; continue with --resume",
            exit_code=128 + signum,
        )

    # ------------------------------------------------------------------------------------------ summary
    def _write_summary(self) -> None:
        if not distributed.is_main():  # torchrun: rank 0 writes it
            return
        summary = {
            "run_id": self.run_id,
            "steps": self.step,
            "max_steps": self.config.max_steps,
            "training_seconds": round(self.training_seconds, 1),
            "stopped_early": self.stopped_early,
            "first_eval": self.first_results,
            "last_eval": self.results,
            "final_error": self.final_error,  # why the run ended without its ending (or the ending's error), or None
            "skipped_steps": self.guard.skipped_total,  # steps with a non-finite loss or gradient norm
            "changed_on_resume": {k: list(v) for k, v in self.changed_on_resume.items()},
        }
        path = Path(self.config.output_dir) / SUMMARY_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, path)


def _restore_rank_rng(extra: Mapping[str, Any]) -> None:
    """Under torchrun, each process takes back its own RNG state from a checkpoint written at the same
    world size (a different world size keeps rank 0's, restored by load_checkpoint)."""
    states = extra.get("rank_rng")
    if states is not None and len(states) == distributed.world_size():
        restore_rng_state(states[distributed.rank()])


def read_summary(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """OUTPUT_DIR/summary.json of a finished run, or None."""
    path = Path(output_dir) / SUMMARY_NAME
    return json.loads(path.read_text()) if path.exists() else None


def check_resumed_config(
    saved: Mapping[str, Any] | None, current: Mapping[str, Any], checkpoint: str | os.PathLike
) -> dict[str, tuple[Any, Any]]:
    """Compare a resumed run's flags with those its checkpoint was written under.

    Returns:
        ``{flag: (old, new)}`` of the changes allowed on resume (RESUMABLE_FLAGS); flags the checkpoint does
        not record are not compared.

    Raises:
        ValueError: naming every other changed flag (batch size, schedule, model, data, ...: the resumed run
            would not continue the interrupted one).
    """
    changed = {k: (saved[k], v) for k, v in current.items() if saved and k in saved and saved[k] != v}
    breaking = {k: v for k, v in changed.items() if k not in RESUMABLE_FLAGS}
    if breaking:
        described = ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in breaking.items())
        raise ValueError(
            f"--resume {checkpoint}: the run was started with other settings ({described}); resume with the "
            "original flags (its run_config.json), or start a new run in another --output_dir"
        )
    return {k: v for k, v in changed.items() if k not in ("resume", "output_dir", "overwrite_output_dir")}


def _config_values(config) -> dict[str, Any]:
    """The flags as JSON values (what run_config.json and checkpoint.json hold)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def cli(main: Callable[[], Any]) -> None:
    """Run a recipe's ``main`` from the command line: bad input (a ``ValueError`` or a missing file, raised by
    the checks that run before training) is one line on stderr and exit code 2, not a traceback; a run that
    stopped for a reason it explains (``rlcore.guards.RunStopped``: non-finite steps, collapse, preemption)
    and a full disk are one line too, with exit code 1 (128 + signal when preempted).
    ``RLCORE_TRACEBACK=1`` shows the traceback."""
    try:
        main()
        distributed.shutdown()  # torchrun: leave the process group once every process is done
    except (ValueError, FileNotFoundError, guards.RunStopped, OSError) as error:
        full_disk = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        if os.environ.get("RLCORE_TRACEBACK") or (
            isinstance(error, OSError) and not full_disk and not isinstance(error, FileNotFoundError)
        ):
            raise
        print(f"{Path(sys.argv[0]).name}: error: {error.strerror if full_disk else error}", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 1 if full_disk else 2))
