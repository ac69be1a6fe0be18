"""Checkpoints that survive crashes and resume bit-for-bit, and the final model directory.

Layout of a run's OUTPUT_DIR::

    OUTPUT_DIR/
        config.json, model.safetensors, tokenizer files   the final model: from_pretrained(OUTPUT_DIR) loads it
        adapter/                                          with LoRA: the adapters alone (PEFT format)
        run_config.json                                   the resolved run settings (--config reads it back)
        metrics.jsonl, curves.png                         see rlcore.tracking
        checkpoint-<step>/                                every --save_steps steps, the last K kept
            config.json, model.safetensors, tokenizer     full fine-tuning: a from_pretrained directory
            adapter_model.safetensors, adapter_config.json  with LoRA: the adapters (base = --model)
            <name>.safetensors                            extra modules (e.g. a PPO value model)
            training_state.pt                             step, optimizer, scheduler, RNG, data order

Atomicity: a checkpoint is written into ``OUTPUT_DIR/.tmp-checkpoint-<step>`` and moved into place with
``os.replace``; a crash mid-write leaves a ``.tmp-*`` directory that is ignored (and cleared by the next
save), and the previous checkpoints intact. Only directories holding ``training_state.pt`` count as
checkpoints. The final model is written into a temporary directory beside OUTPUT_DIR and its files are
moved in one by one with ``os.replace`` (each file appears whole).

Data order needs no saved sampler: it is a pure function of ``(seed, step)`` (rlcore.runtime.step_batches);
the checkpoint records the seed and refuses to resume under another.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from rlcore import lora

TRAINING_STATE_NAME = "training_state.pt"
ADAPTER_DIR_NAME = "adapter"
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


# ----------------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict[str, Any]:
    """The state of python's ``random``, torch's CPU generator and every CUDA generator."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# model weights


def save_model(model: torch.nn.Module, tokenizer: Any, directory: str | os.PathLike) -> None:
    """Write the trainable state of ``model`` (+ tokenizer) into ``directory`` (created if needed).

    Full fine-tuning: ``save_pretrained`` (safetensors), loadable by ``from_pretrained``. With LoRA
    adapters: the adapters only, in PEFT's format (``PeftModel.from_pretrained(base, directory)``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if lora.has_lora(model):
        lora.save_adapter(model, directory)
    else:
        model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_model_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load weights written by :func:`save_model` into ``model`` in place (adapters, or every tensor).

    Raises:
        ValueError: a tensor of the model is missing from the files (other than a tied copy), or the files
            hold tensors the model does not have.
    """
    directory = Path(directory)
    if lora.has_lora(model):
        lora.load_adapter(model, directory)
        return
    files = sorted(directory.glob("model*.safetensors"))  # model.safetensors or save_pretrained's shards
    if not files:
        raise ValueError(f"{directory}: no model*.safetensors weights to load")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(safetensors.torch.load_file(path))
    result = model.load_state_dict(state, strict=False)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{directory}: weights do not match the model: missing {missing[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    *,
    seed: int,
    extra_modules: Mapping[str, torch.nn.Module] | None = None,
    extra_state: Mapping[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write OUTPUT_DIR/checkpoint-<step> atomically and delete all but the ``keep_last`` newest (0 = keep all).

    Args:
        step: optimizer steps completed.
        seed: the run's seed (the data order is a function of (seed, step)).
        extra_modules: other trained modules, saved as ``<name>.safetensors`` (e.g. ``{"value_model": v}``).
        extra_state: small picklable values the recipe needs back (e.g. elapsed seconds).

    Returns:
        The checkpoint directory.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(".tmp-*checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    save_model(model, tokenizer, tmp)
    for name, module in (extra_modules or {}).items():
        safetensors.torch.save_model(module, str(tmp / f"{name}.safetensors"))
    training_state = {
        "step": step,
        "seed": seed,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "extra": dict(extra_state or {}),
    }
    torch.save(training_state, tmp / TRAINING_STATE_NAME)  # written last: its presence marks a whole checkpoint
    replaced = output_dir / f".tmp-replaced-checkpoint-{step}"
    if final.exists():  # re-saving a step (e.g. after resuming from it): move the old one aside first
        os.replace(final, replaced)
    os.replace(tmp, final)
    shutil.rmtree(replaced, ignore_errors=True)
    _delete_old_checkpoints(output_dir, keep_last)
    return final


def load_checkpoint(
    checkpoint_dir: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    seed: int | None = None,
    extra_modules: Mapping[str, torch.nn.Module] | None = None,
) -> dict[str, Any]:
    """Restore model (in place), optimizer, scheduler, extra modules and RNG from a checkpoint.

    Args:
        seed: the current run's seed; a different seed than the checkpoint's raises (the data order would
            differ from the interrupted run's).

    Returns:
        ``{"step": int, "extra": dict}``: resume the loop at ``step``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    state_path = checkpoint_dir / TRAINING_STATE_NAME
    if not state_path.exists():
        raise FileNotFoundError(f"{checkpoint_dir} is not a complete checkpoint (no {TRAINING_STATE_NAME})")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if seed is not None and seed != state["seed"]:
        raise ValueError(f"{checkpoint_dir} was written with --seed {state['seed']}, this run has --seed {seed}")
    load_model_weights(model, checkpoint_dir)
    for name, module in (extra_modules or {}).items():
        safetensors.torch.load_model(module, str(checkpoint_dir / f"{name}.safetensors"))
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_PATTERN.match(path.name)
        if match and (path / TRAINING_STATE_NAME).exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``--resume``: None -> None; "auto" -> latest checkpoint in output_dir (None if there is none); a path."""
    if resume is None:
        return None
    if resume == "auto":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / TRAINING_STATE_NAME).exists():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no {TRAINING_STATE_NAME})")
    return path


def _delete_old_checkpoints(output_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# final model


def save_final_model(model: torch.nn.Module, tokenizer: Any, output_dir: str | os.PathLike) -> Path:
    """Write the final model into OUTPUT_DIR itself, so that ``--model OUTPUT_DIR`` and
    ``from_pretrained(OUTPUT_DIR)`` load it.

    Full fine-tuning: ``save_pretrained``. LoRA: the merged model (adapters folded into a plain
    transformers model) at OUTPUT_DIR and the adapters alone at OUTPUT_DIR/adapter.
    Each file is moved into place with ``os.replace``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-final-", dir=output_dir) as tmp:
        tmp = Path(tmp)
        if lora.has_lora(model):
            lora.export_merged(model, tokenizer, tmp / "merged")
            lora.save_adapter(model, tmp / ADAPTER_DIR_NAME)
            _move_files(tmp / ADAPTER_DIR_NAME, output_dir / ADAPTER_DIR_NAME)
            _move_files(tmp / "merged", output_dir)
        else:
            save_model(model, tokenizer, tmp)
            _move_files(tmp, output_dir)
    return output_dir


def _move_files(source: Path, destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            os.replace(path, destination / path.name)
