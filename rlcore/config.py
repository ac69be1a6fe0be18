"""Run configuration: a dataclass whose fields are the command-line flags.

One source of truth per setting: a recipe declares a dataclass (usually a subclass of :class:`TrainConfig`),
:func:`parse_config` turns its fields into flags, and :func:`save_config` writes the resolved values next to
the outputs, so what is logged is what is used.

Precedence, lowest first: the dataclass defaults, then ``--config FILE`` (JSON, or YAML through PyYAML, which
transformers already depends on), then the flags given on the command line.

Flag syntax:
- every field ``name`` is ``--name VALUE``;
- a bool field is ``--name`` (true), ``--no-name`` (false) or ``--name true|false|1|0|yes|no``;
- an ``Optional`` field takes ``none`` for None;
- a field whose metadata holds ``flag_const`` may be given without a value (``--resume`` means
  ``--resume auto``).

The help text of a flag is the trailing comment of its field in the class source (``lr: float = 1e-3  # peak
learning rate``), so a config reads as plain annotated Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")

RUN_CONFIG_NAME = "run_config.json"  # config.json in OUTPUT_DIR is the model's (from_pretrained reads it)

# recipes/sft.py flags of an SFT run "stopped mid-schedule": the cosine ends at half the peak learning rate
# instead of annealing to 0. The online recipes' warm start (rlcore.toy.warm_start) and the quickstart's
# SFT stage use it: RL and DPO improved such checkpoints on the toy task, not fully annealed ones.
ONLINE_WARM_START_FLAGS = ("--lr", "1e-3", "--warmup_steps", "100", "--lr_schedule", "cosine", "--min_lr_ratio", "0.5")


@dataclass
class TrainConfig:
    """Settings shared by every recipe; a recipe subclasses it, adds its own and may change defaults."""

    # --- model and data
    model: str = "tiny"  # "tiny" (embedded default), a local directory or a hub id
    dataset: str = (
        "toy:prompt_completion"  # "toy:<kind>", a .json/.jsonl/.parquet/.csv file, a dataset dir or a hub name
    )
    train_split: str = "train"  # split of --dataset used for training
    eval_split: str = (
        "test"  # split of --dataset (or --eval_dataset) to evaluate on; a single file has none ("none" = no evaluation)
    )
    eval_dataset: str | None = (
        None  # evaluation rows from another source (a file, ...); None = --dataset's --eval_split
    )
    eval_metric: str | None = (
        "auto"  # greedy-generation metric: a reward-function name/spec (rlcore.rewards), "auto" (exact_match on the toy task, else none) or none
    )
    num_train_rows: int | None = None  # keep only the first N training rows (None = all)
    num_eval_rows: int | None = 500  # rows used for evaluation (None = all)
    max_length: int = 256  # longest tokenized sequence, in tokens
    output_dir: str = "outputs/run"  # checkpoints, metrics.jsonl, curves.png and the final model
    seed: int = 0  # seeds initialisation, data order and sampling

    # --- optimisation
    lr: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (not applied to biases and norms)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    lr_schedule: str = "cosine"  # "cosine", "linear" or "constant", after the warmup
    warmup_steps: int = 0  # linear warmup from 0 to --lr over this many optimizer steps
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    max_grad_norm: float | None = 1.0  # clip the global gradient norm (None = no clipping)
    batch_size: int = 8  # rows per micro-batch (one forward/backward)
    grad_accum_steps: int = 1  # micro-batches per optimizer step; rows per step = batch_size * grad_accum_steps
    max_steps: int = 100  # optimizer steps; the schedule is laid out over this many
    max_seconds: float | None = (
        None  # safety stop: end early (save, evaluate, say so) after this much training time (None = off)
    )

    # --- logging, evaluation, checkpoints
    logging_steps: int = 10  # log the mean of the metrics over this many steps
    eval_steps: int = 0  # evaluate every N steps (0 = only at the end)
    eval_batch_size: int = 64  # rows per evaluation batch
    save_steps: int = 0  # write OUTPUT_DIR/checkpoint-<step> every N steps (0 = only the final model)
    save_total_limit: int = 2  # keep the last K checkpoints (0 = keep all)
    resume: str | None = field(
        default=None, metadata={"flag_const": "auto"}
    )  # "auto" (latest checkpoint in output_dir) or a checkpoint path

    # --- guards and resume (rlcore.guards, rlcore.run)
    max_skipped_steps: int = 5  # stop after N steps in a row with a non-finite loss or gradient norm (0 = never)
    stop_on_collapse: bool = False  # stop (exit 1) on divergence or RL collapse instead of only warning
    collapse_patience: int = 20  # steps in a row that make an RL collapse (no signal, no entropy, all truncated)
    overwrite_output_dir: bool = False  # start afresh in an --output_dir holding checkpoints (deletes them)

    # --- hardware
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    threads: int | None = None  # torch CPU threads (None = $OMP_NUM_THREADS if set, else half the cores, at least 1)
    bf16: bool | None = None  # bf16 autocast (None = on for CUDA, off for CPU)
    compile: bool | None = None  # torch.compile the model (None = on for CUDA, off for CPU)
    flush_denormal: bool = True  # CPU: compute floats below 1.2e-38 as 0 (x86 is slow on them; rlcore.runtime)

    # --- several processes (torchrun; rlcore.distributed)
    sharding: str = "ddp"  # under torchrun: "ddp" (replicated weights, averaged gradients) or "fsdp2" (fully_shard)

    # --- parameter-efficient fine-tuning
    lora_r: int = 0  # LoRA rank (0 = full fine-tuning)
    lora_alpha: float = 16.0  # LoRA scaling numerator: scale = alpha / r
    lora_dropout: float = 0.0  # dropout on the LoRA branch input
    lora_targets: str | None = (
        None  # comma-separated module-name suffixes or a regex (None = attention and MLP projections)
    )
    load_in_4bit: bool = False  # quantise the frozen base to 4-bit nf4 (QLoRA; needs --lora_r > 0)

    # --- real data and trackers (rlcore.data, rlcore.optim, rlcore.tracking)
    dataset_config: str | None = None  # a hub dataset's configuration name, e.g. "main" (None = its default)
    columns: str | None = None  # rename columns first: "query=prompt,response=completion"
    formatting_func: str | None = None  # "file.py:fn" or "pkg.module:fn": row -> text (str) or columns (dict)
    truncation: str = "drop"  # rows over --max_length/--max_prompt_length: "drop", "keep_start", "keep_end"
    warmup_ratio: float = 0.0  # warmup over this fraction of the updates (when --warmup_steps is 0)
    num_train_epochs: float | None = None  # passes over the training rows; sets --max_steps (None = off)
    report_to: str = "none"  # trackers beside metrics.jsonl: none, or some of tensorboard,wandb,trackio

    # --- memory (rlcore.models: the precision policy)
    dtype: str = "float32"  # weights as loaded: float32, bfloat16 or float16 (LoRA adapters and heads stay float32)
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass (non-reentrant)
    bnb_double_quant: bool = False  # with --load_in_4bit: also quantise the quantisation constants (~0.4 bit/weight)
    bnb_compute_dtype: str | None = None  # with --load_in_4bit: matmul dtype (None = bfloat16 on CUDA, float32 on CPU)
    optim: str = "adamw"  # adamw (torch), adamw_8bit, paged_adamw_8bit, paged_adamw_32bit (bitsandbytes)
    master_weights: str | None = None  # "float32": AdamW updates float32 copies of bfloat16/float16 weights
    lm_head_chunk: int = 256  # positions per LM-head chunk in log-prob passes (0 = the model's full [B, T, V] logits)

    def __post_init__(self) -> None:
        _check_data_and_tracker_flags(self)
        positive = ("lr", "batch_size", "grad_accum_steps", "max_steps", "logging_steps", "eval_batch_size")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"--threads must be > 0 or none, got {self.threads}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"--max_seconds must be > 0 or none, got {self.max_seconds}")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "eval_steps", "save_steps", "save_total_limit", "lora_r", "weight_decay")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"--lr_schedule must be one of cosine, linear, constant; got {self.lr_schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.sharding not in ("ddp", "fsdp2"):
            raise ValueError(f"--sharding must be ddp or fsdp2, got {self.sharding!r}")
        if self.sharding == "fsdp2" and self.load_in_4bit:  # fully_shard cannot split bitsandbytes' packed weights
            raise ValueError("--sharding fsdp2 does not take --load_in_4bit (packed 4-bit weights): use --sharding ddp")
        if self.load_in_4bit and self.lora_r == 0:
            raise ValueError("--load_in_4bit trains adapters on a frozen 4-bit base: it needs --lora_r > 0")
        if self.max_skipped_steps < 0:
            raise ValueError(f"--max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        if self.collapse_patience <= 0:
            raise ValueError(f"--collapse_patience must be > 0, got {self.collapse_patience}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16; got {self.dtype!r}")
        if self.dtype == "float16" and self.lora_r == 0:
            raise ValueError("--dtype float16 weights cannot be trained in full without loss scaling: use --lora_r > 0")
        if self.bnb_compute_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(
                f"--bnb_compute_dtype must be float32, bfloat16 or float16; got {self.bnb_compute_dtype!r}"
            )
        if (self.bnb_double_quant or self.bnb_compute_dtype) and not (
            self.load_in_4bit or getattr(self, "teacher_load_in_4bit", False)
        ):
            raise ValueError("--bnb_double_quant and --bnb_compute_dtype apply with --load_in_4bit only")
        if self.optim not in ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
            raise ValueError(
                f"--optim must be adamw, adamw_8bit, paged_adamw_8bit or paged_adamw_32bit; got {self.optim!r}"
            )
        if self.master_weights not in (None, "float32") or (self.master_weights and self.optim != "adamw"):
            raise ValueError(
                f"--master_weights must be float32 (or none), with --optim adamw; got {self.master_weights!r}"
            )
        if self.master_weights and self.sharding == "fsdp2":
            raise ValueError("--master_weights float32 is not yet supported with --sharding fsdp2: use --sharding ddp")
        if self.lm_head_chunk < 0:
            raise ValueError(f"--lm_head_chunk must be >= 0 (0 = full logits), got {self.lm_head_chunk}")


@dataclass
class OnlineConfig(TrainConfig):
    """Flags shared by the online recipes: prompts, sampling, rewards, and the warm start of the default."""

    needs_reward: typing.ClassVar[bool] = True  # False: a recipe whose signal is not a reward (distillation)

    dataset: str = "toy:prompt_only"  # prompts (a "prompt" column; other columns reach the reward functions)
    warm_start_steps: int = 1500  # with --model tiny only: start from `recipes/sft.py --max_steps N` (run once, cached); 0 = the untrained tiny model
    max_prompt_length: int = 128  # prompts longer than this many tokens are dropped (or cut: --truncation)
    max_new_tokens: int = 8  # completion length limit, in tokens
    temperature: float = 1.0  # sampling temperature (log-probs in the loss use the same temperature)
    top_k: int = 0  # sample among the k most likely tokens (0 = all)
    top_p: float = 1.0  # nucleus sampling (1 = off)
    reward_funcs: str | None = (
        "accuracy"  # comma-separated reward functions: accuracy, digits, format, pkg.module:fn, file.py:fn
    )
    reward_model: str | None = None  # a reward-model directory (any tokenizer), added to the functions
    reward_weights: str | None = (
        None  # comma-separated weights, one per reward function then the reward model (None = all 1)
    )
    missing_eos_penalty: float = 0.0  # subtracted from the reward of completions cut at --max_new_tokens
    num_generations_eval: int = (
        0  # evaluation: pass@1 and pass@k of n samples per held-out prompt, by --eval_metric (0 = off)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warm_start_steps < 0 or self.max_prompt_length <= 0 or self.max_new_tokens <= 0:
            raise ValueError("--warm_start_steps must be >= 0, --max_prompt_length and --max_new_tokens > 0")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 for sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ValueError(f"--top_p must be in (0, 1] and --top_k >= 0, got {self.top_p} and {self.top_k}")
        if self.num_generations_eval < 0:
            raise ValueError(f"--num_generations_eval must be >= 0, got {self.num_generations_eval}")
        if self.reward_funcs is None and self.reward_model is None and self.needs_reward:
            raise ValueError("no reward: give --reward_funcs or --reward_model")


def _check_data_and_tracker_flags(config: TrainConfig) -> None:
    """The checks of the "real data and trackers" block of :class:`TrainConfig`."""
    if config.truncation not in ("drop", "keep_start", "keep_end"):
        raise ValueError(f"--truncation must be one of drop, keep_start, keep_end; got {config.truncation!r}")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise ValueError(f"--warmup_ratio must be in [0, 1), got {config.warmup_ratio}")
    if config.num_train_epochs is not None and config.num_train_epochs <= 0:
        raise ValueError(f"--num_train_epochs must be > 0 or none, got {config.num_train_epochs}")
    trackers = [name.strip() for name in config.report_to.split(",") if name.strip()]
    unknown = [name for name in trackers if name not in ("none", "tensorboard", "wandb", "trackio")]
    if unknown or not trackers or ("none" in trackers and len(trackers) > 1):
        raise ValueError(
            f"--report_to must be none or a comma-separated list of tensorboard, wandb, trackio; got {config.report_to!r}"
        )
    if config.formatting_func is not None and not re.fullmatch(r".+:\w+", config.formatting_func):
        raise ValueError(
            f"--formatting_func must be 'file.py:function' or 'package.module:function', got {config.formatting_func!r}"
        )


def parse_config(config_class: type[ConfigT], argv: list[str] | None = None) -> ConfigT:
    """Build ``config_class`` from defaults, an optional ``--config FILE`` and command-line flags.

    Args:
        config_class: a dataclass; each field becomes ``--<field name>``.
        argv: the arguments (without the program name); None reads ``sys.argv[1:]``.

    Returns:
        An instance of ``config_class``; its ``__post_init__`` checks run on the merged values.

    Raises:
        SystemExit (exit code 2, through argparse) for an unknown flag or a value of the wrong type, in one line
        (with the closest valid flags for an unknown one); ValueError for an unknown key in the config file.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    types_by_name = typing.get_type_hints(config_class)
    parser = _build_parser(config_class, fields, types_by_name)
    given = vars(parser.parse_args(argv))  # only the flags actually given (defaults are SUPPRESS)
    values: dict[str, Any] = {}
    config_file = given.pop("config", None)
    if config_file is not None:
        values.update(_read_config_file(config_file, fields, types_by_name))
    values.update(given)
    return config_class(**values)


def save_config(config: Any, output_dir: str | os.PathLike) -> Path:
    """Write the resolved config to OUTPUT_DIR/run_config.json (``--config`` reads it back); return the path."""
    path = Path(output_dir) / RUN_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# internals


# TRL's names for flags rlcore spells differently, suggested when a user types the TRL one.
_TRL_NAMES = {
    "--learning_rate": "--lr",
    "--per_device_train_batch_size": "--batch_size",
    "--per_device_eval_batch_size": "--eval_batch_size",
    "--gradient_accumulation_steps": "--grad_accum_steps",
    "--model_name_or_path": "--model",
    "--dataset_name": "--dataset",
    "--lr_scheduler_type": "--lr_schedule",
    "--max_completion_length": "--max_new_tokens",
    "--use_peft": "--lora_r",
    "--lora_target_modules": "--lora_targets",
    "--torch_dtype": "--dtype",
    "--dataset_train_split": "--train_split",
    "--dataset_test_split": "--eval_split",
}


def _closest_flags(unknown: list[str], flags: list[str]) -> list[str]:
    """Valid flags that look like the unknown ones: TRL's name for the same flag, then spelling neighbours."""
    close = [_TRL_NAMES[f] for f in unknown if _TRL_NAMES.get(f) in flags]
    close += [m for f in unknown if f not in _TRL_NAMES for m in difflib.get_close_matches(f, flags, n=3, cutoff=0.8)]
    return list(dict.fromkeys(close))


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: an unknown flag gets the closest valid flags as suggestions."""

    def error(self, message: str) -> typing.NoReturn:
        flags = sorted(a.option_strings[0] for a in self._actions if a.option_strings and a.dest != "help")
        unknown = re.findall(r"(?<!\S)--[\w-]+", message) if "unrecognized arguments" in message else []
        close = _closest_flags(unknown, flags)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        self.exit(2, f"{self.prog}: error: {message}{hint} (--help lists the valid flags)\n")


def _build_parser(config_class: type, fields: dict, types_by_name: dict) -> argparse.ArgumentParser:
    helps = _field_comments(config_class)
    parser = _Parser(
        prog=Path(sys.argv[0]).name or config_class.__name__,
        description=_own_docstring(config_class),
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="FILE", help="JSON or YAML file of field values; flags override it")
    for name, f in fields.items():
        annotation = types_by_name[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{helps.get(name, '')} (default: {default!r})".strip().replace("%", "%%")
        if _base_type(annotation) is bool:
            parser.add_argument(f"--{name}", nargs="?", const=True, type=_parse_bool, metavar="BOOL", help=help_text)
            parser.add_argument(f"--no-{name}", dest=name, action="store_false", help=argparse.SUPPRESS)
        else:
            parser.add_argument(
                f"--{name}",
                type=lambda text, a=annotation, n=name: _convert(text, a, n),
                nargs="?" if "flag_const" in f.metadata else None,
                const=f.metadata.get("flag_const"),
                metavar=_base_type(annotation).__name__.upper(),
                help=help_text,
            )
    return parser


def _read_config_file(path: str, fields: dict, types_by_name: dict) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml  # a transformers dependency; only needed for YAML configs

        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"--config {path}: not valid YAML ({str(error).splitlines()[0]})") from None
    else:
        try:
            loaded = json.loads(text)
        except ValueError as error:
            raise ValueError(f"--config {path}: not valid JSON ({error})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of field names to values, got {type(loaded).__name__}")
    unknown = sorted(set(loaded) - set(fields))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; valid fields: {sorted(fields)}")
    return {k: _check_value(v, types_by_name[k], k, path) for k, v in loaded.items()}


def _base_type(annotation: Any) -> type:
    """``int | None`` -> int; ``float`` -> float."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _is_optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _convert(text: str, annotation: Any, name: str) -> Any:
    if _is_optional(annotation) and text.lower() == "none":
        return None
    base = _base_type(annotation)
    try:
        return _parse_bool(text) if base is bool else base(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--{name} expects {base.__name__}, got {text!r}") from None


def _check_value(value: Any, annotation: Any, name: str, source: str) -> Any:
    """Type-check a value read from a config file (ints are accepted for float fields)."""
    if value is None and _is_optional(annotation):
        return None
    base = _base_type(annotation)
    if isinstance(value, str) and base is not str:
        try:
            return _convert(value, annotation, name)
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"{source}: {error}") from None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ValueError(f"{source}: field {name!r} expects {base.__name__}, got {value!r}")
    return value


def _own_docstring(config_class: type) -> str:
    """The class docstring, unless it is the signature dataclasses writes for classes without one."""
    doc = (config_class.__doc__ or "").strip()
    return "" if doc.startswith(f"{config_class.__name__}(") else doc


def _field_comments(config_class: type) -> dict[str, str]:
    """Trailing ``# comment`` of each field line in the class sources (subclass wins over base class)."""
    comments: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, flags=re.MULTILINE):
            comments[match.group(1)] = match.group(2).strip()
    return comments
