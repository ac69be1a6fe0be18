"""Loading policies, reward models and value models through transformers.

Every loader takes ``"tiny"`` (the embedded default of ``rlcore.toy``), a local directory, or a hub id, and
returns plain transformers objects: what you load here is what ``from_pretrained`` gives you, with only
the settings RL needs made explicit (a pad token, the score head's pad id, the stop tokens).

Conventions:
- ``dtype=None`` loads float32 (train in float32 and use autocast for mixed precision); ``"auto"`` keeps
  the checkpoint's dtype; ``"bfloat16"``, ``"float16"``, ``"float32"`` or a ``torch.dtype`` cast to it.
- ``trust_remote_code`` is off unless asked for: a hub repository's Python code runs only on request.
- Sequence scores and values are read at the positions where ``attention_mask`` is 1, never by comparing
  ids with the pad id, so they stay correct when the pad token is also the EOS token.
"""

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlcore.logprobs import entropy_from_logits, gather_logprobs, log_sum_squared_probs
from rlcore.ops import last_valid_index

TINY = "tiny"
# End-of-turn tokens of common chat formats (ChatML/Qwen, Llama 3, Gemma, Phi-3): a completion stops at them.
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
VALUE_HEAD_FILE = "value_head.safetensors"


def resolve_model(name_or_path: str, expected: tuple[str, ...] = ("config.json",)) -> str:
    """``"tiny"`` -> the cached tiny model directory (built on first use); a directory -> its absolute path;
    anything else is returned unchanged and treated as a hub id by transformers.

    Raises:
        ValueError: a directory holding none of the ``expected`` files (not a model directory).
        FileNotFoundError: a path (starting with ``/``, ``.`` or ``~``) that does not exist.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"a model must be 'tiny', a directory or a hub id, got {name_or_path!r}")
    name_or_path = str(name_or_path)
    if name_or_path == TINY:
        from rlcore.toy import tiny_model_dir  # the name "tiny" asks for the embedded default

        return tiny_model_dir()
    if os.path.isdir(name_or_path):
        if not any(os.path.isfile(os.path.join(name_or_path, name)) for name in expected):
            raise ValueError(
                f"model {name_or_path!r} is not a model directory (no {' or '.join(expected)}): give a directory "
                "written by save_pretrained (a recipe's --output_dir), 'tiny' or a hub id"
            )
        return os.path.abspath(name_or_path)
    if os.path.exists(name_or_path) or name_or_path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model {name_or_path!r}: no such directory")
    return name_or_path


def _dtype_argument(dtype) -> str | torch.dtype:
    """What to pass as ``from_pretrained(dtype=...)``: None -> float32; "auto", dtype names, torch dtypes as given."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto" or (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)):
        return dtype
    raise ValueError(
        f"dtype must be None, 'auto', a torch dtype name such as 'bfloat16', or a torch.dtype; got {dtype!r}"
    )


def _pretrained_kwargs(dtype, trust_remote_code: bool, attn_implementation: str | None, kwargs: dict) -> dict:
    extra = {"dtype": _dtype_argument(dtype), "trust_remote_code": trust_remote_code, **kwargs}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    return extra


def load_tokenizer(name_or_path: str = TINY, trust_remote_code: bool = False, **kwargs):
    """``AutoTokenizer.from_pretrained`` with a pad token guaranteed.

    A tokenizer without one gets its EOS token as pad token, with a warning (collators pad by position and
    masks, so sharing the id is safe in rlcore). Padding side is left as loaded: rlcore's collators pad
    explicitly (right for training, left for generation).
    """
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(name_or_path, expected=("tokenizer_config.json", "tokenizer.json", "config.json")),
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name_or_path!r} has neither a pad token nor an EOS token to pad with")
        warnings.warn(
            f"the tokenizer of {name_or_path!r} has no pad token; using its EOS token {tokenizer.eos_token!r}",
            stacklevel=2,
        )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    name_or_path: str = TINY,
    dtype=None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    **kwargs,
):
    """A causal LM and its tokenizer: ``(AutoModelForCausalLM.from_pretrained(...), load_tokenizer(...))``.

    Extra keyword arguments go to ``from_pretrained`` (e.g. ``quantization_config``, ``revision``).
    The model's ``config.pad_token_id`` is set to the tokenizer's when the checkpoint has none.
    """
    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, **_pretrained_kwargs(dtype, trust_remote_code, attn_implementation, kwargs)
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model, tokenizer


def load_reward_model(
    name_or_path: str = TINY,
    dtype=None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    **kwargs,
):
    """A one-output sequence classifier and its tokenizer, for reward modelling.

    Loaded with ``AutoModelForSequenceClassification(num_labels=1)``: a reward-model checkpoint keeps its
    score head; a causal-LM checkpoint (``"tiny"`` included) gets a freshly initialised ``score`` head
    (transformers logs which weights are new). ``config.pad_token_id`` is set to the tokenizer's pad id, so
    the model's own forward scores the last non-pad token; prefer ``sequence_scores``, which uses the mask.
    """
    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, **_pretrained_kwargs(dtype, trust_remote_code, attn_implementation, kwargs)
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model, tokenizer


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score of each sequence: the one-output head at its last attended token.

    Args:
        model: a ``*ForSequenceClassification`` with ``num_labels=1`` and a ``score`` head (as decoder LMs
            in transformers have), e.g. from ``load_reward_model``.
        input_ids: [B, T] token ids, left or right padded.
        attention_mask: [B, T], 1 on real tokens.

    Returns:
        [B] scores (the model's dtype), differentiable.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, T]"
        )
    if not isinstance(getattr(model, "score", None), nn.Module):
        raise TypeError(
            f"{type(model).__name__} has no `score` head; expected a *ForSequenceClassification decoder model"
        )
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
    last = last_valid_index(attention_mask)  # [B]
    last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
    return model.score(last_hidden).squeeze(-1)  # [B]


class ValueModel(nn.Module):
    """A transformer backbone with a linear value head: V(s_t) for every position t, for PPO critics.

    ``values = head(backbone(input_ids).last_hidden_state)``, shape [B, T]: position t holds the value of
    the state "prompt and completion up to and including token t". The head is ``Linear(hidden, 1)``
    initialised to zero, so every value starts at 0 and the first advantages are the rewards themselves.

    Saving: ``save_pretrained(path)`` writes the backbone with its own ``save_pretrained`` (so
    ``AutoModel.from_pretrained(path)`` loads it) and the head to ``path/value_head.safetensors``
    (tensors ``weight`` [1, H] and ``bias`` [1]); ``ValueModel.from_pretrained(path)`` loads both, and
    from any other checkpoint (``"tiny"``, a policy, a reward model) takes its backbone with a fresh head.
    """

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = TINY,
        dtype=None,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> "ValueModel":
        path = resolve_model(name_or_path)
        backbone = AutoModel.from_pretrained(
            path, **_pretrained_kwargs(dtype, trust_remote_code, attn_implementation, kwargs)
        )
        model = cls(backbone, backbone.config.get_text_config().hidden_size)
        model.value_head.to(dtype=next(backbone.parameters()).dtype)
        head_file = os.path.join(path, VALUE_HEAD_FILE)
        if os.path.isfile(head_file):
            model.value_head.load_state_dict(load_file(head_file))
        if device is not None:
            model.to(device)
        return model

    def save_pretrained(self, path: str) -> None:
        self.backbone.save_pretrained(path)
        head = {name: tensor.detach().contiguous().cpu() for name, tensor in self.value_head.state_dict().items()}
        save_file(head, os.path.join(path, VALUE_HEAD_FILE))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, T] ids and mask (and optional [B, T] position ids) -> [B, T] values (the head's dtype)."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # [B, T, H]
        return self.value_head(hidden).squeeze(-1)  # [B, T]


def completion_values(
    value_model, sequences: torch.Tensor, attention_mask: torch.Tensor, completion_length: int
) -> torch.Tensor:
    """V(s_t) of each completion token t: the value of the state just before it, float32 [B, T].

    ``value_model(...)`` gives [B, Lp + T] values where column j is the state "up to and including token
    j"; completion token t (column Lp + t) is chosen in the state of column Lp + t - 1, so the completion's
    values are the T columns ending one before the last: ``values[:, -T-1:-1]``. Positions count real
    tokens only (:func:`position_ids_from_mask`), as during generation.
    """
    values = value_model(sequences, attention_mask, position_ids_from_mask(attention_mask))  # [B, Lp + T]
    return values[:, -completion_length - 1 : -1].float()  # [B, T]


# ----------------------------------------------------------------------------------------------------------
# log-probabilities of tokens under a causal LM


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] positions that count real tokens only: left padding does not shift them (as in generation);
    for right padding they equal ``arange(L)`` on the real tokens."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    last: int | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the next tokens of a batch (and, on request, their entropies).

        logp[b, t] = log softmax(logits(input_ids_b[: t + 1]) / temperature)[input_ids_b[t + 1]]

    for t over the last ``last`` positions that predict a token (all T - 1 of them when ``last`` is None).
    One forward pass; only the last ``last + 1`` positions go through the LM head (``logits_to_keep``).
    Position ids count real tokens (:func:`position_ids_from_mask`), so left- and right-padded rows give
    the log-probs the model gave during generation.

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids, logits_to_keep)``).
        input_ids, attention_mask: [B, L] ids and 1-on-real-token mask.
        last: how many of the final tokens to score (the completion length T of a left-padded prompt
            followed by a T-column completion), or None for every token after the first.
        temperature: divides the logits (use the sampling temperature for a sampled completion).
        with_entropy: also return the per-token entropy, computed without gradient (a metric).
        entropy_grad: give the entropy its gradient (an entropy bonus in the loss); autograd then keeps
            a softmax of the scored positions, [B, n, V] floats.

    Returns:
        (logp [B, n] float32 with the model's gradient, entropy [B, n] (detached unless entropy_grad) or None), n = ``last`` or
        L - 1; column j scores token ``input_ids[:, L - n + j]``. Padding positions hold values for the pad
        id: mask them.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, L]"
        )
    n = input_ids.shape[1] - 1 if last is None else last
    if not 0 < n < input_ids.shape[1]:
        raise ValueError(
            f"last must be in [1, {input_ids.shape[1] - 1}] (a token precedes the scored ones), got {last}"
        )
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=n + 1,
        use_cache=False,
    ).logits[:, :-1]  # [B, n, V]: column j predicts token L - n + j
    logp = gather_logprobs(logits, input_ids[:, -n:], temperature=temperature)  # [B, n]
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits if entropy_grad else logits.detach(), temperature=temperature)
    return logp, entropy


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    average: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the completions of a batch: summed (or averaged) over their tokens, and per token.

        logp(y | x) = sum_t m_t log p(y_t | x, y_<t)         (average: divided by sum_t m_t)

    Args:
        input_ids, attention_mask: [B, L] prompt + completion ids, any padding.
        completion_mask: [B, n], 1 on the completion tokens among the last n tokens of each row: n = L - 1
            for a right-padded ``collate_preference`` batch (its ``completion_mask[:, 1:]``), n = T for a
            left-padded prompt followed by a T-column completion (``Rollout.completion_mask``).
        average: divide by the completion's token count (IPO's length-averaged log-probs).

    Returns:
        ([B] sequence log-probs, [B, n] per-token log-probs, zero outside the completion), with gradient.
    """
    logp, _ = token_logprobs(model, input_ids, attention_mask, last=completion_mask.shape[1], temperature=temperature)
    token_logp = logp * completion_mask  # [B, n]
    summed = token_logp.sum(dim=1)  # [B]
    return (summed / completion_mask.sum(dim=1).clamp(min=1) if average else summed), token_logp


@torch.no_grad()
def log_sum_squared_token_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    last: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log sum_v p_t[v]^2 at the positions :func:`token_logprobs` scores, without gradient (WPO's normaliser,
    see ``rlcore.logprobs.log_sum_squared_probs`` and ``rlcore.wpo_log_weights``). One forward pass.

    Returns:
        [B, n] float32, n = ``last`` or L - 1, aligned with ``token_logprobs``' columns.
    """
    n = input_ids.shape[1] - 1 if last is None else last
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=n + 1,
        use_cache=False,
    ).logits[:, :-1]  # [B, n, V]
    return log_sum_squared_probs(logits, temperature=temperature)  # [B, n]


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy (eval mode, no gradients): the reference model of full fine-tuning."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode (no dropout) with gradients off inside the block; afterwards every submodule
    gets its own training flag back (a submodule kept in eval on purpose stays so)."""
    training = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, flag in training:
            module.training = flag


def eos_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token id that ends a completion, EOS first, without duplicates.

    The tokenizer's EOS (plain text ends with it), the chat end-of-turn tokens it knows (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``: a chat completion ends with one), and the ids of
    ``generation_config.eos_token_id`` when given (pass ``model.generation_config``). For the tiny
    tokenizer: ``[1, 3]`` (``<|endoftext|>``, ``<|im_end|>``).
    """
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in CHAT_END_TOKENS if token in vocab]
    configured = getattr(generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else ([] if configured is None else [configured])
    if not ids:
        raise ValueError("the tokenizer has no EOS token and no generation config EOS ids were given")
    return list(dict.fromkeys(int(token_id) for token_id in ids))
