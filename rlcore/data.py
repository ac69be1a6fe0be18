"""Dataset rows -> token lists -> padded or packed tensors, for the row formats TRL users already have.

Formats (column names as TRL's; every text column may instead hold a list of ``{"role", "content"}``
messages, which makes the dataset *conversational*):

==========================  ============================  ==============================================
format                      columns                       used by
==========================  ============================  ==============================================
``language_modeling``       text  (or messages)           SFT / continued pre-training
``prompt_only``             prompt  (+ e.g. answer)       GRPO, RLOO, PPO, online DPO (rewards read extras)
``prompt_completion``       prompt, completion            SFT
``preference``              prompt, chosen, rejected      DPO, reward modelling (optional ``margin``)
``preference_implicit``     chosen, rejected              the same; the prompt is the common prefix
``unpaired_preference``     prompt, completion, label     KTO
==========================  ============================  ==============================================

Tokenisation conventions, the same in every function:
- A prompt and its completion are tokenised separately and concatenated, exactly as at generation time
  (the policy continues the prompt's tokens). A plain prompt gets the tokenizer's special tokens (a BOS if
  it has one); a plain completion gets none and ends with ``tokenizer.eos_token``.
- A conversational prompt is rendered with ``apply_chat_template(..., add_generation_prompt=True)``; its
  completion is what rendering the whole conversation adds after it, cut after the last end-of-turn token
  (``<|im_end|>`` for ChatML: the token a chat completion stops at; see ``rlcore.models.eos_token_ids``).
- ``completion_mask`` is 1 on the tokens a loss trains on: completion tokens including the end token that
  ends them (assistant turns of a ``messages`` conversation; every token of ``text``). Token 0 is never in
  it: nothing precedes it to predict it.
- Truncation, one policy for all (``--truncation``): ``"drop"`` (default) drops rows longer than
  ``max_length``; ``"keep_start"`` keeps their first ``max_length`` tokens: the prompt whole, the completion
  cut from the right (it then lacks its end token), a bare prompt (``tokenize_prompts``) cut from the right;
  ``"keep_end"`` keeps their last ``max_length`` tokens: the completion whole, the prompt cut from the left
  (TRL's ``keep_end``), a text row without prompt cut from the left, a bare prompt cut from the left (keeping
  the question and the generation prompt). A row that cannot keep one prompt token and one completion token is
  dropped either way. The number of affected rows (truncated, dropped) is printed once per call.
- Unknown tokens: every tokenising function counts the tokenizer's unknown token (``unk_token_id``) in what
  it produced; above ``UNKNOWN_TOKEN_WARNING_RATE`` of the tokens it warns once, naming the characters of the
  rows that the tokenizer maps to it (a byte-level tokenizer has none; a small vocabulary may silently turn
  every emoji or CJK character into ``<unk>``).

Options applied as rows are loaded (``load_rows``, ``load_checked_rows``): ``config_name`` (a hub dataset's
configuration, ``--dataset_config``), ``columns`` (renaming, ``--columns query=prompt,response=completion``)
and ``formatting_func`` (``--formatting_func file.py:fn``: a function of one row returning its text, a
``str``, or a dict of columns such as ``{"prompt": ..., "completion": ...}``), in that order.

Bad rows raise ``ValueError`` naming the row index and field: missing columns (with the formats that were
expected and the first row), missing (None) or empty values, non-string content, unknown chat roles.
"""

import importlib
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import jinja2
import torch

from rlcore.models import eos_token_ids

CHAT_ROLES = ("system", "user", "assistant")
FORMAT_COLUMNS = {
    "language_modeling": ("text",),  # or ("messages",)
    "prompt_only": ("prompt",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "preference_implicit": ("chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# the formats each kind of recipe takes
SFT_FORMATS = ("language_modeling", "prompt_completion")
PREFERENCE_FORMATS = ("preference", "preference_implicit")
PROMPT_FORMATS = ("prompt_only", "prompt_completion", "preference", "unpaired_preference")  # rows with a prompt
TRUNCATION_POLICIES = ("drop", "keep_start", "keep_end")
UNKNOWN_TOKEN_WARNING_RATE = 0.001  # warn when more than this fraction of the tokens is the unknown token


# ----------------------------------------------------------------------------------------------------
# Functions named on the command line
# ----------------------------------------------------------------------------------------------------


def load_function(spec: str, what: str = "function") -> tuple[str, Callable]:
    """``(name, function)`` of ``"package.module:function"`` (imported) or ``"path/to/file.py:function"``
    (loaded from that file); ``what`` names the flag in the one-line ``ValueError`` for a bad spec."""
    spec = spec.strip()
    location, colon, attribute = spec.rpartition(":")
    if not colon or not location or not attribute:
        raise ValueError(f"{what} {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    if location.endswith(".py"):
        if not os.path.isfile(location):
            raise ValueError(f"{what} {spec!r}: file {location!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"rlcore_user_{attribute}", location)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise ValueError(f"{what} {spec!r}: cannot import {location!r} ({error})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"{what} {spec!r}: {location!r} has no callable {attribute!r}")
    return attribute, function


# ----------------------------------------------------------------------------------------------------
# Loading and format detection
# ----------------------------------------------------------------------------------------------------


def load_rows(
    source: str,
    split: str = "train",
    n: int | None = None,
    *,
    config_name: str | None = None,
    columns: str | dict[str, str] | None = None,
    formatting_func: str | Callable | None = None,
    **load_kwargs,
) -> datasets.Dataset:
    """Rows from the toy task, a local file or directory, or the hub.

    Args:
        source: ``"toy"`` (the toy task as prompt_completion) or ``"toy:<kind>"`` (a ``rlcore.toy.TOY_KINDS``
            kind); a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file (one split: ``split`` is ignored);
            a directory written by ``save_to_disk`` or holding data files; else a hub dataset name.
        split: the split to read ("train", "test", or a slice such as ``"train[:1000]"``).
        n: keep at most the first ``n`` rows.
        config_name: the configuration of a hub dataset (or of a local dataset directory whose README.md
            declares ``configs``), e.g. ``"main"``; not for a file or the toy task.
        columns: renaming applied to the loaded rows, ``{"query": "prompt"}`` or ``"query=prompt,..."``.
        formatting_func: a function of one row (or its ``load_function`` spec) returning the row's text (the
            rows become language_modeling ``text``) or a dict of columns (merged into the row).
        load_kwargs: passed to ``datasets.load_dataset`` (e.g.
            ``features=datasets.Features({"prompt": datasets.Value("string"), ...})`` for a CSV file whose
            answers are numbers, as CSV columns are type-inferred).
    """
    name = _split_name(split)
    if config_name is not None and (is_toy_source(source) or os.path.isfile(source) or _is_saved_dataset(source)):
        raise ValueError(
            f"--dataset_config {config_name!r}: {source!r} has no configurations (only a hub dataset or a dataset "
            "directory with a README.md that declares configs has)"
        )
    if is_toy_source(source):
        from rlcore.toy import toy_dataset  # the name "toy:<kind>" asks for the embedded default

        rows = toy_dataset(source.partition(":")[2] or "prompt_completion", split=name, n=n if split == name else None)
        rows = _take_slice(rows, split) if split != name else rows
    else:
        rows = _load_source(source, split, name, config_name, **load_kwargs)
    rows = rows if n is None else rows.select(range(min(n, len(rows))))
    return format_rows(rename_columns(rows, columns), formatting_func)


def parse_column_mapping(columns: str | dict[str, str] | None) -> dict[str, str]:
    """``"query=prompt,response=completion"`` -> ``{"query": "prompt", "response": "completion"}``."""
    if columns is None or isinstance(columns, dict):
        return dict(columns or {})
    mapping = {}
    for item in columns.split(","):
        old, equals, new = (part.strip() for part in item.partition("="))
        if not equals or not old or not new or not re.fullmatch(r"[\w.-]+", old + new):
            raise ValueError(f"--columns {columns!r}: expected OLD=NEW pairs separated by commas, got {item!r}")
        mapping[old] = new
    return mapping


def rename_columns(rows: datasets.Dataset, columns: str | dict[str, str] | None) -> datasets.Dataset:
    """The rows with columns renamed (``--columns``); a missing source column or a clash is one ``ValueError``.

    A target that already exists is replaced when it is renamed too (``a=b,b=a`` swaps), else it is an error:
    a ``question``/``chosen``/``rejected`` file needs ``--columns question=prompt`` to keep its question.
    """
    mapping = parse_column_mapping(columns)
    if not mapping:
        return rows
    missing = [old for old in mapping if old not in rows.column_names]
    if missing:
        raise ValueError(f"--columns: no column {missing} in the rows (columns: {rows.column_names})")
    kept = [name for name in rows.column_names if name not in mapping]
    clashes = [new for new in mapping.values() if new in kept]
    if clashes or len(set(mapping.values())) != len(mapping):
        raise ValueError(f"--columns {mapping}: target column(s) {clashes or list(mapping.values())} already exist")
    return rows.rename_columns(mapping)


def format_rows(rows: datasets.Dataset, formatting_func: str | Callable | None) -> datasets.Dataset:
    """The rows mapped by a TRL-style ``formatting_func`` (a function of one row, or its spec).

    It returns a ``str`` for every row (the result is a language_modeling dataset of one ``text`` column) or a
    dict for every row (its keys are added to the row, replacing columns of the same name, e.g. ``prompt`` and
    ``completion``). A function that raises or returns something else is one ``ValueError`` naming the row.
    """
    if formatting_func is None:
        return rows
    name, function = (
        load_function(formatting_func, "--formatting_func")
        if isinstance(formatting_func, str)
        else (getattr(formatting_func, "__name__", "formatting_func"), formatting_func)
    )
    outputs = []
    for index, row in enumerate(rows):
        try:
            output = function(row)
        except Exception as error:
            raise ValueError(
                f"formatting function {name!r} failed on row {index}: {type(error).__name__}: {error}"
            ) from error
        if not isinstance(output, (str, dict)) or (outputs and isinstance(output, str) != isinstance(outputs[0], str)):
            raise ValueError(
                f"formatting function {name!r} returned {type(output).__name__} for row {index}: expected a str for "
                "every row (its text) or a dict for every row (its columns)"
            )
        outputs.append(output)
    if outputs and isinstance(outputs[0], str):
        return datasets.Dataset.from_dict({"text": outputs})
    merged = [{**row, **output} for row, output in zip(rows, outputs)]
    return datasets.Dataset.from_list(merged)


def is_single_split(source: str) -> bool:
    """Whether ``source`` holds one split only: a data file, or a ``Dataset.save_to_disk`` directory."""
    return os.path.isfile(source) or (_is_saved_dataset(source) and not _is_saved_dataset_dict(source))


def _load_source(source: str, split: str, name: str, config_name: str | None, **load_kwargs) -> datasets.Dataset:
    """A local file, a ``save_to_disk`` directory, a directory of data files or a hub dataset (split ``name``,
    sliced as ``split`` says; ``datasets.load_dataset`` slices by itself), of configuration ``config_name``."""
    extension = os.path.splitext(source)[1].lower()
    if not os.path.exists(source) and (extension in FILE_BUILDERS or source.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"dataset {source!r}: no such file or directory")
    if is_single_split(source) and name != "train":
        raise ValueError(f"dataset {source!r} holds one split, 'train' (its rows); there is no {name!r} split")
    if os.path.isfile(source):
        if extension not in FILE_BUILDERS:
            raise ValueError(f"cannot read {source!r}: expected a file ending in {', '.join(FILE_BUILDERS)}")
        with open(source, "rb") as f:
            empty = not f.read(4096).strip()
        if empty:
            raise ValueError(f"dataset {source!r} is empty (no rows)")
        try:
            rows = datasets.load_dataset(FILE_BUILDERS[extension], data_files=source, split="train", **load_kwargs)
        except Exception as error:  # datasets wraps a parse error in DatasetGenerationError without the line
            if FILE_BUILDERS[extension] == "json":
                _check_json_file(source)
            raise ValueError(f"dataset {source!r} could not be read: {type(error).__name__}: {error}") from error
        return _take_slice(rows, split) if split != name else rows
    if _is_saved_dataset(source):
        rows = datasets.load_from_disk(source)
        if isinstance(rows, datasets.DatasetDict):
            if name not in rows:
                raise ValueError(f"dataset {source!r} has no {name!r} split; it has {list(rows)}")
            rows = rows[name]
        return _take_slice(rows, split) if split != name else rows
    try:  # a directory of data files, or a hub name
        return datasets.load_dataset(source, config_name, split=split, **load_kwargs)
    except ValueError as error:
        if config_name is not None and "config" in str(error).lower():
            raise ValueError(f"--dataset_config {config_name!r} of {source!r}: {error}") from None
        raise


def _check_json_file(path: str) -> None:
    """Raise a ValueError naming the file and the first line that is not JSON (a JSON document or JSON lines)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        json.loads(text)
        return
    except ValueError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            if line.strip():
                json.loads(line)
        except ValueError as error:
            raise ValueError(f"dataset {path!r}, line {number}: not valid JSON ({error.msg}): {line[:80]!r}") from None


_SLICE = re.compile(r"^(\w+)\[(-?\d*)(%?):(-?\d*)(%?)\]$")


def _split_name(split: str) -> str:
    """``"train[:100]"`` -> ``"train"``."""
    return split.split("[", 1)[0]


def _take_slice(rows: datasets.Dataset, split: str) -> datasets.Dataset:
    """The rows of a sliced split as ``datasets`` reads it: ``name[a:b]`` in rows, or ``name[a%:b%]``."""
    match = _SLICE.match(split)
    if match is None:
        raise ValueError(f"split {split!r}: expected NAME, NAME[a:b] or NAME[a%:b%]")
    start, start_pct, stop, stop_pct = match.group(2), match.group(3), match.group(4), match.group(5)

    def bound(text: str, percent: str) -> int | None:
        if not text:
            return None
        return round(int(text) * len(rows) / 100) if percent else int(text)

    return rows.select(range(len(rows))[slice(bound(start, start_pct), bound(stop, stop_pct))])


def load_checked_rows(
    source: str, split: str, n: int | None, accepted: tuple[str, ...], flag: str = "--dataset", **options
) -> datasets.Dataset:
    """:func:`load_rows` (``options``: its ``config_name``, ``columns``, ``formatting_func``), then a one-line
    ``ValueError`` naming the flag unless the rows have an ``accepted`` format: recipes call it before any
    training or warm start, so bad data is reported at once."""
    try:
        rows = load_rows(source, split, n, **options)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None
    _require_format(rows, f"{flag} {source} ({split} split)", accepted)
    return rows


def load_eval_rows(
    dataset: str, eval_dataset: str | None, eval_split: str, n: int | None, accepted: tuple[str, ...], **options
) -> datasets.Dataset | None:
    """The held-out rows of a run, or None (and a printed reason): never the training rows in disguise.

    ``eval_split == "none"``: no evaluation. ``eval_dataset`` given: its ``eval_split``, or all its rows when
    it is a single file. Otherwise ``dataset``'s ``eval_split`` when it has one; a single file has only
    training rows, so then nothing is evaluated and the message says how to give held-out rows. ``options``
    (:func:`load_rows`' ``config_name``, ``columns``, ``formatting_func``) apply to ``dataset``; an
    ``eval_dataset`` gets ``columns`` and ``formatting_func`` only.
    """
    if eval_split == "none":
        return None
    if eval_dataset is not None:  # a single file's rows are its "train" split; any other source must have the split
        split = "train" + eval_split[len(_split_name(eval_split)) :] if is_single_split(eval_dataset) else eval_split
        options = {key: value for key, value in options.items() if key != "config_name"}
        return load_checked_rows(eval_dataset, split, n, accepted, flag="--eval_dataset", **options)
    if not has_split(dataset, eval_split, options.get("config_name")):
        print(
            f"no evaluation: {dataset} has no {eval_split!r} split (a single file holds training rows only); "
            "pass --eval_dataset FILE for held-out rows"
        )
        return None
    return load_checked_rows(dataset, eval_split, n, accepted, **options)


def is_toy_source(source: str) -> bool:
    """Whether ``source`` names the toy task (``"toy"`` or ``"toy:<kind>"``)."""
    return source == "toy" or source.startswith("toy:")


def has_split(source: str, split: str, config_name: str | None = None) -> bool:
    """Whether ``load_rows(source, split)`` can read ``split`` without falling back to other rows.

    A single data file holds one split (its rows are the ``"train"`` split), so any other split of a file
    does not exist; the toy task has ``train`` and ``test``; a directory or hub dataset is asked.
    """
    name = _split_name(split)
    if is_toy_source(source):
        return name in ("train", "test")
    if is_single_split(source):
        return name == "train"  # one split: its rows
    if _is_saved_dataset(source):
        return name in datasets.load_from_disk(source)
    try:
        return name in datasets.get_dataset_split_names(source, config_name)
    except Exception:  # noqa: BLE001 - an unreadable source fails with its own error when loaded
        return True


def _is_saved_dataset_dict(directory: str) -> bool:
    """Whether ``directory`` was written by ``DatasetDict.save_to_disk`` (several splits)."""
    return os.path.isfile(os.path.join(directory, "dataset_dict.json"))


def _is_saved_dataset(directory: str) -> bool:
    """Whether ``directory`` was written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return any(os.path.isfile(os.path.join(directory, name)) for name in ("state.json", "dataset_dict.json"))


def _describe_formats(formats) -> str:
    return "; ".join(f"{name} ({', '.join(FORMAT_COLUMNS[name])})" for name in formats)


def _format_error(dataset: datasets.Dataset, problem: str, expected_formats) -> ValueError:
    first_row = f"first offending row 0: {dataset[0]!r}" if len(dataset) else "the dataset has no rows"
    return ValueError(
        f"{problem}: found columns {dataset.column_names}; expected one of: {_describe_formats(expected_formats)}"
        f" (language_modeling may use 'messages' instead of 'text'); {first_row}"
    )


def detect_format(dataset: datasets.Dataset) -> str:
    """The row format of ``dataset`` from its column names (see the module table); ``ValueError`` if none."""
    columns = set(dataset.column_names)
    if {"chosen", "rejected"} <= columns:
        return "preference" if "prompt" in columns else "preference_implicit"
    if {"prompt", "completion", "label"} <= columns:
        return "unpaired_preference"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "prompt" in columns:
        return "prompt_only"
    if "text" in columns or "messages" in columns:
        return "language_modeling"
    raise _format_error(dataset, "unknown dataset format", FORMAT_COLUMNS)


def is_conversational(dataset: datasets.Dataset) -> bool:
    """Whether the rows hold message lists (judged on row 0; every row is then checked when tokenised)."""
    if len(dataset) == 0:
        return False
    first_row = dataset[0]
    return any(  # a list of message dicts; a list of anything else is a wrong type, named when the row is checked
        isinstance(value, list) and bool(value) and isinstance(value[0], dict)
        for value in (first_row.get(c) for c in ("messages", "prompt", "completion", "chosen", "rejected"))
    )


def _require_format(dataset: datasets.Dataset, function_name: str, accepted: tuple[str, ...]) -> str:
    if len(dataset) == 0:
        raise ValueError(f"{function_name}: the dataset has no rows")
    try:
        found = detect_format(dataset)
    except ValueError as error:
        raise _format_error(dataset, f"{function_name}: missing columns", accepted) from error
    if found not in accepted:
        raise _format_error(dataset, f"{function_name}: got a {found} dataset", accepted)
    return found


# ----------------------------------------------------------------------------------------------------
# Row validation
# ----------------------------------------------------------------------------------------------------


def _check_text(value, row: int, field: str) -> str:
    if value is None:
        raise ValueError(f"row {row}: field {field!r} is missing (None)")
    if not isinstance(value, str):
        hint = (
            " (a CSV column of numbers is read as numbers: pass features= to load_rows to read it as text)"
            if isinstance(value, (int, float))
            else ""
        )
        raise ValueError(f"row {row}: field {field!r} must be a string, got {type(value).__name__}: {value!r}{hint}")
    if not value:
        raise ValueError(f"row {row}: field {field!r} is empty")
    return value


def _check_messages(value, row: int, field: str, allowed_roles: tuple[str, ...]) -> list[dict]:
    if value is None:
        raise ValueError(f"row {row}: field {field!r} is missing (None)")
    if not isinstance(value, list):
        raise ValueError(
            f"row {row}: field {field!r} must be a list of messages (the dataset is conversational), got {type(value).__name__}: {value!r}"
        )
    if not value:
        raise ValueError(f"row {row}: field {field!r} is empty")
    for index, message in enumerate(value):
        where = f"row {row}: field {field!r}, message {index}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where} must be a dict with 'role' and 'content', got {message!r}")
        if message["role"] not in allowed_roles:
            raise ValueError(
                f"{where}: role {message['role']!r} is not one the chat template knows; allowed roles: {', '.join(allowed_roles)}"
            )
        if not isinstance(message["content"], str):
            raise ValueError(
                f"{where}: content must be a string, got {type(message['content']).__name__}: {message['content']!r}"
            )
    if field != "prompt" and not any(message["content"] for message in value):
        raise ValueError(f"row {row}: field {field!r} is empty (no message has content)")
    return value


def _check_field(value, row: int, field: str, conversational: bool, allowed_roles: tuple[str, ...]):
    if conversational:
        return _check_messages(value, row, field, allowed_roles)
    return _check_text(value, row, field)


# ----------------------------------------------------------------------------------------------------
# Token lists for prompts and completions
# ----------------------------------------------------------------------------------------------------


def _render(tokenizer, conversations: list[list[dict]], rows, add_generation_prompt: bool = False) -> list[list[int]]:
    """Token ids of each conversation as ``apply_chat_template`` gives them, rendered and tokenised in batches.

    (``apply_chat_template(tokenize=True)`` renders the text, then tokenises it without special tokens;
    the two steps are done here over the whole list at once, which is several times faster than per row.)
    """
    if not conversations:
        return []
    try:
        texts = tokenizer.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError:
        for conversation, row in zip(conversations, rows):  # find the row to name in the error
            try:
                tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
            except jinja2.TemplateError as error:
                raise ValueError(f"row {row}: the chat template rejected the messages: {error}") from error
        raise
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _cut_after_last_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    """Drop what the chat template writes after a turn's end token (e.g. ChatML's newline)."""
    stops = [index for index, token_id in enumerate(ids) if token_id in stop_ids]
    return ids[: stops[-1] + 1] if stops else ids


def _chat_completions(
    tokenizer, prompts: list[list[dict]], completions: list[list[dict]], stop_ids: set[int]
) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids) per conversational row; completion_ids end with the end-of-turn token."""
    rows = range(len(prompts))
    all_prompt_ids = _render(tokenizer, prompts, rows, add_generation_prompt=True)
    all_full_ids = _render(tokenizer, [prompt + completion for prompt, completion in zip(prompts, completions)], rows)
    pairs = []
    for row, (prompt_ids, full_ids) in enumerate(zip(all_prompt_ids, all_full_ids)):
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                f"row {row}: the chat template does not render the prompt with a generation prompt as a prefix of the full conversation"
            )
        pairs.append((prompt_ids, _cut_after_last_stop(full_ids[len(prompt_ids) :], stop_ids)))
    return pairs


def chat_pair_ids(tokenizer, prompts: list[list[dict]], completions: list[list[dict]]) -> list[list[int]]:
    """Token ids of each conversational prompt + completion, rendered with ``tokenizer``'s chat template as
    the tokenising functions render them: the prompt with its generation prompt, then the completion up to
    and including its end-of-turn token (what a reward model trained on such rows has seen)."""
    pairs = _chat_completions(tokenizer, prompts, completions, set(eos_token_ids(tokenizer)))
    return [prompt_ids + completion_ids for prompt_ids, completion_ids in pairs]


def _plain_completions(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of plain completions, each followed by the EOS id."""
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _plain_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def _chat_turn_masks(
    tokenizer, conversations: list[list[dict]], stop_ids: set[int]
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, mask) per conversation; mask is 1 on each assistant reply and its end-of-turn token.

    Reply i spans from the end of ``messages[:i]`` rendered with a generation prompt to the end of
    ``messages[:i + 1]``, cut after its last end-of-turn token.
    """
    all_ids = _render(tokenizer, conversations, range(len(conversations)))
    turns = [
        (row, index)
        for row, messages in enumerate(conversations)
        for index, message in enumerate(messages)
        if message["role"] == "assistant"
    ]
    turn_rows = [row for row, _ in turns]
    befores = _render(
        tokenizer, [conversations[row][:index] for row, index in turns], turn_rows, add_generation_prompt=True
    )
    throughs = _render(tokenizer, [conversations[row][: index + 1] for row, index in turns], turn_rows)
    masks = [[0] * len(ids) for ids in all_ids]
    for (row, index), before, through in zip(turns, befores, throughs):
        if all_ids[row][: len(through)] != through or through[: len(before)] != before:
            raise ValueError(
                f"row {row}: the chat template does not render message {index} as a prefix of the whole conversation"
            )
        reply = _cut_after_last_stop(through[len(before) :], stop_ids)
        masks[row][len(before) : len(before) + len(reply)] = [1] * len(reply)
    return list(zip(all_ids, masks))


def _check_truncation(truncation: str, max_length: int | None) -> None:
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be None or an int >= 2, got {max_length!r}")


def _too_long(prompt_ids: list[int], completion_ids: list[int], max_length: int | None) -> bool:
    return max_length is not None and len(prompt_ids) + len(completion_ids) > max_length


def _fit_row(
    prompt_ids: list[int], responses: list[list[int]], max_length: int | None, truncation: str
) -> tuple[list[int], list[list[int]]] | None:
    """(prompt_ids, responses) cut to fit ``max_length`` under the truncation policy, or None to drop the row.

    keep_start cuts each response from the right after the whole prompt; keep_end cuts the prompt from the
    left to make room for the longest whole response (a row without prompt keeps its response's end).
    """
    if not any(_too_long(prompt_ids, response, max_length) for response in responses):
        return prompt_ids, responses
    if truncation == "keep_start":
        room = max_length - len(prompt_ids)
        return (prompt_ids, [response[:room] for response in responses]) if room > 0 else None
    if truncation == "keep_end":
        if not prompt_ids:
            return [], [response[-max_length:] for response in responses]
        room = max_length - max(len(response) for response in responses)
        return (prompt_ids[-room:], responses) if room > 0 else None
    return None


def _report(
    function_name: str, affected: int, dropped: int, total: int, max_length: int | None, truncation: str
) -> None:
    if affected:
        print(
            f"{function_name}: {affected} of {total} rows longer than max_length={max_length} "
            f"(truncation={truncation!r}: {affected - dropped} truncated, {dropped} dropped)"
        )
    if dropped == total:
        raise ValueError(f"{function_name}: every row is longer than max_length={max_length}")


def _apply_max_length(
    function_name: str, rows, max_length: int | None, truncation: str
) -> tuple[list[int], list[list[int]], list[list[list[int]]]]:
    """``rows`` of (prompt_ids, [response_ids, ...]) -> (indices of the rows kept, their fitted prompts, their
    fitted responses), under the truncation policy; the number of rows that were too long is printed once."""
    kept, prompts, fitted_rows, affected = [], [], [], 0
    for index, (prompt_ids, responses) in enumerate(rows):
        affected += any(_too_long(prompt_ids, response, max_length) for response in responses)
        fitted = _fit_row(prompt_ids, responses, max_length, truncation)
        if fitted is not None:
            kept.append(index)
            prompts.append(fitted[0])
            fitted_rows.append(fitted[1])
    _report(function_name, affected, len(rows) - len(kept), len(rows), max_length, truncation)
    return kept, prompts, fitted_rows


def _warn_unknown_tokens(function_name: str, tokenizer, id_lists, dataset: datasets.Dataset) -> None:
    """Warn when more than ``UNKNOWN_TOKEN_WARNING_RATE`` of the tokens in ``id_lists`` are the unknown token,
    naming the characters of ``dataset``'s text that the tokenizer maps to it (from the first 1000 rows)."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    total = sum(len(ids) for ids in id_lists)
    if unknown is None or not total:
        return
    count = sum(ids.count(unknown) for ids in id_lists)
    if count <= UNKNOWN_TOKEN_WARNING_RATE * total:
        return
    characters = sorted({char for text in _row_texts(dataset.select(range(min(1000, len(dataset))))) for char in text})
    encoded = tokenizer(characters, add_special_tokens=False)["input_ids"] if characters else []
    culprits = [char for char, ids in zip(characters, encoded) if unknown in ids]
    warnings.warn(
        f"{function_name}: {count} of {total} tokens ({count / total:.1%}) are the unknown token "
        f"{tokenizer.unk_token!r}; the tokenizer has no token for these characters of the rows: "
        f"{''.join(culprits[:50])!r}{' ...' if len(culprits) > 50 else ''} (their text is lost in training)",
        stacklevel=3,
    )


def _row_texts(dataset: datasets.Dataset) -> list[str]:
    """Every string of the rows: text columns and the contents of message lists."""
    texts = []
    for row in dataset:
        for value in row.values():
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                texts += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return texts


# ----------------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------------


def tokenize_sft(
    dataset: datasets.Dataset,
    tokenizer,
    max_length: int | None = None,
    completion_only: bool = True,
    truncation: str = "drop",
    allowed_roles: tuple[str, ...] = CHAT_ROLES,
) -> datasets.Dataset:
    """Rows ``{"input_ids": list[int], "completion_mask": list[int]}`` for supervised fine-tuning.

    Takes language_modeling (``text``: every token trained; ``messages``: assistant turns trained) and
    prompt_completion data, plain or conversational. ``completion_only=False`` trains on every token,
    prompt included (still never token 0). Truncation as in the module docstring.
    """
    _check_truncation(truncation, max_length)
    found = _require_format(dataset, "tokenize_sft", ("language_modeling", "prompt_completion"))
    conversational = is_conversational(dataset)
    stop_ids = set(eos_token_ids(tokenizer))
    if found == "prompt_completion":
        pairs = _tokenize_pairs(dataset, tokenizer, "completion", conversational, allowed_roles, stop_ids)
        pieces = [(prompt_ids, completion_ids, [1] * len(completion_ids)) for prompt_ids, completion_ids in pairs]
    elif "messages" in dataset.column_names and conversational:  # the whole conversation, assistant turns masked
        conversations = [
            _check_messages(messages, index, "messages", allowed_roles)
            for index, messages in enumerate(dataset["messages"])
        ]
        pieces = [([], ids, mask) for ids, mask in _chat_turn_masks(tokenizer, conversations, stop_ids)]
    else:  # plain text, every token trained
        texts = [_check_text(text, index, "text") for index, text in enumerate(dataset["text"])]
        pieces = [([], ids, [1] * len(ids)) for ids in _plain_completions(tokenizer, texts)]

    _warn_unknown_tokens("tokenize_sft", tokenizer, [p + c for p, c, _ in pieces], dataset)
    kept, prompts, fitted_rows = _apply_max_length(
        "tokenize_sft", [(prompt_ids, [ids]) for prompt_ids, ids, _ in pieces], max_length, truncation
    )
    input_ids, completion_masks = [], []
    for index, prompt_ids, (completion_ids,) in zip(kept, prompts, fitted_rows):
        mask = pieces[index][2]
        mask = mask[len(mask) - len(completion_ids) :] if truncation == "keep_end" else mask[: len(completion_ids)]
        loss_mask = [0] * len(prompt_ids) + mask if completion_only else [1] * (len(prompt_ids) + len(completion_ids))
        input_ids.append(prompt_ids + completion_ids)
        completion_masks.append([0] + loss_mask[1:])  # token 0 is never predicted
    return datasets.Dataset.from_dict({"input_ids": input_ids, "completion_mask": completion_masks})


def _tokenize_pairs(
    dataset, tokenizer, field: str, conversational: bool, allowed_roles, stop_ids
) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids) per row, for the ``field`` column answering the ``prompt`` column."""
    prompts = [
        _check_field(prompt, index, "prompt", conversational, allowed_roles)
        for index, prompt in enumerate(dataset["prompt"])
    ]
    completions = [
        _check_field(value, index, field, conversational, allowed_roles) for index, value in enumerate(dataset[field])
    ]
    if conversational:
        return _chat_completions(tokenizer, prompts, completions, stop_ids)
    return list(zip(_plain_prompts(tokenizer, prompts), _plain_completions(tokenizer, completions)))


def _common_prefix_length(first: list, second: list) -> int:
    length = 0
    while length < min(len(first), len(second)) and first[length] == second[length]:
        length += 1
    return length


def _implicit_prompts(dataset, tokenizer, conversational: bool, allowed_roles, stop_ids):
    """(prompt_ids, chosen_ids, rejected_ids) per row, the prompt being the common prefix of the pair.

    Plain rows: the longest common prefix of the token ids of ``chosen + EOS`` and ``rejected + EOS``
    (it may end inside the answer, e.g. "37+85=12" for "122" vs "121": the shared tokens cancel in
    every pairwise loss). Conversational rows: the longest common prefix of the two message lists.
    """
    chosen = [
        _check_field(value, index, "chosen", conversational, allowed_roles)
        for index, value in enumerate(dataset["chosen"])
    ]
    rejected = [
        _check_field(value, index, "rejected", conversational, allowed_roles)
        for index, value in enumerate(dataset["rejected"])
    ]
    identical = next((index for index, pair in enumerate(zip(chosen, rejected)) if pair[0] == pair[1]), None)
    if identical is not None:
        raise ValueError(f"row {identical}: chosen and rejected are identical: {chosen[identical]!r}")
    if conversational:
        shared = [_common_prefix_length(good, bad) for good, bad in zip(chosen, rejected)]
        prompts = [good[:length] for good, length in zip(chosen, shared)]
        chosen_pairs = _chat_completions(
            tokenizer, prompts, [good[length:] for good, length in zip(chosen, shared)], stop_ids
        )
        rejected_pairs = _chat_completions(
            tokenizer, prompts, [bad[length:] for bad, length in zip(rejected, shared)], stop_ids
        )
        return [
            (prompt_ids, chosen_ids, rejected_ids)
            for (prompt_ids, chosen_ids), (_, rejected_ids) in zip(chosen_pairs, rejected_pairs)
        ]
    triples = []
    for chosen_full, rejected_full in zip(
        _plain_completions(tokenizer, chosen), _plain_completions(tokenizer, rejected)
    ):
        shared = _common_prefix_length(chosen_full, rejected_full)
        triples.append((chosen_full[:shared], chosen_full[shared:], rejected_full[shared:]))
    return triples


def tokenize_preference(
    dataset: datasets.Dataset,
    tokenizer,
    max_length: int | None = None,
    truncation: str = "drop",
    allowed_roles: tuple[str, ...] = CHAT_ROLES,
) -> datasets.Dataset:
    """Rows ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (+ ``"margin"`` when the dataset has one).

    Takes preference (explicit prompt) and preference_implicit data, plain or conversational. Both
    responses end with their end token. ``max_length`` bounds prompt + response for each response.
    """
    _check_truncation(truncation, max_length)
    found = _require_format(dataset, "tokenize_preference", ("preference", "preference_implicit"))
    conversational = is_conversational(dataset)
    stop_ids = set(eos_token_ids(tokenizer))
    if found == "preference_implicit":
        triples = _implicit_prompts(dataset, tokenizer, conversational, allowed_roles, stop_ids)
    else:
        chosen = _tokenize_pairs(dataset, tokenizer, "chosen", conversational, allowed_roles, stop_ids)
        rejected = _tokenize_pairs(dataset, tokenizer, "rejected", conversational, allowed_roles, stop_ids)
        triples = [
            (prompt_ids, chosen_ids, rejected_ids)
            for (prompt_ids, chosen_ids), (_, rejected_ids) in zip(chosen, rejected)
        ]

    rows = [(prompt_ids, [chosen_ids, rejected_ids]) for prompt_ids, chosen_ids, rejected_ids in triples]
    _warn_unknown_tokens("tokenize_preference", tokenizer, [p + c + r for p, c, r in triples], dataset)
    kept, prompts, fitted_rows = _apply_max_length("tokenize_preference", rows, max_length, truncation)
    columns = {
        "prompt_ids": prompts,
        "chosen_ids": [chosen_ids for chosen_ids, _ in fitted_rows],
        "rejected_ids": [rejected_ids for _, rejected_ids in fitted_rows],
    }
    if "margin" in dataset.column_names:
        margins = list(dataset["margin"])
        columns["margin"] = [float(margins[index]) for index in kept]
    return datasets.Dataset.from_dict(columns)


def tokenize_unpaired(
    dataset: datasets.Dataset,
    tokenizer,
    max_length: int | None = None,
    truncation: str = "drop",
    allowed_roles: tuple[str, ...] = CHAT_ROLES,
) -> datasets.Dataset:
    """Rows ``{"prompt_ids", "completion_ids", "label"}`` from unpaired_preference data (label: bool,
    True for a desirable completion). Completions end with their end token."""
    _check_truncation(truncation, max_length)
    _require_format(dataset, "tokenize_unpaired", ("unpaired_preference",))
    labels = list(dataset["label"])
    for index, label in enumerate(labels):
        if not isinstance(label, bool):
            raise ValueError(f"row {index}: field 'label' must be a bool, got {type(label).__name__}: {label!r}")
    conversational = is_conversational(dataset)
    pairs = _tokenize_pairs(
        dataset, tokenizer, "completion", conversational, allowed_roles, set(eos_token_ids(tokenizer))
    )
    _warn_unknown_tokens("tokenize_unpaired", tokenizer, [p + c for p, c in pairs], dataset)
    kept, prompts, fitted_rows = _apply_max_length(
        "tokenize_unpaired", [(prompt_ids, [ids]) for prompt_ids, ids in pairs], max_length, truncation
    )
    return datasets.Dataset.from_dict(
        {
            "prompt_ids": prompts,
            "completion_ids": [completion_ids for (completion_ids,) in fitted_rows],
            "label": [labels[index] for index in kept],
        }
    )


def tokenize_prompts(
    dataset: datasets.Dataset,
    tokenizer,
    max_length: int | None = None,
    truncation: str = "drop",
    allowed_roles: tuple[str, ...] = CHAT_ROLES,
) -> datasets.Dataset:
    """The dataset with a ``prompt_ids`` column added; every other column is kept (reward functions
    receive them, e.g. ``answer``). Takes any format with a ``prompt`` column.

    A conversational prompt gets the generation prompt. ``truncation="keep_end"`` keeps the last
    ``max_length`` prompt tokens (the question and the generation prompt), ``"keep_start"`` the first.
    """
    _check_truncation(truncation, max_length)
    if "prompt" not in dataset.column_names or len(dataset) == 0:
        raise _format_error(dataset, "tokenize_prompts: missing column 'prompt'", ("prompt_only",))
    conversational = is_conversational(dataset)
    prompts = [
        _check_field(prompt, index, "prompt", conversational, allowed_roles)
        for index, prompt in enumerate(dataset["prompt"])
    ]
    if conversational:
        all_ids = _render(tokenizer, prompts, range(len(prompts)), add_generation_prompt=True)
    else:
        all_ids = _plain_prompts(tokenizer, prompts)
    _warn_unknown_tokens("tokenize_prompts", tokenizer, all_ids, dataset)
    too_long = [index for index, ids in enumerate(all_ids) if max_length is not None and len(ids) > max_length]
    if truncation != "drop":
        cut = (lambda ids: ids[-max_length:]) if truncation == "keep_end" else (lambda ids: ids[:max_length])
        kept, prompt_ids = range(len(all_ids)), [ids if max_length is None else cut(ids) for ids in all_ids]
    else:
        kept = [index for index in range(len(all_ids)) if max_length is None or len(all_ids[index]) <= max_length]
        prompt_ids = [all_ids[index] for index in kept]
    _report("tokenize_prompts", len(too_long), len(all_ids) - len(kept), len(all_ids), max_length, truncation)
    return dataset.select(kept).add_column("prompt_ids", prompt_ids)


def load_prompts(source: str, split: str, tokenizer, max_prompt_length: int, n: int | None = None) -> datasets.Dataset:
    """Rows of ``source`` (:func:`load_rows`) with a ``prompt_ids`` column; over-long prompts dropped."""
    rows = load_rows(source, split=split, n=n)
    return tokenize_prompts(rows, tokenizer, max_length=max_prompt_length, truncation="drop")


@dataclass(frozen=True)
class PromptBatch:
    """P prompts of a :func:`load_prompts` dataset, collated for generation.

    Attributes:
        prompts: the ``prompt`` column (text or message lists), P entries.
        columns: every other column except ``prompt_ids`` (reward functions read them), P entries each.
        prompt_ids, prompt_mask: [P, Lp] left-padded ids and 1-on-real-token mask.
        conversational: whether the prompts are message lists.
    """

    prompts: list
    columns: dict[str, list]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    conversational: bool


def prompt_batch(dataset: datasets.Dataset, rows, pad_id: int) -> PromptBatch:
    """The prompts at ``rows`` of a :func:`load_prompts` dataset, collated for generation."""
    selected = dataset[list(rows)]  # {column: [P values]}
    columns = {name: values for name, values in selected.items() if name not in ("prompt", "prompt_ids")}
    tensors = collate_left(selected["prompt_ids"], pad_id)
    conversational = isinstance(selected["prompt"][0], list)
    return PromptBatch(selected["prompt"], columns, tensors["prompt_ids"], tensors["prompt_mask"], conversational)


def repeat_each(values: list, times: int) -> list:
    """``[a, b]`` -> ``[a, a, b, b]`` for ``times=2``: per-prompt values aligned with grouped completions."""
    return [value for value in values for _ in range(times)]


# ----------------------------------------------------------------------------------------------------
# Collation: lists of token lists -> padded tensors
# ----------------------------------------------------------------------------------------------------


def _padded(rows: list[list[int]], pad_value: int, left: bool = False) -> torch.Tensor:
    """[B, T] long tensor of ``rows`` padded to the longest with ``pad_value`` on the right (or left)."""
    length = max(len(row) for row in rows)
    padded = [
        [pad_value] * (length - len(row)) + list(row) if left else list(row) + [pad_value] * (length - len(row))
        for row in rows
    ]
    return torch.tensor(padded, dtype=torch.long)


def _check_batch(name: str, rows) -> None:
    if len(rows) == 0:
        raise ValueError(f"{name} is an empty batch")
    empty = [index for index, row in enumerate(rows) if len(row) == 0]
    if empty:
        raise ValueError(f"{name}[{empty[0]}] is empty")


def collate_right(seqs: list[list[int]], masks: list[list[int]] | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training batch.

    Args:
        seqs: B token lists (e.g. ``input_ids`` from ``tokenize_sft``).
        masks: B loss masks of the same lengths (e.g. ``completion_mask``), or None for all ones.
        pad_id: the id padding is filled with (it is never attended to nor trained on).

    Returns:
        ``input_ids`` [B, T], ``attention_mask`` [B, T] (1 on real tokens), ``completion_mask`` [B, T]
        (the given masks, 0 on padding); all long, T the longest row.
    """
    _check_batch("seqs", seqs)
    masks = [[1] * len(seq) for seq in seqs] if masks is None else masks
    if len(masks) != len(seqs) or any(len(mask) != len(seq) for seq, mask in zip(seqs, masks)):
        raise ValueError("masks must hold one mask per sequence, each as long as its sequence")
    return {
        "input_ids": _padded(seqs, pad_id),  # [B, T]
        "attention_mask": _padded([[1] * len(seq) for seq in seqs], 0),  # [B, T]
        "completion_mask": _padded(masks, 0),  # [B, T]
    }


def collate_left(prompt_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: ``prompt_ids`` [B, T] and ``prompt_mask`` [B, T] (1 on real tokens),
    so every prompt ends at the last column and generation appends to all rows at once."""
    _check_batch("prompt_ids", prompt_ids)
    return {
        "prompt_ids": _padded(prompt_ids, pad_id, left=True),  # [B, T]
        "prompt_mask": _padded([[1] * len(ids) for ids in prompt_ids], 0, left=True),  # [B, T]
    }


def collate_completions(
    prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """One right-padded [B, T] batch of prompt + completion rows (unpaired preference data, KTO's mismatched
    pairs): ``input_ids``, ``attention_mask`` and ``completion_mask`` (1 on the completion tokens)."""
    _check_batch("prompt_ids", prompt_ids)
    _check_batch("completion_ids", completion_ids)
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"batch sizes differ: {len(prompt_ids)} prompts, {len(completion_ids)} completions")
    seqs = [list(prompt) + list(completion) for prompt, completion in zip(prompt_ids, completion_ids)]
    masks = [[0] * len(prompt) + [1] * len(completion) for prompt, completion in zip(prompt_ids, completion_ids)]
    return collate_right(seqs, masks, pad_id)  # each [B, T]


def collate_preference(
    prompt_ids: list[list[int]], chosen_ids: list[list[int]], rejected_ids: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """One right-padded [2B, T] batch: rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected,
    so a single forward pass scores both (split the outputs with ``.chunk(2)``).

    Returns ``input_ids``, ``attention_mask`` and ``completion_mask`` (1 on response tokens), all [2B, T].
    """
    _check_batch("prompt_ids", prompt_ids)
    _check_batch("chosen_ids", chosen_ids)
    _check_batch("rejected_ids", rejected_ids)
    if not len(prompt_ids) == len(chosen_ids) == len(rejected_ids):
        raise ValueError(
            f"batch sizes differ: {len(prompt_ids)} prompts, {len(chosen_ids)} chosen, {len(rejected_ids)} rejected"
        )
    responses = list(chosen_ids) + list(rejected_ids)
    prompts = list(prompt_ids) * 2
    seqs = [list(prompt) + list(response) for prompt, response in zip(prompts, responses)]
    masks = [[0] * len(prompt) + [1] * len(response) for prompt, response in zip(prompts, responses)]
    return collate_right(seqs, masks, pad_id)  # each [2B, T]


def pack_sequences(rows, max_length: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pack tokenised rows into bins of ``max_length`` tokens (first-fit decreasing), without padding each row.

    Args:
        rows: sequence of ``{"input_ids": list[int], "completion_mask": list[int]}`` (e.g. ``tokenize_sft``'s
            output), each at most ``max_length`` long.
        max_length: tokens per bin; every bin is padded to it (fixed shapes).
        pad_id: the id the end of a bin is filled with.

    Returns (all [B, max_length] long tensors, B bins):
        ``input_ids``; ``position_ids`` restarting at 0 for each sample (and for the padding tail);
        ``completion_mask`` (0 on padding and on each sample's first token, which nothing in its own sample
        predicts); ``sample_index`` (the row each token comes from, -1 on padding: use it to sum
        per-sample log-probs).

    Where samples stay apart: call ``model(input_ids=..., position_ids=..., use_cache=False)`` with **no**
    ``attention_mask``. Then transformers 5 derives the sample boundaries from ``position_ids``:
    flash_attention_2 runs varlen attention, and sdpa/eager build a block-diagonal causal mask
    (``masking_utils.find_packed_sequence_indices``), so no token attends to another sample. With
    ``use_cache=True`` (the default of most configs, even in train mode) or with an attention mask,
    sdpa/eager attend across samples: the packed logits are then wrong.
    """
    lengths = [len(row["input_ids"]) for row in rows]
    if not lengths:
        raise ValueError("pack_sequences got no rows")
    for index, (row, length) in enumerate(zip(rows, lengths)):
        if length == 0 or length > max_length:
            raise ValueError(f"row {index} has {length} tokens; every row must have 1..max_length={max_length}")
        if len(row["completion_mask"]) != length:
            raise ValueError(
                f"row {index}: completion_mask has {len(row['completion_mask'])} entries for {length} tokens"
            )
    bins: list[list[int]] = []  # row indices per bin
    room: list[int] = []
    for index in sorted(range(len(rows)), key=lambda i: -lengths[i]):
        target = next((b for b, free in enumerate(room) if free >= lengths[index]), None)
        if target is None:
            bins.append([])
            room.append(max_length)
            target = len(bins) - 1
        bins[target].append(index)
        room[target] -= lengths[index]

    columns = {"input_ids": [], "position_ids": [], "completion_mask": [], "sample_index": []}
    for members, free in zip(bins, room):
        for name in columns:
            columns[name].append([])
        for index in members:
            columns["input_ids"][-1] += list(rows[index]["input_ids"])
            columns["position_ids"][-1] += list(range(lengths[index]))
            columns["completion_mask"][-1] += [0] + list(rows[index]["completion_mask"])[1:]
            columns["sample_index"][-1] += [index] * lengths[index]
        for name, fill in (
            ("input_ids", [pad_id] * free),
            ("position_ids", list(range(free))),
            ("completion_mask", [0] * free),
            ("sample_index", [-1] * free),
        ):
            columns[name][-1] += fill
    return {name: torch.tensor(values, dtype=torch.long) for name, values in columns.items()}  # each [B, max_length]
