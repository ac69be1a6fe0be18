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
            distributed/                                  under FSDP2 instead of the weights and the optimizer:
                                                          every process's shards (torch.distributed.checkpoint)
            checkpoint.json                               run id, step, the run's config, sha256 of every file

Atomicity: a checkpoint is written into ``OUTPUT_DIR/.tmp-checkpoint-<step>`` and moved into place with
``os.replace``; a crash mid-write leaves a ``.tmp-*`` directory that is ignored (and cleared by the next
save), and the previous checkpoints intact. Only directories holding ``training_state.pt`` count as
checkpoints. The final model is written into a temporary directory beside OUTPUT_DIR and its files are
moved in one by one with ``os.replace`` (each file appears whole).

Trust on resume: ``checkpoint.json`` names the run that wrote the checkpoint (a fresh run never shares a
directory with another run's checkpoints, see ``rlcore.run``) and the sha256 of each file; :func:`verify_checkpoint`
recomputes them, so a truncated or overwritten file is named before anything is loaded, and weights that load
but are not finite are refused (:class:`DamagedCheckpoint`; ``rlcore.run`` then falls back to the previous
checkpoint). A full disk while writing raises an error that says "no space left" and names the path.

FSDP2 (``rlcore.distributed``): every process writes its shards of the model and of the optimizer state into
``.tmp-checkpoint-<step>/distributed`` (``torch.distributed.checkpoint``, no full copy gathered anywhere);
rank 0 then writes the rest, hashes every file and moves the directory into place, as above. Such a
checkpoint resumes under FSDP2 (each process reads back its shards), not in one process; the final model is
still one ``from_pretrained`` directory.

Data order needs no saved sampler: it is a pure function of ``(seed, step)`` (rlcore.runtime.step_batches);
the checkpoint records the seed and refuses to resume under another.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
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

from rlcore import distributed, lora

TRAINING_STATE_NAME = "training_state.pt"
SHARDED_STATE_DIR = "distributed"  # FSDP2: the processes' shards of the model and optimizer
MANIFEST_NAME = "checkpoint.json"
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


def save_model(
    model: torch.nn.Module, tokenizer: Any, directory: str | os.PathLike, state_dict: dict | None = None
) -> None:
    """Write the trainable state of ``model`` (+ tokenizer) into ``directory`` (created if needed).

    Full fine-tuning: ``save_pretrained`` (safetensors), loadable by ``from_pretrained``. With LoRA
    adapters: the adapters only, in PEFT's format (``PeftModel.from_pretrained(base, directory)``).
    ``state_dict``: the tensors to write instead of the model's own (the full state dict of an FSDP2-sharded
    model, ``rlcore.distributed.full_state_dict``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if lora.has_lora(model):
        lora.save_adapter(model, directory, full_state=state_dict)
    else:
        model.save_pretrained(directory, state_dict=state_dict)
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
    run_id: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write OUTPUT_DIR/checkpoint-<step> atomically and delete all but the ``keep_last`` newest (0 = keep all).

    Args:
        step: optimizer steps completed.
        seed: the run's seed (the data order is a function of (seed, step)).
        extra_modules: other trained modules, saved as ``<name>.safetensors`` (e.g. ``{"value_model": v}``).
        extra_state: small picklable values the recipe needs back (e.g. elapsed seconds).
        run_id, config: the run's identity and its resolved flags (JSON values), kept in checkpoint.json.

    Under FSDP2 every process must call it (each writes its shards, see the module docstring); elsewhere rank
    0 alone.

    Returns:
        The checkpoint directory.

    Raises:
        OSError: "no space left on device" naming the path (the partial checkpoint is removed).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    sharded = distributed.is_sharded(model)
    if distributed.is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        clear_partial_saves(output_dir)
    if sharded:  # FSDP2: every process calls this and writes its shards; rank 0 writes the rest
        distributed.barrier()
        with disk_errors(tmp):
            save_sharded_state(_with_extra(model, extra_modules), optimizer, tmp / SHARDED_STATE_DIR)
        distributed.barrier()
        if not distributed.is_main():
            return final
    with disk_errors(tmp):
        if sharded:
            tmp.mkdir(parents=True, exist_ok=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        else:
            save_model(model, tokenizer, tmp)
        for name, module in (extra_modules or {}).items() if not sharded else ():  # FSDP2: in distributed/
            safetensors.torch.save_model(module, str(tmp / f"{name}.safetensors"))
        training_state = {
            "step": step,
            "seed": seed,
            "optimizer": None if sharded else optimizer.state_dict(),  # FSDP2: in distributed/
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "extra": dict(extra_state or {}),
        }
        torch.save(training_state, tmp / TRAINING_STATE_NAME)  # its presence marks a whole checkpoint
        manifest = {
            "run_id": run_id,
            "step": step,
            "seed": seed,
            "config": dict(config or {}),
            "sha256": file_hashes(tmp),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
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

    Raises:
        DamagedCheckpoint: a file does not match its hash, does not load, or the weights are not finite
            (the model may then hold part of this checkpoint: load another one over it).
    """
    checkpoint_dir = Path(checkpoint_dir)
    state_path = checkpoint_dir / TRAINING_STATE_NAME
    if not state_path.exists():
        raise FileNotFoundError(f"{checkpoint_dir} is not a complete checkpoint (no {TRAINING_STATE_NAME})")
    verify_checkpoint(checkpoint_dir)
    with _damaged_if_unreadable(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    if seed is not None and seed != state["seed"]:
        raise ValueError(f"{checkpoint_dir} was written with --seed {state['seed']}, this run has --seed {seed}")
    sharded_dir = checkpoint_dir / SHARDED_STATE_DIR
    if sharded_dir.is_dir() != distributed.is_sharded(model):
        raise ValueError(
            f"{checkpoint_dir} was written {'with' if sharded_dir.is_dir() else 'without'} --sharding fsdp2: "
            "resume it the same way"
        )
    with _damaged_if_unreadable(checkpoint_dir):
        if sharded_dir.is_dir():
            load_sharded_state(_with_extra(model, extra_modules), optimizer, sharded_dir)
        else:
            load_model_weights(model, checkpoint_dir)
        for name, module in (extra_modules or {}).items() if not sharded_dir.is_dir() else ():
            safetensors.torch.load_model(module, str(checkpoint_dir / f"{name}.safetensors"))
    modules = {"model": model, **(extra_modules or {})}
    for module_name, module in modules.items():
        broken = next((n for n, p in module.named_parameters() if not torch.isfinite(_local(p)).all()), None)
        if broken is not None:
            raise DamagedCheckpoint(f"{checkpoint_dir}: the {module_name} weight {broken} is not finite (NaN/inf)")
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}


def save_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """FSDP2: every process writes its shards of the model and optimizer state into ``directory``
    (``torch.distributed.checkpoint.save``; rank 0 adds the metadata). Every process must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, directory: Path) -> None:
    """FSDP2: every process reads its shards back from :func:`save_sharded_state`'s ``directory`` into the
    sharded ``model`` and ``optimizer`` (in place). Every process must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(directory))
        set_model_state_dict(model, state["model"])
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _with_extra(model: torch.nn.Module, extra_modules: Mapping[str, torch.nn.Module] | None) -> torch.nn.Module:
    """The module whose sharded state is checkpointed: ``model``, or with extra trained modules (PPO's critic,
    whose parameters the same optimizer holds) a ``ModuleDict`` of ``model`` and them."""
    if not extra_modules:
        return model
    return torch.nn.ModuleDict({"model": model, **extra_modules})


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP2 parameter (a DTensor); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


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


def read_manifest(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """checkpoint.json of a checkpoint ({} for checkpoints written before it existed).

    Raises:
        DamagedCheckpoint: the file exists but is not JSON.
    """
    path = Path(checkpoint_dir) / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise DamagedCheckpoint(f"{path}: not valid JSON ({error})") from None


def file_hashes(directory: str | os.PathLike) -> dict[str, str]:
    """{relative path: sha256 hex} of every file under ``directory`` except checkpoint.json."""
    directory = Path(directory)
    hashes = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        hashes[path.relative_to(directory).as_posix()] = digest.hexdigest()
    return hashes


def verify_checkpoint(checkpoint_dir: str | os.PathLike) -> None:
    """Recompute the sha256 of each file listed in checkpoint.json (no-op without one).

    Raises:
        DamagedCheckpoint: naming the first file that is missing or whose content changed.
    """
    checkpoint_dir = Path(checkpoint_dir)
    expected = read_manifest(checkpoint_dir).get("sha256")
    if not expected:
        return
    found = file_hashes(checkpoint_dir)
    for name, digest in expected.items():
        if name not in found:
            raise DamagedCheckpoint(f"{checkpoint_dir / name}: missing")
        if found[name] != digest:
            raise DamagedCheckpoint(
                f"{checkpoint_dir / name}: content does not match its sha256 (truncated or overwritten)"
            )


def resume_candidates(resume: str | None, output_dir: str | os.PathLike) -> list[Path]:
    """``--resume``: the checkpoints to try, newest first. None -> []; "auto" -> the checkpoints in output_dir
    written by the run of the newest one (the others are another run's and are never resumed); a path -> [it].

    Raises:
        FileNotFoundError: a path that is not a complete checkpoint.
    """
    if resume is None:
        return []
    if resume != "auto":
        path = Path(resume)
        if not (path / TRAINING_STATE_NAME).exists():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no {TRAINING_STATE_NAME})")
        return [path]
    newest_first = list_checkpoints(output_dir)[::-1]
    if not newest_first:
        return []
    run_ids = {}
    for path in newest_first:
        try:
            run_ids[path] = read_manifest(path).get("run_id")
        except DamagedCheckpoint:
            run_ids[path] = None
    run_id = next((run_ids[p] for p in newest_first if run_ids[p] is not None), None)
    return [p for p in newest_first if run_id is None or run_ids[p] in (run_id, None)]


def clear_partial_saves(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp-*checkpoint-*`` directories a killed save left (they take the space a resume needs)."""
    stale = sorted(Path(output_dir).glob(".tmp-*checkpoint-*")) if Path(output_dir).is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def delete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete every ``checkpoint-<step>`` directory in output_dir, complete or not (``--overwrite_output_dir``)."""
    output_dir = Path(output_dir)
    found = [p for p in output_dir.iterdir() if _CHECKPOINT_PATTERN.match(p.name)] if output_dir.is_dir() else []
    for path in found:
        shutil.rmtree(path)
    return found


class DamagedCheckpoint(ValueError):
    """A checkpoint file that is truncated, overwritten, unreadable or holds non-finite weights."""


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike):
    """Turn a full disk (ENOSPC, EDQUOT) while writing ``path`` into ``OSError("no space left on device ...")``
    naming it, and delete what was partly written there."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if Path(path).is_dir() and Path(path).name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)
        raise OSError(error.errno, f"no space left on device while writing {path}; free space and run again") from None


@contextlib.contextmanager
def _damaged_if_unreadable(path: Path):
    try:
        yield
    except DamagedCheckpoint:
        raise
    except Exception as error:  # torch.load / safetensors on truncated or garbage bytes: many error types
        raise DamagedCheckpoint(f"{path}: does not load ({type(error).__name__}: {str(error)[:200]})") from None


def _delete_old_checkpoints(output_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# final model


def save_final_model(
    model: torch.nn.Module, tokenizer: Any, output_dir: str | os.PathLike, state_dict: dict | None = None
) -> Path:
    """Write the final model into OUTPUT_DIR itself, so that ``--model OUTPUT_DIR`` and
    ``from_pretrained(OUTPUT_DIR)`` load it.

    Full fine-tuning: ``save_pretrained``. LoRA: the merged model (adapters folded into a plain
    transformers model) at OUTPUT_DIR and the adapters alone at OUTPUT_DIR/adapter.
    Each file is moved into place with ``os.replace``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with disk_errors(output_dir), tempfile.TemporaryDirectory(prefix=".tmp-final-", dir=output_dir) as tmp:
        tmp = Path(tmp)
        if lora.has_lora(model):
            lora.export_merged(model, tokenizer, tmp / "merged", state_dict)
            lora.save_adapter(model, tmp / ADAPTER_DIR_NAME, full_state=state_dict)
            _move_files(tmp / ADAPTER_DIR_NAME, output_dir / ADAPTER_DIR_NAME)
            _move_files(tmp / "merged", output_dir)
        else:
            save_model(model, tokenizer, tmp, state_dict)
            _move_files(tmp, output_dir)
    return output_dir


def _move_files(source: Path, destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            os.replace(path, destination / path.name)
