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

import os
import warnings

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlcore.toy import tiny_model_dir

TINY = "tiny"
# End-of-turn tokens of common chat formats (ChatML/Qwen, Llama 3, Gemma, Phi-3): a completion stops at them.
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
VALUE_HEAD_FILE = "value_head.safetensors"


def resolve_model(name_or_path: str) -> str:
    """``"tiny"`` -> the cached tiny model directory (built on first use); a directory -> its absolute path;
    anything else is returned unchanged and treated as a hub id by transformers."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"a model must be 'tiny', a directory or a hub id, got {name_or_path!r}")
    name_or_path = str(name_or_path)
    if name_or_path == TINY:
        return tiny_model_dir()
    if os.path.isdir(name_or_path):
        return os.path.abspath(name_or_path)
    return name_or_path


def _dtype_argument(dtype) -> str | torch.dtype:
    """What to pass as ``from_pretrained(dtype=...)``: None -> float32; "auto", dtype names, torch dtypes as given."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto" or (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)):
        return dtype
    raise ValueError(f"dtype must be None, 'auto', a torch dtype name such as 'bfloat16', or a torch.dtype; got {dtype!r}")


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
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path), trust_remote_code=trust_remote_code, **kwargs)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name_or_path!r} has neither a pad token nor an EOS token to pad with")
        warnings.warn(f"the tokenizer of {name_or_path!r} has no pad token; using its EOS token {tokenizer.eos_token!r}")
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


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where ``attention_mask`` is 1, per row: [B, T] -> [B] (left or right padding)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {tuple(attention_mask.shape)}")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [T]
    return (positions * attention_mask.long()).argmax(dim=1)  # [B]


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
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, T]")
    if not isinstance(getattr(model, "score", None), nn.Module):
        raise TypeError(f"{type(model).__name__} has no `score` head; expected a *ForSequenceClassification decoder model")
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
    last = last_token_index(attention_mask)  # [B]
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
        backbone = AutoModel.from_pretrained(path, **_pretrained_kwargs(dtype, trust_remote_code, attn_implementation, kwargs))
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] ids and mask (and optional [B, T] position ids) -> [B, T] values (the head's dtype)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state  # [B, T, H]
        return self.value_head(hidden).squeeze(-1)  # [B, T]


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
