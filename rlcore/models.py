"""Loading policies, reward models and value models through transformers.

Every loader takes ``"tiny"`` (the embedded default of ``rlcore.toy``), a local directory, or a hub id, and
returns plain transformers objects: what you load here is what ``from_pretrained`` gives you, with only
the settings RL needs made explicit (a pad token, the score head's pad id, the stop tokens).

Conventions:
- ``dtype=None`` loads float32 (train in float32 and use autocast for mixed precision); ``"auto"`` keeps
  the checkpoint's dtype; ``"bfloat16"``, ``"float16"``, ``"float32"`` or a ``torch.dtype`` cast to it.
- ``load_in_4bit=True`` quantises the linear layers to nf4 while loading (transformers'
  ``BitsAndBytesConfig``): each weight is read from the checkpoint and quantised in turn, so the full-precision
  model never exists in memory. The heads (``lm_head``, ``score``, ``value_head``) are not quantised.
- ``trust_remote_code`` is off unless asked for: a hub repository's Python code runs only on request.
- Sequence scores and values are read at the positions where ``attention_mask`` is 1, never by comparing
  ids with the pad id, so they stay correct when the pad token is also the EOS token.

Precision policy (``--dtype``, separate from ``--bf16`` autocast):
- the transformer's weights are held in ``--dtype`` as loaded (bfloat16 halves them), or in nf4 with
  ``--load_in_4bit``, whose matmuls run in ``--bnb_compute_dtype``;
- float32 whatever ``--dtype`` says: LoRA's A and B (small, and their updates are tiny next to the base
  weights: rounded to bfloat16 most would vanish), the score and value heads (new, small, and their outputs
  are the rewards and values), every log-probability, logsumexp, loss, advantage and statistic
  (``rlcore.logprobs`` accumulates in float32), and the RMSNorm arithmetic (transformers' norms compute in
  float32 and cast back; their weights are stored in ``--dtype``);
- optimizer state follows the parameters it updates: float32 for adapters and heads; with full fine-tuning
  in bfloat16 torch's AdamW keeps its moments in bfloat16 and updates smaller than a weight's bfloat16
  spacing are lost (prefer ``--master_weights float32``: AdamW on float32 copies,
  ``rlcore.optim.MasterWeightAdamW``; or float32 weights with ``--bf16`` autocast, or LoRA); ``--optim adamw_8bit``
  stores the moments in 8 bits (blockwise, dequantised to float32 for each update). float16 weights are
  refused for full fine-tuning (no loss scaling here) and allowed under LoRA.
"""

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaForCausalLM,
    Qwen2ForCausalLM,
)

from rlcore.last_layer import scoring_last_layer
from rlcore.logprobs import (
    chunked_logprobs,
    chunked_logprobs_and_entropy,
    entropy_from_logits,
    gather_logprobs,
    length_desensitized_logps,
    log_sum_squared_probs,
)
from rlcore.ops import last_valid_index
from rlcore.packing import DENSE_MASK_ATTENTION, PackedBatch, model_attention_mask, pack_batch, prompt_groups

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


LM_HEAD_CHUNK = 256
"""Positions per LM-head chunk of the log-prob passes: a [256, V] float32 buffer is 156 MB at V = 152k."""
HEAD_MODULES = ("lm_head", "score", "value_head")
"""Output layers kept in full precision when the body is quantised."""


def quantization_config(double_quant: bool = False, compute_dtype=None, device=None):
    """transformers' ``BitsAndBytesConfig`` for nf4 loading (QLoRA, Dettmers et al. 2023,
    https://arxiv.org/abs/2305.14314): every ``nn.Linear`` but the heads (``HEAD_MODULES``) is quantised as
    its weight is read. ``compute_dtype`` (a name or dtype) defaults to bfloat16 on CUDA, float32 elsewhere."""
    from transformers import BitsAndBytesConfig

    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype) if isinstance(compute_dtype, str) else compute_dtype,
        llm_int8_skip_modules=list(HEAD_MODULES),
    )


def load_options(config, prefix: str = "") -> dict:
    """The loading keyword arguments of a recipe's flags: ``--dtype``, ``--load_in_4bit``,
    ``--bnb_double_quant``, ``--bnb_compute_dtype`` (for ``load_policy``, ``load_reward_model``, ``ValueModel``).

    ``prefix="teacher_"`` reads a second model's own ``--teacher_dtype`` (None = ``--dtype``) and
    ``--teacher_load_in_4bit``, with the same ``--bnb_*`` settings."""
    return {
        "dtype": getattr(config, prefix + "dtype") or config.dtype,
        "load_in_4bit": getattr(config, prefix + "load_in_4bit"),
        "double_quant": config.bnb_double_quant,
        "compute_dtype": config.bnb_compute_dtype,
    }


def _pretrained_kwargs(
    dtype,
    trust_remote_code: bool,
    attn_implementation: str | None,
    kwargs: dict,
    quantize: tuple[bool, bool, object] = (False, False, None),
    device=None,
) -> dict:
    extra = {"dtype": _dtype_argument(dtype), "trust_remote_code": trust_remote_code, **kwargs}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    load_in_4bit, double_quant, compute_dtype = quantize
    if load_in_4bit:  # quantised as loaded, straight onto the device
        extra["quantization_config"] = quantization_config(double_quant, compute_dtype, device)
        extra["device_map"] = {"": torch.device(device or "cpu")}
    return extra


def _place(model: nn.Module, device, quantized: bool) -> nn.Module:
    if device is not None and not quantized:  # a quantised model was loaded onto its device
        model.to(device)
    return model


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
    load_in_4bit: bool = False,
    double_quant: bool = False,
    compute_dtype=None,
    **kwargs,
):
    """A causal LM and its tokenizer: ``(AutoModelForCausalLM.from_pretrained(...), load_tokenizer(...))``.

    ``load_in_4bit`` quantises the body to nf4 while loading (:func:`quantization_config`: ``double_quant``,
    ``compute_dtype``), the LM head kept in ``dtype``. Extra keyword arguments go to ``from_pretrained``
    (e.g. ``revision``). The model's ``config.pad_token_id`` is set to the tokenizer's when the checkpoint
    has none.
    """
    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    quantize = (load_in_4bit, double_quant, compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path, **_pretrained_kwargs(dtype, trust_remote_code, attn_implementation, kwargs, quantize, device)
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return _place(model, device, load_in_4bit), tokenizer


def load_reward_model(
    name_or_path: str = TINY,
    dtype=None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    load_in_4bit: bool = False,
    double_quant: bool = False,
    compute_dtype=None,
    **kwargs,
):
    """A one-output sequence classifier and its tokenizer, for reward modelling.

    Loaded with ``AutoModelForSequenceClassification(num_labels=1)``: a reward-model checkpoint keeps its
    score head; a causal-LM checkpoint (``"tiny"`` included) gets a freshly initialised ``score`` head
    (transformers logs which weights are new). The score head is float32 whatever ``dtype`` is, and is never
    quantised (``load_in_4bit``, as in :func:`load_policy`). ``config.pad_token_id`` is set to the tokenizer's
    pad id, so the model's own forward scores the last non-pad token; prefer ``sequence_scores``, which uses
    the mask and casts the hidden state to the head's dtype.
    """
    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    quantize = (load_in_4bit, double_quant, compute_dtype)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=1,
        **_pretrained_kwargs(dtype, trust_remote_code, attn_implementation, kwargs, quantize, device),
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.score.float()
    return _place(model, device, load_in_4bit), tokenizer


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score of each sequence: the one-output head at its last attended token.

    Args:
        model: a ``*ForSequenceClassification`` with ``num_labels=1`` and a ``score`` head (as decoder LMs
            in transformers have), e.g. from ``load_reward_model``.
        input_ids: [B, T] token ids, left or right padded.
        attention_mask: [B, T], 1 on real tokens.

    Returns:
        [B] scores (the head's dtype, float32 from ``load_reward_model``), differentiable.
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
    return model.score(last_hidden.to(model.score.weight.dtype)).squeeze(-1)  # [B]


def new_value_head(hidden_size: int, device: str | torch.device | None = None) -> nn.Linear:
    """``Linear(hidden_size, 1)`` in float32 with zero weight and bias: every value starts at 0."""
    head = nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def save_value_critic(
    critic: nn.Module, directory: str | os.PathLike, full_state: dict[str, torch.Tensor] | None = None
) -> None:
    """A ``ValueModel`` as ``save_pretrained`` writes it; a bare value head as ``value_head.safetensors``
    (tensors ``weight`` [1, H], ``bias`` [1]) in ``directory``. ``full_state``: the critic's tensors to write
    instead of its own (an FSDP2-sharded critic's, gathered by ``rlcore.distributed.full_state_dict``)."""
    if isinstance(critic, ValueModel):
        critic.save_pretrained(str(directory), full_state)
        return
    os.makedirs(directory, exist_ok=True)
    head = {name: tensor.detach().contiguous().cpu() for name, tensor in (full_state or critic.state_dict()).items()}
    save_file(head, os.path.join(directory, VALUE_HEAD_FILE))


class ValueModel(nn.Module):
    """A transformer backbone with a linear value head: V(s_t) for every position t, for PPO critics.

    ``values = head(backbone(input_ids).last_hidden_state)``, shape [B, T]: position t holds the value of
    the state "prompt and completion up to and including token t". The head is ``Linear(hidden, 1)``
    initialised to zero, so every value starts at 0 and the first advantages are the rewards themselves. The
    head is float32 whatever the backbone's dtype (the hidden state is cast to it).

    Saving: ``save_pretrained(path)`` writes the backbone with its own ``save_pretrained`` (so
    ``AutoModel.from_pretrained(path)`` loads it) and the head to ``path/value_head.safetensors``
    (tensors ``weight`` [1, H] and ``bias`` [1]); ``ValueModel.from_pretrained(path)`` loads both, and
    from any other checkpoint (``"tiny"``, a policy, a reward model) takes its backbone with a fresh head.
    """

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = new_value_head(hidden_size)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = TINY,
        dtype=None,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        load_in_4bit: bool = False,
        double_quant: bool = False,
        compute_dtype=None,
        **kwargs,
    ) -> "ValueModel":
        path = resolve_model(name_or_path)
        quantize = (load_in_4bit, double_quant, compute_dtype)
        backbone = AutoModel.from_pretrained(
            path, **_pretrained_kwargs(dtype, trust_remote_code, attn_implementation, kwargs, quantize, device)
        )
        model = cls(backbone, backbone.config.get_text_config().hidden_size)
        head_file = os.path.join(path, VALUE_HEAD_FILE)
        if os.path.isfile(head_file):
            model.value_head.load_state_dict(load_file(head_file))
        if device is not None:
            model.value_head.to(device)
        return model.to(device) if device is not None and not load_in_4bit else model

    def save_pretrained(self, path: str, full_state: dict[str, torch.Tensor] | None = None) -> None:
        """The backbone as ``save_pretrained`` writes it, the head as ``value_head.safetensors``; ``full_state``:
        this model's tensors (``backbone.*``, ``value_head.*``) to write instead of its own."""
        parts = {"backbone": None, "value_head": self.value_head.state_dict()}
        for prefix in parts if full_state is not None else ():
            parts[prefix] = {k[len(prefix) + 1 :]: v for k, v in full_state.items() if k.startswith(prefix + ".")}
        self.backbone.save_pretrained(path, state_dict=parts["backbone"])
        head = {name: tensor.detach().contiguous().cpu() for name, tensor in parts["value_head"].items()}
        save_file(head, os.path.join(path, VALUE_HEAD_FILE))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, T] ids and mask (and optional [B, T] position ids) -> [B, T] values (the head's dtype)."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # [B, T, H]
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # [B, T]


def new_critic(
    policy: nn.Module,
    on_policy: bool,
    value_model: str | None = None,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[str, nn.Module]:
    """PPO's value function, ``(name, module)``: ``("value_head", zero Linear(H, 1))`` for a head on the
    policy's own trunk (``on_policy``), else ``("value_model", ValueModel)``, a backbone from ``value_model``
    (default: where the policy started) with a zero head, trained in full: in ``dtype``, float32 for float16
    (no loss scaling here), with gradient checkpointing on request."""
    if on_policy:
        return "value_head", new_value_head(policy.config.get_text_config().hidden_size, device)
    dtype = "float32" if dtype == "float16" else dtype
    critic = ValueModel.from_pretrained(value_model or policy.name_or_path, dtype=dtype, device=device)
    if gradient_checkpointing:
        enable_gradient_checkpointing(critic)
    return "value_model", critic


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
# memory: gradient checkpointing, parameter counts


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each transformer layer's activations in the backward pass instead of keeping them, in place.

    Activation memory falls from every intermediate of every layer to one ``[B, T, H]`` input per layer,
    for one more forward pass of compute (Chen et al. 2016, https://arxiv.org/abs/1604.06174). Applied
    to every transformers model inside ``model`` (a causal LM, a reward model, a ``ValueModel``'s backbone)
    with non-reentrant checkpointing (``torch.utils.checkpoint(use_reentrant=False)``), which needs no input
    that requires grad: it works with a frozen base, LoRA adapters and a 4-bit base. transformers
    checkpoints only in training mode; reference and evaluation passes (no gradient) are unchanged.
    Gradients are those of the plain model (the same operations run again on the same inputs).
    """
    from transformers import PreTrainedModel

    found = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing]
    if not found:
        raise ValueError(f"{type(model).__name__} holds no transformers model that supports gradient checkpointing")
    for module in found:
        module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def parameter_counts(*modules: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters of the modules together, each shared tensor counted once.

    A 4-bit weight counts its logical size (``quant_state.shape``), not its packed bytes.
    """
    seen, trainable, total = set(), 0, 0
    for module in modules:
        for parameter in module.parameters():
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            quant_state = getattr(parameter, "quant_state", None)
            count = quant_state.shape.numel() if quant_state is not None else parameter.numel()
            total += count
            trainable += count if parameter.requires_grad else 0
    return trainable, total


def describe_parameters(*modules: nn.Module) -> str:
    """One line: ``parameters: 1.05M trainable of 997.1K total (100.00%)``."""
    trainable, total = parameter_counts(*modules)

    def short(n: int) -> str:
        for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= size:
                return f"{n / size:.2f}{unit}"
        return str(n)

    return f"parameters: {short(trainable)} trainable of {short(total)} total ({100 * trainable / max(1, total):.2f}%)"


# ----------------------------------------------------------------------------------------------------------
# log-probabilities of tokens under a causal LM


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] positions that count real tokens only: left padding does not shift them (as in generation);
    for right padding they equal ``arange(L)`` on the real tokens."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def chunked_head_supported(model: nn.Module) -> bool:
    """Whether :func:`position_logprobs` can score ``model`` from its hidden states: a transformers causal LM
    whose output layer is a plain ``nn.Linear`` and whose logits are not rescaled after it (no
    ``final_logit_softcapping`` or ``logit_scale``). Others take the full-logits path."""
    from transformers import PreTrainedModel

    inner = _unwrapped(model)
    if not isinstance(inner, PreTrainedModel) or not hasattr(inner, "get_decoder"):
        return False
    head, text_config = inner.get_output_embeddings(), inner.config.get_text_config()
    rescaled = getattr(text_config, "final_logit_softcapping", None) or getattr(text_config, "logit_scale", None)
    return type(head) is nn.Linear and not rescaled and inner.get_decoder() is not None


def position_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    positions: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = LM_HEAD_CHUNK,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_argmax: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs of ``targets`` at chosen positions, from the body's hidden states and a chunked LM head.

        logp_n = log softmax(W h[row_n, col_n] / temperature)[target_n]        (W: the LM head, [V, H])

    Contract with wrappers (DDP, FSDP2, ``torch.compile``): ``model(...)``, the top-level module as given, is
    called once, so its forward hooks run as for any forward pass, with ``logits_to_keep`` an empty index:
    its LM head runs on no position. The decoder's final hidden states ``[B, L, H]`` are read by a forward hook
    on the unwrapped model's ``get_decoder()``; the selected ``[N, H]`` go through ``chunked_logprobs`` with the
    LM head's weight, so no ``[B, L, V]`` (nor ``[N, V]``) logits exist in the forward or the backward pass.
    The LM head's gradient reaches its weight (tied embeddings included) as in the plain forward. Needs
    :func:`chunked_head_supported`.

    Args:
        input_ids: [B, L]; attention_mask: [B, L] or None; position_ids: [B, L] or None (as the model takes).
        positions: [N, 2] (row, column) of the hidden states that score the targets (column t predicts t + 1).
        targets: [N] token ids.
        chunk_size: positions per LM-head chunk.
        with_entropy, with_argmax: also return, detached, the entropy [N] and whether the target is the
            argmax [N] (one more LM-head pass per chunk, without gradient).

    Returns:
        (logp [N] float32 with gradient, {"entropy": [N], "argmax": [N] bool} as asked).
    """
    hidden = body_hidden_states(model, input_ids, attention_mask, position_ids, positions=positions)  # [N, H]
    return _head_logprobs(model, hidden, targets, chunk_size, temperature, with_entropy, with_argmax)


def body_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states (after the final norm) from one call of the top-level ``model``, whose LM head runs
    on no position (``logits_to_keep`` an empty index); read by a forward hook on the decoder.

    Returns ``[B, L, H]``, or with ``positions`` ([N, 2] (row, column)) the ``[N, H]`` states there. Those are
    computed with the last decoder layer at the N positions only where :func:`scored_layer_unsupported` allows
    (``rlcore.last_layer``: the same values, less work), else read from the full ``[B, L, H]``.
    """
    if not chunked_head_supported(model):
        raise ValueError(f"{type(_unwrapped(model)).__name__} cannot be scored from hidden states; use chunk_size=0")
    captured: list[torch.Tensor] = []
    decoder = _unwrapped(model).get_decoder()
    scored_only = positions is not None and len(positions) > 0 and scored_layer_unsupported(model) is None
    hook = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        with scoring_last_layer(decoder.layers[-1], *positions.unbind(1)) if scored_only else contextlib.nullcontext():
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device),
                use_cache=False,
            )
    finally:
        hook.remove()
    if scored_only:
        return captured[0].squeeze(0)  # [N, H]
    return captured[0] if positions is None else captured[0][positions[:, 0], positions[:, 1]]


SCORED_LAYER_MODELS = (LlamaForCausalLM, Qwen2ForCausalLM)


def _fsdp_hook(hook) -> bool:
    """Whether a module hook is FSDP2's own (a method of its per-module state: gathers the parameters before the
    forward, frees them after, whatever the output's shape)."""
    return type(getattr(hook, "__self__", None)).__module__.startswith("torch.distributed.fsdp")


def scored_layer_unsupported(model: nn.Module) -> str | None:
    """Why :func:`body_hidden_states` cannot run ``model``'s last decoder layer at the scored positions only
    (``rlcore.last_layer``), or None when it can: a Llama-layout model (``SCORED_LAYER_MODELS``, any
    ``nn.Module`` projections: LoRA and quantised layers too) with dense-mask attention (eager, sdpa), not
    compiled (a swapped ``forward`` would recompile it), and a last layer without forward hooks other than
    FSDP2's (another hook could expect the ``[B, L, E]`` output), its own ``forward`` attribute, gradient
    checkpointing in training, attention dropout in training or a sliding window."""
    wrapped, inner = model, _unwrapped(model)
    while wrapped is not inner:
        if hasattr(wrapped, "_orig_mod"):
            return "the model is compiled"
        wrapped = getattr(wrapped, "module", None) or wrapped._orig_mod
    if not isinstance(inner, SCORED_LAYER_MODELS):  # FSDP2 subclasses them (FSDPLlamaForCausalLM)
        return f"{type(inner).__name__} is not one of {[cls.__name__ for cls in SCORED_LAYER_MODELS]}"
    if inner.config._attn_implementation not in DENSE_MASK_ATTENTION:
        return f"attention implementation {inner.config._attn_implementation!r} takes no dense mask"
    layer = inner.get_decoder().layers[-1]
    hooks = [*layer._forward_hooks.values(), *layer._forward_pre_hooks.values()]
    if any(not _fsdp_hook(hook) for hook in hooks) or "forward" in layer.__dict__:
        return "the last decoder layer has forward hooks or its own forward"
    if layer.training and (getattr(layer, "gradient_checkpointing", False) or layer.self_attn.attention_dropout):
        return "the last decoder layer checkpoints its activations or drops attention weights"
    if getattr(layer.self_attn, "sliding_window", None) is not None:
        return "the last decoder layer attends through a sliding window"
    return None


def shares_prompts(model: nn.Module) -> bool:
    """Whether prefix sharing can run on ``model``: its attention implementation takes a dense 4D mask (sdpa,
    eager; ``rlcore.packing.DENSE_MASK_ATTENTION``). Elsewhere (flash_attention_2) the forwards asked to share
    prompts run the padded batch instead: the same values, without the saving."""
    config = getattr(_unwrapped(model), "config", None)
    return getattr(config, "_attn_implementation", None) in DENSE_MASK_ATTENTION


PACKED_ROW_WIDTHS = 2
"""Padding-free rows under dense attention hold up to this many widths of the padded batch (:func:`packed_batch`)."""


def packed_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
    groups: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    padding_free: bool = False,
) -> PackedBatch:
    """``rlcore.packing.pack_batch`` for ``model``, moved to the batch's device.

    Padding-free rows hold at most ``PACKED_ROW_WIDTHS`` (2) times the padded batch's width T, or the longest
    packed group if longer, where attention is dense (sdpa, eager: a packed row's attention costs its length
    squared, so one long row would cost more than the padded batch); one row where the implementation runs
    variable-length attention from the position ids (flash_attention_2). Two widths: on the toy DPO batches
    the rows then carry little padding while attention stays a small part of the step; forward + backward
    of the tiny / 20M model, against the padded batch (``benchmarks/prefix_sharing.py --cases "dpo toy"``,
    docs/results.md): prefix sharing alone 0.62-0.67 / 0.64-0.65, with padding-free rows of 1 width 0.63 /
    0.65 (no two groups fit), 2 widths 0.55-0.56 / 0.49-0.55, 4 widths 0.59 / 0.56.
    """
    row_length = PACKED_ROW_WIDTHS * input_ids.shape[1] if shares_prompts(model) else None  # dense attention
    packed = pack_batch(input_ids, attention_mask, score_mask, groups, prompt_mask, padding_free, row_length)
    return packed.to(input_ids.device)


def packed_inputs(model: nn.Module, packed: PackedBatch) -> dict[str, torch.Tensor | None]:
    """``input_ids``, ``attention_mask`` (the block mask in the form the model's attention implementation takes,
    ``rlcore.packing.model_attention_mask``) and ``position_ids`` of a packed batch, for ``model(**inputs)``."""
    inner = _unwrapped(model)
    dtype = inner.get_input_embeddings().weight.dtype
    mask = model_attention_mask(inner.config._attn_implementation, packed.segment_ids, packed.prefix_ids, dtype)
    return {"input_ids": packed.input_ids, "attention_mask": mask, "position_ids": packed.position_ids}


def packed_logprobs(
    model: nn.Module,
    packed: PackedBatch,
    chunk_size: int = LM_HEAD_CHUNK,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    with_argmax: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs of the scored tokens of a packed batch (``rlcore.packing.pack_batch``): one call of the
    top-level ``model`` on the packed rows with their block attention mask and position ids.

        logp_n = log softmax(logits(packed row, column of positions_n) / temperature)[targets_n]

    Each equals the value of the padded forward: a token sees exactly the tokens it saw in its own row, at
    the same positions (``rlcore.packing``). The mask takes the form the model's attention implementation
    needs (``rlcore.packing.model_attention_mask``). With ``chunk_size > 0`` the LM head runs chunk-wise
    at the scored positions only (:func:`position_logprobs`); with 0 (or ``entropy_grad``) the model's own
    logits are read at them.

    Returns:
        (logp [N] float32 with gradient, {"entropy": [N] (with gradient if entropy_grad), "argmax": [N] bool} as asked).
    """
    if chunk_size and not (with_entropy and entropy_grad) and chunked_head_supported(model):
        return position_logprobs(
            model,
            **packed_inputs(model, packed),
            positions=packed.positions,
            targets=packed.targets,
            chunk_size=chunk_size,
            temperature=temperature,
            with_entropy=with_entropy,
            with_argmax=with_argmax,
        )
    rows, columns = packed.positions.unbind(1)  # [N] each
    logits = model(**packed_inputs(model, packed), use_cache=False).logits[rows, columns]  # [N, V]
    extras: dict[str, torch.Tensor] = {}
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            extras["entropy"] = entropy_from_logits(logits if entropy_grad else logits.detach(), temperature)
    if with_argmax:
        extras["argmax"] = logits.detach().argmax(-1) == packed.targets
    return gather_logprobs(logits, packed.targets, temperature=temperature), extras


def _head_logprobs(
    model: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    temperature: float,
    with_entropy: bool = False,
    with_argmax: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[N, H] hidden states, [N] targets -> ([N] log-probs through the LM head chunk-wise, detached extras)."""
    head = _unwrapped(model).get_output_embeddings()
    hidden = hidden.to(head.weight.dtype)
    if not (with_entropy or with_argmax):
        return chunked_logprobs(hidden, head.weight, targets, chunk_size, temperature, head.bias), {}  # [N]
    # the statistics come from the same chunks of logits as the log-probs: one LM-head pass, not two
    logp, entropy, argmax = chunked_logprobs_and_entropy(
        hidden, head.weight, targets, chunk_size, temperature, head.bias
    )
    extras = {"entropy": entropy} if with_entropy else {}
    if with_argmax:
        extras["argmax"] = argmax == targets
    return logp, extras


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    last: int | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_size: int = LM_HEAD_CHUNK,
    share_prompts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the next tokens of a batch (and, on request, their entropies).

        logp[b, t] = log softmax(logits(input_ids_b[: t + 1]) / temperature)[input_ids_b[t + 1]]

    for t over the last ``last`` positions that predict a token (all T - 1 of them when ``last`` is None).
    One forward pass. With ``chunk_size > 0`` (and a model :func:`chunked_head_supported`) the LM head is
    applied chunk-wise to the hidden states of those positions (:func:`position_logprobs`): no ``[B, n, V]``
    logits anywhere. With ``chunk_size=0`` the model's own forward computes the logits of the last
    ``last + 1`` positions (``logits_to_keep``) and ``gather_logprobs`` reads them. Both paths call the
    top-level ``model`` once. Position ids count real tokens (:func:`position_ids_from_mask`), so left- and
    right-padded rows give the log-probs the model gave during generation.

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids, logits_to_keep)``), or a wrapper
            of one (DDP, ``torch.compile``).
        input_ids, attention_mask: [B, L] ids and 1-on-real-token mask.
        last: how many of the final tokens to score (the completion length T of a left-padded prompt
            followed by a T-column completion), or None for every token after the first.
        temperature: divides the logits (use the sampling temperature for a sampled completion).
        with_entropy: also return the per-token entropy, computed without gradient (a metric).
        entropy_grad: give the entropy its gradient (an entropy bonus in the loss); autograd then keeps
            a softmax of the scored positions, [B, n, V] floats.
        chunk_size: positions per LM-head chunk; 0 = the full-logits path (also taken with ``entropy_grad``,
            whose gradient needs the softmax of every scored position).
        share_prompts: prefix sharing (where :func:`shares_prompts`; the padded batch otherwise). Rows with
            the same prompt (the first L - n columns: the G completions of a rollout's prompt) become one
            sequence ``[prompt, completion_1, ..., completion_G]``
            (``rlcore.packing.prompt_groups``, :func:`packed_logprobs`), the prompt computed once; only the
            completions' real tokens are scored (zero elsewhere), each equal to its unshared value.

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
    if share_prompts and shares_prompts(model):  # prefix sharing: prompt columns shared, completion columns scored
        batch, length = input_ids.shape
        prompt_mask, score_mask = attention_mask.clone(), attention_mask.clone()
        prompt_mask[:, length - n :], score_mask[:, : length - n] = 0, 0
        groups = prompt_groups(input_ids, prompt_mask)  # [B]
        packed = packed_batch(model, input_ids, attention_mask, score_mask, groups, prompt_mask)
        logp, extras = packed_logprobs(model, packed, chunk_size, temperature, with_entropy, entropy_grad)
        entropy = packed.unpack(extras["entropy"], (batch, n), length - n) if with_entropy else None
        return packed.unpack(logp, (batch, n), length - n), entropy
    position_ids = position_ids_from_mask(attention_mask)
    if chunk_size and not (with_entropy and entropy_grad) and chunked_head_supported(model):
        batch, length = input_ids.shape
        rows = torch.arange(batch, device=input_ids.device).repeat_interleave(n)  # [B*n]
        columns = torch.arange(length - n - 1, length - 1, device=input_ids.device).repeat(batch)  # [B*n]
        logp, extras = position_logprobs(
            model,
            input_ids,
            attention_mask,
            position_ids,
            positions=torch.stack([rows, columns], dim=1),
            targets=input_ids[:, -n:].reshape(-1),
            chunk_size=chunk_size,
            temperature=temperature,
            with_entropy=with_entropy,
        )
        entropy = extras["entropy"].view(batch, n) if with_entropy else None
        return logp.view(batch, n), entropy
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=n + 1,
        use_cache=False,
    ).logits[:, :-1]  # [B, n, V]: column j predicts token L - n + j
    logp = gather_logprobs(logits, input_ids[:, -n:], temperature=temperature)  # [B, n]
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits if entropy_grad else logits.detach(), temperature=temperature)
    return logp, entropy


def token_logprobs_and_values(
    model: nn.Module,
    value_head: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    last: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = LM_HEAD_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The value function as a head on the policy's own trunk: log-probs and values from one forward pass.

        h = body(input_ids)[:, L-n-1 : L-1]                 # [B, n, H]: the states before the n scored tokens
        logp = log softmax(W h / temperature)[next token],    values = value_head(h)

    Column j of both scores token ``L - n + j``: ``logp`` as :func:`token_logprobs`, ``values`` as
    :func:`completion_values` (V of the state before the token). The value loss's gradient reaches the
    trunk (and its LoRA adapters) as the policy loss's does: a shared-parameter actor-critic.

    Returns:
        (logp [B, n] float32, entropy [B, n] detached or None, values [B, n] float32), with gradients.
    """
    if not 0 < last < input_ids.shape[1]:
        raise ValueError(f"last must be in [1, {input_ids.shape[1] - 1}], got {last}")
    hidden = body_hidden_states(model, input_ids, attention_mask, position_ids_from_mask(attention_mask))
    states = hidden[:, -last - 1 : -1]  # [B, n, H]
    batch, n = states.shape[:2]
    logp, extras = _head_logprobs(
        model, states.reshape(batch * n, -1), input_ids[:, -n:].reshape(-1), chunk_size, temperature, with_entropy
    )
    values = value_head(states.to(value_head.weight.dtype)).squeeze(-1).float()  # [B, n]
    entropy = extras["entropy"].view(batch, n) if with_entropy else None
    return logp.view(batch, n), entropy, values


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    average: bool = False,
    temperature: float = 1.0,
    chunk_size: int = LM_HEAD_CHUNK,
    share_prompts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the completions of a batch: summed (or averaged) over their tokens, and per token.

        logp(y | x) = sum_t m_t log p(y_t | x, y_<t)         (average: divided by sum_t m_t)

    Args:
        input_ids, attention_mask: [B, L] prompt + completion ids, any padding.
        completion_mask: [B, n], 1 on the completion tokens among the last n tokens of each row: n = L - 1
            for a right-padded ``collate_preference`` batch (its ``completion_mask[:, 1:]``), n = T for a
            left-padded prompt followed by a T-column completion (``Rollout.completion_mask``).
        average: divide by the completion's token count (IPO's length-averaged log-probs).
        chunk_size: LM-head chunk of :func:`token_logprobs` (0 = full logits).
        share_prompts: prefix sharing across rows with the same first L - n columns (:func:`token_logprobs`).

    Returns:
        ([B] sequence log-probs, [B, n] per-token log-probs, zero outside the completion), with gradient.
    """
    logp, _ = token_logprobs(
        model,
        input_ids,
        attention_mask,
        last=completion_mask.shape[1],
        temperature=temperature,
        chunk_size=chunk_size,
        share_prompts=share_prompts,
    )
    token_logp = logp * completion_mask  # [B, n]
    summed = token_logp.sum(dim=1)  # [B]
    return (summed / completion_mask.sum(dim=1).clamp(min=1) if average else summed), token_logp


def pair_logprobs(
    model,
    batch: dict[str, torch.Tensor],
    chunk_size: int = 0,
    ld_alpha: float = 1.0,
    shared_prefix: bool = False,
    padding_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion log-probs of a ``data.collate_preference`` batch (chosen rows, then rejected), one forward pass.

    ``shared_prefix``: each pair is one sequence ``[prompt, chosen, rejected]``, the prompt computed once
    (prefix sharing; only with an attention implementation that takes a dense mask, :func:`shares_prompts`);
    ``padding_free``: the sequences end to end (:func:`packed_batch`). Both give the same values and gradients
    as the padded forward (:func:`packed_logprobs`); they compute only the completion tokens' log-probs.

    Returns ([2B] summed log-probs, [2B, T-1] per token, zero outside the completions). With ``ld_alpha`` < 1
    the sums are LD-DPO's (``rlcore.logprobs.length_desensitized_logps``: the tail beyond the shorter
    completion weighs ld_alpha).
    """
    mask = batch["completion_mask"][:, 1:]  # [2B, T-1]
    shared_prefix = shared_prefix and shares_prompts(model)
    if shared_prefix or padding_free:
        input_ids, attention_mask, completion_mask = (
            batch[k] for k in ("input_ids", "attention_mask", "completion_mask")
        )
        pairs = len(input_ids) // 2
        groups = torch.arange(len(input_ids), device=input_ids.device) % pairs if shared_prefix else None
        prompt_mask = attention_mask * (1 - completion_mask) if shared_prefix else None
        scored = completion_mask * (torch.arange(input_ids.shape[1], device=input_ids.device) > 0)  # as mask
        packed = packed_batch(model, input_ids, attention_mask, scored, groups, prompt_mask, padding_free)
        logp, _ = packed_logprobs(model, packed, chunk_size)
        token_logp = packed.unpack(logp, tuple(mask.shape), column_offset=1)  # [2B, T-1]
        logps = token_logp.sum(dim=1)  # [2B]
    else:
        logps, token_logp = sequence_logprobs(
            model, batch["input_ids"], batch["attention_mask"], mask, chunk_size=chunk_size
        )
    if ld_alpha < 1.0:
        (chosen_logp, rejected_logp), (chosen_mask, rejected_mask) = token_logp.chunk(2), mask.chunk(2)
        logps = torch.cat(length_desensitized_logps(chosen_logp, chosen_mask, rejected_logp, rejected_mask, ld_alpha))
    return logps, token_logp


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
