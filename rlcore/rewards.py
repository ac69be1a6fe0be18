"""Rewards for the online recipes: weighted reward functions and a reward-model directory, one interface.

A **reward function** is a plain callable with TRL's signature::

    fn(prompts, completions, completion_ids, trainer_state, **columns) -> list[float | None]

- ``prompts``: the prompts, one per completion (a prompt sampled G times appears G times in a row), as in
  the dataset: strings, or lists of ``{"role", "content"}`` messages for a conversational dataset;
- ``completions``: the decoded completions (special tokens skipped): strings, or for a conversational
  dataset ``[{"role": "assistant", "content": text}]``;
- ``completion_ids``: the completion token ids (python lists, up to and including the stop token);
- ``trainer_state``: a :class:`TrainerState` (``global_step``, ``epoch``), as TRL passes its own;
- ``columns``: every other dataset column, repeated like the prompts (e.g. ``answer`` of the toy task);
  accept ``**kwargs`` so that new columns do not break the function.

As TRL calls them, a function is passed only the keyword arguments its signature names, unless it takes
``**kwargs``: ``def reward_len(prompts, completions)`` works. Values may be python or numpy numbers (or
one-element tensors). A function that raises is reported as one ``ValueError`` naming the function, the
step and the first row it fails on (found by calling it again row by row), not a traceback from the loop.

It returns one float per completion, or ``None`` where it does not apply (a multi-task dataset scores
each row with the functions that know its task). The toy task's ``accuracy``, ``digits`` (partial credit
per digit) and ``format`` rewards (``rlcore.toy``) have this signature; they are the built-in names.

A **reward model** is a directory written by ``recipes/reward_model.py`` (or any one-output
``*ForSequenceClassification``, with its own tokenizer): :class:`RewardModelScorer` scores prompt and
completion at the last token (``rlcore.models.sequence_scores``). When its tokenizer has the policy's
vocabulary it reads the policy's token ids directly (the fast path); otherwise, as TRL's
``reward_processing_class``, it re-tokenises the text: the prompt and the decoded completion, through the
reward model's chat template for conversational data, tokenised as ``rlcore.data`` tokenises training rows.

:class:`RewardScorer` combines the sources with weights:

    reward_i = sum_k w_k * r_ik      over the sources k whose r_ik is not None

A row that every source leaves at None has no reward and raises ``ValueError`` (TRL would silently give
it 0). Per-source rewards are kept in a ``[B, K]`` tensor with NaN for None, for per-source logging.

:func:`score_rollout` is the step every online recipe takes between sampling and the loss: decode the
completions of a rollout, repeat each prompt's columns over its G completions, and score them.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch import nn

from rlcore import data, distributed, lora
from rlcore.data import PromptBatch, is_toy_source, repeat_each
from rlcore.models import eos_token_ids, eval_mode, load_reward_model, sequence_scores

if TYPE_CHECKING:
    from rlcore.rollout import Rollout

RewardFunction = Callable[..., list]
# the toy task's reward and metric functions (rlcore.toy), by their command-line names
BUILTIN_REWARDS = {
    "accuracy": "accuracy_reward",
    "digits": "digit_reward",
    "format": "format_reward",
    "exact_match": "exact_match",
}
REWARD_MODEL_NAME = "reward_model"
REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")  # passed besides the columns


@dataclass(frozen=True)
class TrainerState:
    """What a reward function learns of the run, under TRL's ``TrainerState`` names.

    Attributes:
        global_step: optimizer steps completed before this one (0 at the first step; evaluation: the step).
        epoch: passes over the training prompts so far (fractional).
    """

    global_step: int = 0
    epoch: float = 0.0


def load_reward_function(spec: str) -> tuple[str, RewardFunction]:
    """A reward function from its command-line name: ``(name, function)``.

    ``spec`` is one of:

    - a built-in name: ``accuracy``, ``digits``, ``format`` or ``exact_match`` (the toy task's functions);
    - ``package.module:function``: imported (the module must be importable, e.g. installed or on
      ``PYTHONPATH``);
    - ``path/to/file.py:function``: loaded from that file.

    The name is the function's name (``accuracy`` for the built-ins), used in logged metric keys.
    """
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        from rlcore import toy  # the built-in names are the toy task's rewards

        return spec, getattr(toy, BUILTIN_REWARDS[spec])
    if ":" not in spec:
        raise ValueError(
            f"unknown reward function {spec!r}: expected one of {', '.join(BUILTIN_REWARDS)}, "
            "'package.module:function' or 'path/to/file.py:function'"
        )
    return data.load_function(spec, "reward function")


def resolve_metric(spec: str | None, dataset: str) -> tuple[str, RewardFunction] | None:
    """``--eval_metric``: ``"auto"`` is the toy task's ``exact_match`` on a toy dataset and no metric on any
    other; None or ``"none"`` is no metric; anything else is a :func:`load_reward_function` spec."""
    if spec is None or spec == "none" or (spec == "auto" and not is_toy_source(dataset)):
        return None
    return load_reward_function("exact_match" if spec == "auto" else spec)


def required_columns(function: RewardFunction) -> list[str]:
    """Dataset columns a reward (or metric) function needs: its parameters without a default, other than
    the prompts, completions and completion ids it always receives (``answer`` for the toy's accuracy)."""
    parameters = inspect.signature(function).parameters.values()
    return [
        p.name
        for p in parameters
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in REWARD_ARGUMENTS
    ]


def check_reward_columns(functions: Sequence[tuple[str, RewardFunction]], columns: Sequence[str], source: str) -> None:
    """Raise a one-line ``ValueError`` naming the function and the missing column, before any training."""
    for name, function in functions:
        missing = [column for column in required_columns(function) if column not in columns]
        if missing:
            raise ValueError(
                f"reward function {name!r} needs column(s) {missing}, which {source} lacks (columns: {list(columns)})"
            )


class RewardModelScorer:
    """Scores of prompt + completion under a reward-model directory (no gradient).

    Two paths, chosen once from the tokenizers:

    - **same vocabulary** (``same_vocabulary``; a reward model trained from the policy's base): ``__call__``
      scores the policy's token ids as they are, no text involved;
    - **its own tokenizer** (TRL's ``reward_processing_class``): :meth:`score_text` rebuilds each row as
      text and tokenises it with the reward model's tokenizer, as ``rlcore.data`` tokenises a preference row
      for reward-model training: a plain prompt with the tokenizer's special tokens, then the decoded
      completion and the reward model's EOS when the policy stopped (not after a completion cut at
      ``max_new_tokens``); a conversational prompt + ``[{"role": "assistant", "content": completion}]``
      through the reward model's chat template, up to the end of the assistant turn.

    Cost of the second path: decoding the completions (done anyway for reward functions), rendering the
    chat template and tokenising prompt + completion on the CPU for every row, each step; the reward
    model's forward pass is the same. Measured on the toy task with the tiny reward model on CPU
    (``benchmarks/reward_tokenizer.py``, docs/results.md): within noise of the fast path for plain prompts,
    about 15% more time for chat-template prompts (the forward dominates there; not measured on a GPU).
    Decoding skips special tokens, so text the policy wrote as special tokens is not seen by the reward model.

    Args:
        path: a reward-model directory (``recipes/reward_model.py``'s output, or any one-output sequence
            classifier with its tokenizer) or hub id.
        policy_tokenizer: the policy's tokenizer (its vocabulary picks the path; its stop tokens say whether
            a completion stopped).
        device: where the reward model runs.
        batch_size: sequences per forward pass.
    """

    def __init__(self, path: str, policy_tokenizer, device: torch.device | str = "cpu", batch_size: int = 64):
        self.model, self.tokenizer = load_reward_model(path, device=device)
        self.model.eval().requires_grad_(False)
        self.path, self.batch_size = path, batch_size
        self.same_vocabulary = self.tokenizer.get_vocab() == policy_tokenizer.get_vocab()
        self.policy_stop_ids = set(eos_token_ids(policy_tokenizer))
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] ids and mask (1 on real tokens; left-padded prompt, right-padded completion) -> [B] float32.

        The real tokens of each row are moved to the front first, so the positions the reward model sees
        start at 0 as in training, whatever the padding.
        """
        if sequences.shape != attention_mask.shape or sequences.dim() != 2:
            raise ValueError(
                f"sequences {tuple(sequences.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, L]"
            )
        device = next(self.model.parameters()).device
        order = torch.sort(attention_mask.long(), dim=1, descending=True, stable=True).indices  # [B, L]
        ids = sequences.gather(1, order).to(device)  # [B, L]: real tokens first, in order
        mask = attention_mask.gather(1, order).to(device)  # [B, L]
        ids, mask = self._keep_tensor_ends(ids, mask)
        scores = [
            sequence_scores(self.model, ids[start : start + self.batch_size], mask[start : start + self.batch_size])
            for start in range(0, ids.shape[0], self.batch_size)
        ]
        return torch.cat(scores).float()  # [B]

    def text_ids(self, prompts: list, completions: list, stopped: list[bool]) -> list[list[int]]:
        """Token ids of each prompt + completion under the reward model's tokenizer (see the class docstring).

        ``prompts``/``completions`` as reward functions receive them (strings, or message lists);
        ``stopped[i]``: whether completion i ended with a stop token.
        """
        tokenizer = self.tokenizer
        if prompts and isinstance(prompts[0], list):
            if not tokenizer.chat_template:
                raise ValueError(
                    f"the reward model {self.path!r} has another tokenizer than the policy and no chat template: "
                    "conversational prompts cannot be rendered for it"
                )
            return data.chat_pair_ids(tokenizer, list(prompts), list(completions))
        prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return [p + c + (eos if stop else []) for p, c, stop in zip(prompt_ids, completion_ids, stopped)]

    def _keep_tensor_ends(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`keep_ends` for [B, L] rows whose real tokens come first."""
        lengths = mask.long().sum(1)  # [B]
        if self.max_length is None or int(lengths.max()) <= self.max_length:
            return ids, mask
        kept = [row[: int(n)].tolist() for row, n in zip(ids, lengths)]
        batch = data.collate_right(self.keep_ends(kept), None, 0)
        return batch["input_ids"].to(ids.device), batch["attention_mask"].to(mask.device)

    def keep_ends(self, rows: list[list[int]]) -> list[list[int]]:
        """Rows cut to the reward model's ``max_position_embeddings``, keeping their ends.

        The score is read at a row's last token, so a row too long for the reward model loses the start of
        its prompt, not its completion; a warning says how many rows were cut.
        """
        limit = self.max_length
        cut = 0 if limit is None else sum(len(row) > limit for row in rows)
        if cut:
            warnings.warn(
                f"reward model {self.path!r}: {cut} of {len(rows)} rows are longer than its "
                f"max_position_embeddings={limit} in its own tokens; scored on their last {limit} tokens",
                stacklevel=2,
            )
            rows = [row[-limit:] for row in rows]
        return rows

    @torch.no_grad()
    def score_text(self, prompts: list, completions: list, completion_ids: list[list[int]]) -> torch.Tensor:
        """[B] float32 scores of rows given as text (the reward model's own tokenizer): re-tokenise, score."""
        stopped = [bool(ids) and ids[-1] in self.policy_stop_ids for ids in completion_ids]
        rows = self.keep_ends(self.text_ids(prompts, completions, stopped))
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        scores = []
        for start in range(0, len(rows), self.batch_size):
            batch = data.collate_right(rows[start : start + self.batch_size], None, pad_id)
            scores.append(
                sequence_scores(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            )
        return torch.cat(scores).float()  # [B]


REWARD_ADAPTER = "reward"  # the name of a reward model's adapter on the policy's base (rlcore.lora.use_adapter)


def reward_adapter_dir(path: str) -> str:
    """The adapter directory of a reward model trained with LoRA: ``path`` itself (an adapter or a checkpoint
    directory) or ``path/adapter`` (``recipes/reward_model.py``'s output directory)."""
    for candidate in (path, os.path.join(path, "adapter")):
        if os.path.isfile(os.path.join(candidate, lora.ADAPTER_CONFIG_NAME)):
            return candidate
    raise ValueError(
        f"--reward_model {path!r} with --reward_on_policy: no {lora.ADAPTER_CONFIG_NAME} in it or in its adapter/ "
        "subdirectory; train the reward model with --lora_r > 0 on the policy's base (recipes/reward_model.py)"
    )


def _score_head(directory: str) -> nn.Linear:
    """The float32 ``Linear(H, 1)`` score head of a reward adapter: in its adapter file (PEFT's SEQ_CLS
    layout) or, in a checkpoint directory, in ``score.safetensors`` beside it."""
    tensors = lora.read_adapter_heads(directory)
    tensors = {key.removeprefix("score."): value for key, value in tensors.items() if key.startswith("score.")}
    sidecar = os.path.join(directory, "score.safetensors")
    if not tensors and os.path.isfile(sidecar):
        tensors = load_file(sidecar)
    if "weight" not in tensors or tensors["weight"].shape[0] != 1:
        raise ValueError(
            f"reward adapter {directory!r} holds no one-output score head (score.weight [1, H]) in its adapter file "
            "or a score.safetensors beside it: save it from a reward model (recipes/reward_model.py --lora_r N)"
        )
    head = nn.Linear(tensors["weight"].shape[1], 1, bias="bias" in tensors, device="meta").to_empty(device="cpu")
    head.load_state_dict({key: value.float() for key, value in tensors.items()})  # no random initial values
    return head.requires_grad_(False)


class PolicyRewardModel(nn.Module):
    """What ``sequence_scores`` reads, on the policy's own base: its body as the backbone, and a score head."""

    base_model_prefix = "backbone"

    def __init__(self, policy: nn.Module, score: nn.Linear):
        super().__init__()
        self.score = score
        self.policy = [policy]  # in a list: not a submodule, its weights stay the policy's alone

    @property
    def backbone(self) -> nn.Module:
        policy = self.policy[0]
        return getattr(policy, policy.base_model_prefix)


class AdapterRewardScorer(RewardModelScorer):
    """A reward model as a LoRA adapter and score head on the policy's own frozen base, switched per forward
    pass: the run holds one copy of the base weights for policy, reference and reward model.

    The reward model must have been trained with LoRA (``recipes/reward_model.py --lora_r N``) on the base
    the policy starts from: its ``adapter_config.json`` names that base, and :meth:`attach` refuses another.
    Scores are then those of the separate reward model built from the same base and adapter (up to the
    base's precision: a 4-bit or bfloat16 policy base scores through the same rounded weights). The policy
    must itself be trained with LoRA: full fine-tuning would move the base under the reward adapter.

    Cost: no second model's weights; the same forward passes as a separate reward model, plus the adapter's
    rank-r matmuls (the merged separate model has none). Built before the policy exists (the directory is
    checked at once), usable after :meth:`attach`.
    """

    def __init__(self, path: str, policy_tokenizer, device: torch.device | str = "cpu", batch_size: int = 64):
        self.path, self.batch_size, self.tokenizer = path, batch_size, policy_tokenizer
        self.directory = reward_adapter_dir(path)
        self.adapter_config = lora.read_adapter_config(self.directory)
        self.model = PolicyRewardModel(None, _score_head(self.directory).to(device))
        self.same_vocabulary = True  # the policy's own base and tokenizer
        self.policy_stop_ids = set(eos_token_ids(policy_tokenizer))
        self.max_length = None

    def attach(self, policy: nn.Module) -> None:
        """Load the reward adapter onto ``policy`` (named ``"reward"``, frozen) after checking the base."""
        if lora.DEFAULT_ADAPTER not in lora.adapter_names(policy):
            raise ValueError("--reward_on_policy needs a LoRA policy (--lora_r > 0): full fine-tuning moves the base")
        base, own = self.adapter_config.get("base_model_name_or_path"), policy.name_or_path
        if base is None:
            warnings.warn(f"reward adapter {self.directory!r} does not name its base model; not checked", stacklevel=2)
        elif not _same_model(base, own):
            raise ValueError(
                f"--reward_on_policy: the reward adapter {self.directory!r} was trained on {base!r}, the policy "
                f"starts from {own!r}; give --model {base} or score with a separate --reward_model (no --reward_on_policy)"
            )
        lora.load_adapter(policy, self.directory, adapter_name=REWARD_ADAPTER, with_heads=False)
        for parameter in lora.lora_parameters(policy, REWARD_ADAPTER):
            parameter.requires_grad_(False)
        self.model.policy[0] = policy
        self.max_length = getattr(policy.config.get_text_config(), "max_position_embeddings", None)

    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        policy = self.model.policy[0]
        if policy is None:
            raise ValueError("AdapterRewardScorer: call attach(policy) before scoring")
        with eval_mode(policy), lora.use_adapter(policy, REWARD_ADAPTER):  # no dropout, no gradient
            return super().__call__(sequences, attention_mask)


def _same_model(first: str, second: str) -> bool:
    """Whether two model names are the same checkpoint: equal hub ids, or directories that are one."""
    if os.path.isdir(first) and os.path.isdir(second):
        return os.path.samefile(first, second)
    return first == second


class RewardScorer:
    """Weighted sum of reward functions and an optional reward model (see the module docstring).

    Args:
        functions: ``(name, function)`` pairs, e.g. from :func:`load_reward_function`.
        reward_model: a :class:`RewardModelScorer`, or None.
        weights: one weight per source, functions first then the reward model (None: all 1).

    Attributes:
        names: the source names, in column order of the per-source tensor.
        weights: [K] float32 tensor.
    """

    def __init__(
        self,
        functions: Sequence[tuple[str, RewardFunction]],
        reward_model: RewardModelScorer | None = None,
        weights: Sequence[float] | None = None,
    ):
        self.functions = list(functions)
        self.reward_model = reward_model
        self.names = [name for name, _ in self.functions] + ([REWARD_MODEL_NAME] if reward_model is not None else [])
        if not self.names:
            raise ValueError("no reward source: give at least one reward function or a reward model")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"reward sources must have distinct names, got {self.names}")
        weights = [1.0] * len(self.names) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.names):
            raise ValueError(f"{len(weights)} reward weights for {len(self.names)} reward sources {self.names}")
        self.weights = torch.tensor(weights, dtype=torch.float32)  # [K]

    def __call__(
        self,
        prompts: list,
        completions: list,
        completion_ids: list[list[int]],
        columns: dict[str, list],
        sequences: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        state: TrainerState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score B completions.

        Args:
            prompts, completions, completion_ids, columns: what reward functions receive (module docstring).
            sequences, attention_mask: [B, L] prompt + completion ids and mask, for a reward model with the
                policy's vocabulary (one with its own tokenizer reads the text instead).
            state: the ``trainer_state`` reward functions receive (default: step 0, epoch 0).

        Returns:
            (rewards [B], per_source [B, K]): float32 on the CPU; per_source holds NaN where a function
            returned None.
        """
        count = len(completions)
        if len(prompts) != count or len(completion_ids) != count:
            raise ValueError(
                f"{len(prompts)} prompts, {count} completions and {len(completion_ids)} completion_ids: expected one each per completion"
            )
        for name, values in columns.items():
            if len(values) != count:
                raise ValueError(f"column {name!r} has {len(values)} values for {count} completions")
        state = TrainerState() if state is None else state
        arguments = dict(columns, prompts=prompts, completions=completions, completion_ids=completion_ids)
        arguments["trainer_state"] = state
        per_source = [
            _checked_rewards(name, call_reward_function(name, function, arguments, state.global_step), count)
            for name, function in self.functions
        ]
        if self.reward_model is not None and not self.reward_model.same_vocabulary:
            per_source.append(self.reward_model.score_text(prompts, completions, completion_ids).cpu())
        elif self.reward_model is not None:
            if sequences is None or attention_mask is None:
                raise ValueError("a reward model needs the token sequences and their attention mask")
            per_source.append(self.reward_model(sequences, attention_mask).cpu())
        per_source = torch.stack(per_source, dim=1)  # [B, K]
        unscored = (~per_source.isnan()).sum(dim=1) == 0  # [B]
        if unscored.any():
            row = int(unscored.nonzero()[0])
            raise ValueError(
                f"every reward source returned None for completion {row} (prompt {prompts[row]!r}): its reward is undefined"
            )
        rewards = (per_source * self.weights).nansum(dim=1)  # [B]
        return rewards, per_source

    def stats(self, per_source: torch.Tensor) -> dict[str, torch.Tensor]:
        """``rewards/<name>/mean`` and ``rewards/<name>/std`` (Bessel) of each source over its non-None rows."""
        stats = {}
        for index, name in enumerate(self.names):
            values = per_source[:, index]
            values = values[~values.isnan()]
            stats[f"rewards/{name}/mean"] = values.mean() if values.numel() else torch.tensor(0.0)
            stats[f"rewards/{name}/std"] = values.std() if values.numel() > 1 else torch.tensor(0.0)
        return stats


def call_reward_function(name: str, function: RewardFunction, arguments: dict[str, list], step: int = 0) -> list:
    """``function(**arguments)`` as TRL calls reward functions: with only the keyword arguments its signature
    names (all of them when it takes ``**kwargs``).

    ``arguments`` holds ``prompts``, ``completions``, ``completion_ids``, ``trainer_state`` and the columns,
    one entry per row (``trainer_state`` excepted). An exception becomes one ``ValueError`` naming the
    function, the step and the first row that fails alone (the function is called again one row at a time
    to find it), and the original error.
    """
    parameters = inspect.signature(function).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        arguments = {key: value for key, value in arguments.items() if key in names}
    try:
        return function(**arguments)
    except Exception as error:
        row = _first_failing_row(function, arguments)
        where = "" if row is None else f", first on row {row}"
        if row is not None and "prompts" in arguments:
            where += f" (prompt {arguments['prompts'][row]!r})"
        raise ValueError(
            f"reward function {name!r} raised at step {step}{where}: {type(error).__name__}: {error}"
        ) from error


def _first_failing_row(function: RewardFunction, arguments: dict) -> int | None:
    """The first row on which ``function`` raises when called on that row alone (None if none does)."""
    count = max((len(v) for k, v in arguments.items() if k != "trainer_state" and isinstance(v, list)), default=0)
    for row in range(count):
        single = {
            k: v if k == "trainer_state" or not isinstance(v, list) else v[row : row + 1] for k, v in arguments.items()
        }
        try:
            function(**single)
        except Exception:  # noqa: BLE001 - any error of the user's function marks the row
            return row
    return None


def _checked_rewards(name: str, values, count: int) -> torch.Tensor:
    """A reward function's output as a [B] float32 tensor (None -> NaN), with a clear error for bad output."""
    if not isinstance(values, (list, tuple)) or len(values) != count:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(
            f"reward function {name!r} must return a list of {count} floats or None (one per completion), got {got}"
        )
    checked = []
    for row, value in enumerate(values):
        if value is None:
            checked.append(math.nan)
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar (np.float32(1.0))
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(
                f"reward function {name!r} returned {value!r} for completion {row}: expected a finite float or None"
            )
        checked.append(float(value))
    return torch.tensor(checked, dtype=torch.float32)  # [B]


def build_reward_scorer(
    reward_funcs: str | None,
    reward_model: str | None,
    reward_weights: str | None,
    policy_tokenizer,
    device: torch.device | str = "cpu",
    reward_on_policy: bool = False,
) -> RewardScorer:
    """The :class:`RewardScorer` of the command-line flags.

    Args:
        reward_funcs: comma-separated :func:`load_reward_function` specs (``"accuracy,format"``), or None.
        reward_model: a reward-model directory or hub id, or None.
        reward_weights: comma-separated floats, one per source (functions, then the reward model); None: all 1.
        policy_tokenizer: the policy's tokenizer (a reward model with another vocabulary re-tokenises text).
        device: where the reward model runs.
        reward_on_policy: the reward model is a LoRA adapter and score head to put on the policy's base
            (:class:`AdapterRewardScorer`; ``scorer.reward_model.attach(policy)`` once the policy is loaded).
    """
    functions = [load_reward_function(spec) for spec in (reward_funcs or "").split(",") if spec.strip()]
    reward_class = AdapterRewardScorer if reward_on_policy else RewardModelScorer
    scorer = reward_class(reward_model, policy_tokenizer, device) if reward_model else None
    weights = None
    if reward_weights:
        try:
            weights = [float(w) for w in reward_weights.split(",")]
        except ValueError:
            raise ValueError(f"--reward_weights must be comma-separated numbers, got {reward_weights!r}") from None
    return RewardScorer(functions, scorer, weights)


# ----------------------------------------------------------------------------------------------------------
# scoring a rollout


def decode_completions(tokenizer, id_lists: list[list[int]], conversational: bool) -> list:
    """Completions as reward functions receive them: text without special tokens, or for a conversational
    dataset ``[{"role": "assistant", "content": text}]``."""
    texts = tokenizer.batch_decode(id_lists, skip_special_tokens=True)
    return [[{"role": "assistant", "content": text}] for text in texts] if conversational else texts


def score_rollout(
    scorer: RewardScorer,
    tokenizer,
    batch: PromptBatch,
    rollout: Rollout,
    missing_eos_penalty: float = 0.0,
    state: TrainerState | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the completions of a rollout of ``batch`` (G consecutive rows per prompt); ``state`` is the
    ``trainer_state`` reward functions receive.

    Returns:
        (rewards [N], per_source [N, K]), float32 on the CPU: the scorer's weighted reward minus
        ``missing_eos_penalty`` on truncated rows, and each source's own rewards (NaN where None).
    """
    group_size = rollout.completion_ids.shape[0] // len(batch.prompts)
    lengths = rollout.completion_mask.sum(dim=1).tolist()  # [N]: up to and including the stop token
    id_lists = [ids[: int(length)] for ids, length in zip(rollout.completion_ids.tolist(), lengths)]
    completions = decode_completions(tokenizer, id_lists, batch.conversational)
    columns = {name: repeat_each(values, group_size) for name, values in batch.columns.items()}
    rewards, per_source = scorer(
        repeat_each(batch.prompts, group_size),
        completions,
        id_lists,
        columns,
        rollout.sequences,
        rollout.attention_mask,
        state,
    )
    return rewards - missing_eos_penalty * rollout.truncated.cpu().float(), per_source


def rollout_stats(
    rollout: Rollout, rewards: torch.Tensor, per_source: torch.Tensor, scorer: RewardScorer
) -> dict[str, torch.Tensor]:
    """Reward mean/std (overall and per source), completion length mean/min/max and truncated fraction.

    Under torchrun these are the whole batch's: every process's rows (a few numbers each) are gathered first,
    so a standard deviation or a maximum is the one a single process computes, not a mean of the processes'.
    """
    lengths = rollout.completion_mask.sum(dim=1).float()  # [N]
    columns = torch.cat(
        [
            rewards.float()[:, None],
            lengths.cpu()[:, None],
            rollout.truncated.cpu().float()[:, None],
            per_source.float(),
        ],
        dim=1,
    )  # [N, 3 + K]
    rewards, lengths, truncated, per_source = distributed.gather_rows(columns).split([1, 1, 1, per_source.shape[1]], 1)
    rewards, lengths = rewards[:, 0], lengths[:, 0]  # [N * W]
    return {
        "reward": rewards.mean(),
        "reward_std": rewards.std() if rewards.numel() > 1 else torch.tensor(0.0),
        **scorer.stats(per_source),
        "completions/mean_length": lengths.mean(),
        "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(),
        "completions/truncated_frac": truncated.mean(),
    }
