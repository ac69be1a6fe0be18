"""The embedded default: a toy task with a checkable answer, a tiny tokenizer and a tiny model.

Every recipe runs with no arguments on a 2-core CPU with no network: it trains the tiny model on the toy
task and shows learning within minutes. The same recipes take a real model directory or hub id and real
datasets; nothing here is special-cased downstream.

**Task.** Integer addition: prompt ``"37+85="``, completion ``"122"``. Operands are drawn uniformly from
``0..max_operand`` (default 999). The test split is a fixed held-out set of ``TEST_SIZE`` (a, b) pairs that
depends only on ``max_operand``; the train split is drawn from the remaining pairs with ``seed``, so train
and test never share a pair. ``toy_dataset`` renders the problems in every row format the recipes take,
with TRL's column names.

**Tokenizer.** A real ``transformers.PreTrainedTokenizerFast`` built with the ``tokenizers`` library:
one token per character over ``"\\n"`` and printable ASCII (ids 5..100, so digits are single tokens),
anything else maps to ``<|unk|>``. Special tokens (ids 0..4)::

    <|pad|> = 0      padding
    <|endoftext|> = 1  eos: ends a plain (non-chat) completion
    <|im_start|> = 2   opens a chat turn
    <|im_end|> = 3     closes a chat turn: ends a chat (conversational) completion
    <|unk|> = 4        any character outside the vocabulary

No BOS token and no automatic special tokens: ``tokenizer("37+85=")`` is exactly one id per character.
The chat template is Qwen's ChatML without a default system prompt::

    <|im_start|>user\\n37+85=<|im_end|>\\n<|im_start|>assistant\\n122<|im_end|>\\n

with ``add_generation_prompt`` support and ``{% generation %}`` markers around each assistant reply and
its ``<|im_end|>``, so ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks exactly the
tokens a policy is trained to produce. Roles other than system/user/assistant raise an error.

**Model.** A ``LlamaForCausalLM`` (hidden 128, 4 layers, 4 query heads, 2 key/value heads, MLP 512, tied
embeddings, vocab 101, 256 positions, float32): 997,120 parameters, initialised from a seed. Llama rather
than Qwen2 because transformers 5's ``AutoTokenizer`` replaces the tokenizer class of any ``qwen2``
checkpoint with its byte-level ``Qwen2Tokenizer``, which would drop the spaces of a character-level
vocabulary; for ``llama`` it keeps the class saved in ``tokenizer_config.json``.
``tiny_model_dir()`` writes model and tokenizer once with ``save_pretrained`` and then reuses them;
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(path)`` load them offline.
"""

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# ----------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------

TEST_SIZE = 500  # held-out (a, b) pairs (fewer when max_operand is so small that this is over a fifth)
DEFAULT_TRAIN_SIZE = 10_000
TOY_KINDS = (
    "language_modeling",
    "prompt_completion",
    "conversational",
    "conversational_lm",
    "preference",
    "preference_implicit",
    "unpaired",
    "prompt_only",
    "conversational_prompt_only",
    "conversational_preference",
)


def _test_pair_indices(max_operand: int) -> list[int]:
    """The held-out pairs, as indices a * (max_operand + 1) + b, fixed for a given max_operand."""
    num_pairs = (max_operand + 1) ** 2
    size = min(TEST_SIZE, num_pairs // 5)
    rng = random.Random(f"rlcore-toy-test-{max_operand}")  # str seeds hash with sha512: stable everywhere
    return rng.sample(range(num_pairs), size)


def toy_problems(
    split: str = "train", n: int | None = None, seed: int = 0, max_operand: int = 999
) -> list[tuple[int, int]]:
    """Operand pairs (a, b) of the addition task, deterministic in (split, n, seed, max_operand).

    The test split is the same fixed set for every seed (its first ``n`` pairs when ``n`` is given); the
    train split is ``n`` distinct pairs (default ``DEFAULT_TRAIN_SIZE``, capped at the number available)
    drawn with ``seed`` from the pairs not in the test split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(max_operand, int) or max_operand < 1:
        raise ValueError(f"max_operand must be an int >= 1, got {max_operand!r}")
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be None or an int >= 0, got {n!r}")
    width = max_operand + 1
    test_indices = _test_pair_indices(max_operand)
    if split == "test":
        if n is not None and n > len(test_indices):
            raise ValueError(f"n={n} but the test split has {len(test_indices)} pairs for max_operand={max_operand}")
        chosen = test_indices[:n]
    else:
        available = width**2 - len(test_indices)
        if n is not None and n > available:
            raise ValueError(f"n={n} but only {available} distinct train pairs exist for max_operand={max_operand}")
        n = min(DEFAULT_TRAIN_SIZE, available) if n is None else n
        test_set = set(test_indices)
        drawn = random.Random(seed).sample(range(width**2), min(width**2, n + len(test_indices)))
        chosen = [index for index in drawn if index not in test_set][:n]
    return [divmod(index, width) for index in chosen]


def wrong_answers(a: int, b: int) -> list[int]:
    """Plausible wrong sums of a + b, sorted: off by 1, 10 or 100, one digit changed, a carry dropped.

    Every value is non-negative and differs from a + b.
    """
    total = a + b
    candidates = {total + delta for delta in (-100, -10, -1, 1, 10, 100)}
    digits = str(total)
    for position, digit in enumerate(digits):
        for replacement in "0123456789":
            if replacement != digit and not (position == 0 and replacement == "0" and len(digits) > 1):
                candidates.add(int(digits[:position] + replacement + digits[position + 1 :]))
    # Column-wise sum with every carry dropped (e.g. 37 + 85 -> 12 instead of 122).
    width = len(str(max(a, b)))
    a_digits, b_digits = str(a).zfill(width), str(b).zfill(width)
    no_carry = "".join(str((int(x) + int(y)) % 10) for x, y in zip(a_digits, b_digits))
    candidates.add(int(no_carry))
    return sorted(value for value in candidates if value >= 0 and value != total)


def _rejected_answer(a: int, b: int, rng: random.Random) -> str:
    """One wrong sum: half the time a near miss (off by 1, 10 or 100), else any of ``wrong_answers``."""
    total = a + b
    near_misses = [total + delta for delta in (-100, -10, -1, 1, 10, 100) if total + delta >= 0]
    pool = near_misses if rng.random() < 0.5 else wrong_answers(a, b)
    return str(rng.choice(pool))


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def _toy_row(kind: str, a: int, b: int, index: int, rng: random.Random) -> dict:
    prompt, answer = f"{a}+{b}=", str(a + b)
    if kind == "language_modeling":
        return {"text": prompt + answer}
    if kind == "prompt_completion":
        return {"prompt": prompt, "completion": answer}
    if kind == "conversational":
        return {"prompt": _user(prompt), "completion": _assistant(answer)}
    if kind == "conversational_lm":
        return {"messages": _user(prompt) + _assistant(answer)}
    if kind == "prompt_only":
        return {"prompt": prompt, "answer": answer}
    if kind == "conversational_prompt_only":
        return {"prompt": _user(prompt), "answer": answer}
    rejected = _rejected_answer(a, b, rng)
    if kind == "preference":
        return {"prompt": prompt, "chosen": answer, "rejected": rejected}
    if kind == "conversational_preference":
        return {"prompt": _user(prompt), "chosen": _assistant(answer), "rejected": _assistant(rejected)}
    if kind == "preference_implicit":
        return {"chosen": prompt + answer, "rejected": prompt + rejected}
    if kind == "unpaired":  # alternate desirable / undesirable so the labels are balanced
        label = index % 2 == 0
        return {"prompt": prompt, "completion": answer if label else rejected, "label": label}
    raise ValueError(f"unknown toy kind {kind!r}; expected one of {', '.join(TOY_KINDS)}")


def toy_dataset(
    kind: str, split: str = "train", n: int | None = None, seed: int = 0, max_operand: int = 999
) -> datasets.Dataset:
    """The addition task as a ``datasets.Dataset`` in one of TRL's row formats.

    Columns by kind (prompt ``"37+85="``, answer ``"122"``; message lists are ``[{"role", "content"}]``):

    - ``language_modeling``: text (``"37+85=122"``; the tokenizer step appends EOS)
    - ``prompt_completion``: prompt, completion
    - ``conversational``: prompt (user message list), completion (assistant message list)
    - ``conversational_lm``: messages (user then assistant)
    - ``prompt_only`` / ``conversational_prompt_only``: prompt, answer (the reference sum, for rewards)
    - ``preference`` / ``conversational_preference``: prompt, chosen, rejected (a plausible wrong sum)
    - ``preference_implicit``: chosen, rejected (each prompt + answer)
    - ``unpaired``: prompt, completion, label (bool; even rows correct, odd rows wrong)

    Args:
        kind: one of ``TOY_KINDS``.
        split: "train" or "test" (disjoint by (a, b) pair; test is fixed, see ``toy_problems``).
        n: number of rows (default: 10,000 train, all ``TEST_SIZE`` test).
        seed: draws the train pairs and the rejected answers.
        max_operand: operands range over ``0..max_operand`` (the difficulty knob).
    """
    if kind not in TOY_KINDS:
        raise ValueError(f"unknown toy kind {kind!r}; expected one of {', '.join(TOY_KINDS)}")
    problems = toy_problems(split, n=n, seed=seed, max_operand=max_operand)
    rng = random.Random(f"rlcore-toy-rejected-{split}-{seed}")
    rows = [_toy_row(kind, a, b, index, rng) for index, (a, b) in enumerate(problems)]
    return datasets.Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------------------
# Rewards: fn(prompts, completions, **dataset_columns) -> list[float | None], as TRL's reward functions
# ----------------------------------------------------------------------------------------------------

STOP_STRINGS = ("<|endoftext|>", "<|im_end|>")
_DIGITS = re.compile(r"[0-9]+")


def _completion_text(completion) -> str:
    """A completion as text: a string, or the content of the last message of a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    raise TypeError(f"a completion must be a str or a list of message dicts with str content, got {completion!r}")


def extract_answer(completion) -> str | None:
    """The integer a completion answers, as a digit string, or None if it is not only an integer.

    The completion is cut at the first stop string (``<|endoftext|>`` or ``<|im_end|>``, present when it
    was decoded with special tokens), stripped of surrounding whitespace, and must then be all digits.
    """
    text = _completion_text(completion)
    for stop in STOP_STRINGS:
        text = text.split(stop, 1)[0]
    text = text.strip()
    return text if _DIGITS.fullmatch(text) else None


def _check_lengths(completions, **columns) -> None:
    for name, values in columns.items():
        if len(values) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(values)} values in {name!r}")


def _reference_integer(reference, row: int) -> int:
    """The toy task's reference answer as an int; a one-line error naming the row for anything else."""
    text = _completion_text(reference).strip() if not isinstance(reference, int) else str(reference)
    if not _DIGITS.fullmatch(text):
        raise ValueError(
            f"the toy task's accuracy compares integers, but the reference of row {row} is {reference!r}: "
            "pass a reward or metric function that knows your task (--reward_funcs / --eval_metric)"
        )
    return int(text)


def accuracy_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 where the completion is exactly the reference integer ``answer`` (up to EOS / end), else 0.0."""
    _check_lengths(completions, prompts=prompts, answer=answer)
    rewards = []
    for row, (completion, reference) in enumerate(zip(completions, answer)):
        predicted, expected = extract_answer(completion), _reference_integer(reference, row)
        rewards.append(1.0 if predicted is not None and int(predicted) == expected else 0.0)
    return rewards


def digit_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """Partial credit per digit: the share of digit positions, aligned from the right, the answer gets right.

    With the answer's digits ``p`` and the reference's ``y`` (both written without leading zeros), compared
    from the last digit (units with units, tens with tens, ...)::

        r = #{i >= 1 : p[-i] == y[-i]} / max(len(p), len(y))        0.0 when the completion is not an integer

    so an exact answer scores 1 and a digit too many or too few costs like a wrong digit. For 122:
    ``"122"`` -> 1, ``"132"`` -> 2/3, ``"22"`` -> 2/3, ``"1122"`` -> 3/4, ``"221"`` -> 1/3, ``"12x"`` -> 0.
    Exact match (:func:`accuracy_reward`) stays the evaluation metric; this one grades the wrong answers
    so that a group of G wrong samples still has a signal.
    """
    _check_lengths(completions, prompts=prompts, answer=answer)
    rewards = []
    for row, (completion, reference) in enumerate(zip(completions, answer)):
        predicted, expected = extract_answer(completion), str(_reference_integer(reference, row))
        if predicted is None:
            rewards.append(0.0)
            continue
        predicted = str(int(predicted))
        matches = sum(p == y for p, y in zip(reversed(predicted), reversed(expected)))
        rewards.append(matches / max(len(predicted), len(expected)))
    return rewards


def exact_match(prompts, completions, answer=None, completion=None, chosen=None, label=None, **kwargs) -> list:
    """The toy task's evaluation metric: :func:`accuracy_reward` against the reference of any toy row format.

    The reference is the ``answer`` column (prompt-only rows), else the reference ``completion``
    (prompt-completion rows) or the ``chosen`` answer (preference rows); message lists count by the
    content of their last message. In unpaired preference rows (``label``) only a desirable completion is a
    reference: rows labelled False score None (left out of the mean). Recipes apply it to greedy completions
    (``--eval_metric exact_match``, the default ``auto`` on the toy task).
    """
    reference = next((column for column in (answer, completion, chosen) if column is not None), None)
    if reference is None:
        raise ValueError("exact_match needs an 'answer', 'completion' or 'chosen' column")
    scores = accuracy_reward(
        prompts, completions, [_completion_text(r) if not isinstance(r, (str, int)) else r for r in reference]
    )
    if answer is None and completion is not None and label is not None:
        _check_lengths(completions, label=label)
        return [score if desirable else None for score, desirable in zip(scores, label)]
    return scores


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 where the completion is only digits (up to EOS / end, surrounding whitespace ignored), else 0.0."""
    _check_lengths(completions, prompts=prompts)
    return [0.0 if extract_answer(completion) is None else 1.0 for completion in completions]


# ----------------------------------------------------------------------------------------------------
# Tiny tokenizer and model
# ----------------------------------------------------------------------------------------------------

PAD_TOKEN, EOS_TOKEN, IM_START, IM_END, UNK_TOKEN = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, IM_START, IM_END, UNK_TOKEN)  # ids 0..4, in this order
CHARACTERS = ("\n",) + tuple(chr(code) for code in range(32, 127))  # ids 5..100

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; allowed roles: system, user, assistant') }}"
    "{%- endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else %}"
    "{{ message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer described in the module docstring (101 tokens)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE with no merges and no pre-tokenizer is exactly "one token per character".
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.decoder = decoders.Fuse()  # join tokens without spaces
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


TINY_CONFIG = dict(
    vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS),
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
    bos_token_id=None,
    eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
    dtype="float32",
)


def tiny_config(**overrides) -> LlamaConfig:
    """The tiny model's ``LlamaConfig`` with ``overrides`` applied.

    ``tiny_config(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=4)`` is a ~19M-parameter model of the same architecture for benchmarks; it uses
    the same tokenizer.
    """
    return LlamaConfig(**{**TINY_CONFIG, **overrides})


def tiny_model(seed: int = 0, **config_overrides) -> LlamaForCausalLM:
    """A freshly initialised tiny model (float32), the same weights for the same seed and config.

    The global torch RNG is left untouched. Its generation config stops at ``<|endoftext|>`` and
    ``<|im_end|>``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(**config_overrides))
    model.generation_config.eos_token_id = [SPECIAL_TOKENS.index(EOS_TOKEN), SPECIAL_TOKENS.index(IM_END)]
    model.generation_config.pad_token_id = SPECIAL_TOKENS.index(PAD_TOKEN)
    model.generation_config.bos_token_id = None
    return model


TINY_MODEL_NAME = "tiny-v1"  # bump when the tokenizer, config or initialisation changes


def default_cache_dir() -> str:
    """``$RLCORE_CACHE`` if set, else ``~/.cache/rlcore``."""
    return os.environ.get("RLCORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rlcore")


def tiny_model_dir(cache_dir: str | None = None) -> str:
    """Path of the tiny model and tokenizer, saved with ``save_pretrained`` (built on first use).

    The directory is ``<cache_dir>/tiny-v1`` (``cache_dir`` defaults to ``default_cache_dir()``). It is
    written into a temporary directory beside it and moved into place with ``os.replace``, so a reader
    never sees a half-written model; when two processes build at once, the first to finish wins.
    """
    cache_dir = cache_dir or default_cache_dir()
    final_dir = os.path.join(cache_dir, TINY_MODEL_NAME)
    if os.path.isdir(final_dir):
        return final_dir
    os.makedirs(cache_dir, exist_ok=True)
    build_dir = tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}-building-", dir=cache_dir)
    try:
        tiny_model().save_pretrained(build_dir)
        tiny_tokenizer().save_pretrained(build_dir)
        os.replace(build_dir, final_dir)
    except OSError:
        if not os.path.isdir(final_dir):  # a real failure, not another process finishing first
            raise
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return final_dir


# ----------------------------------------------------------------------------------------------------
# The SFT warm start of the recipes that improve a policy (RL, DPO, reward modelling)
# ----------------------------------------------------------------------------------------------------


def warm_start(
    model: str, steps: int, seed: int, sft_script: str | os.PathLike, sft_flags: tuple[str, ...] = ()
) -> str:
    """The model a recipe starts from: ``model`` itself, or for ``"tiny"`` an SFT checkpoint.

    Reinforcement learning improves a policy that already succeeds sometimes; the untrained tiny model
    never writes a correct sum, so every reward is 0 and nothing is learnt. With ``model == "tiny"`` and
    ``steps > 0`` this runs ``python SFT_SCRIPT SFT_FLAGS --max_steps STEPS --seed SEED --max_seconds none``
    once and returns its output directory, cached as ``<rlcore cache>/tiny-sft-<steps>steps-seed<seed>-<hash
    of the script, the flags and rlcore's sources>``, so every recipe and every later run of the same code
    reuses it. Any other ``model`` is returned unchanged.

    The online recipes and DPO pass ``rlcore.config.ONLINE_WARM_START_FLAGS``: learning rate 1e-3 after 100
    warmup steps, then a cosine that ends at half the peak, so that the checkpoint is like an SFT run stopped
    mid-schedule rather than an annealed one: on the toy task RL and DPO improved such checkpoints, and not
    fully annealed ones (docs/results.md, "SFT warm start").
    """
    if model != "tiny" or steps == 0:
        return model
    if dist.is_available() and dist.is_initialized():  # under torchrun rank 0 builds it (once), the others wait
        built = _warm_start(steps, seed, sft_script, sft_flags) if dist.get_rank() == 0 else None
        dist.barrier()
        return built or _warm_start(steps, seed, sft_script, sft_flags)  # the others: now in the cache
    return _warm_start(steps, seed, sft_script, sft_flags)


# a launcher's variables: the warm-start subprocess is a single process of its own, not one of the group's
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_PORT")


# The warm start computes full logits rather than sft.py's default chunked LM head. The two agree up to float
# rounding, yet on the toy task that rounding alone moved the 1500-step checkpoint's exact match from 36.2% to 85.4%
# (docs/results.md, "Warm start: sensitivity to rounding"); the recipes' documented figures start from the former.
_PINNED_FLAGS = ("--lm_head_chunk", "0")


def sources_digest(package: Path) -> bytes:
    """SHA-256 of the ``.py`` files under ``package`` (relative paths and contents, in sorted order). Part of the
    warm start's cache key: a change of the library (an optimizer kernel, a loss) can move what 1500 SFT steps
    reach on the toy task by tens of points (docs/results.md, "Warm start: sensitivity to rounding"), so a
    checkpoint built by other code is not reused."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.digest()


def _warm_start(steps: int, seed: int, sft_script: str | os.PathLike, sft_flags: tuple[str, ...]) -> str:
    script = Path(sft_script)
    pinned = " ".join((*sft_flags, *_PINNED_FLAGS))
    digest = hashlib.sha256(script.read_bytes() + pinned.encode() + sources_digest(Path(__file__).parent)).hexdigest()[
        :8
    ]
    directory = Path(default_cache_dir()) / f"tiny-sft-{steps}steps-seed{seed}-{digest}"
    if (directory / "config.json").exists():
        return str(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{directory.name}-building-", dir=directory.parent))
    command = [
        sys.executable,
        str(script),
        *sft_flags,
        "--max_steps",
        str(steps),
        "--seed",
        str(seed),
        "--output_dir",
        str(build),
        "--max_seconds",
        "none",
        *_PINNED_FLAGS,
    ]
    print(f"warm start: {' '.join(command)}", flush=True)
    package_root = str(Path(__file__).resolve().parents[1])  # rlcore importable by the script, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    env = {key: value for key, value in env.items() if key not in _LAUNCHER_VARIABLES}
    try:
        subprocess.run(command, check=True, env=env)
        os.replace(build, directory)
    except OSError:
        if not (directory / "config.json").exists():  # a real failure, not another process finishing first
            raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return str(directory)
