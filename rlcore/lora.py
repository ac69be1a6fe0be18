"""LoRA and QLoRA in plain torch: low-rank adapters on a frozen (optionally 4-bit) base model.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a linear layer's weight W [out, in] and
learns a low-rank update beside it:

    h = W x + (alpha / r) * B A x        A: [r, in] (kaiming-uniform), B: [out, r] (zeros)

so that training starts exactly at the base model (B = 0) and only r * (in + out) numbers per layer are
trained. rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by alpha / sqrt(r) instead,
which keeps the update's size stable as r grows. QLoRA (Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314) stores W in 4-bit NormalFloat (nf4, one absmax per block of 64 weights,
through bitsandbytes) and keeps A and B in float32.

Two consequences shape the post-training recipes:
- the reference model of DPO/PPO/GRPO is free: it is the same model with the adapters switched off
  (``disable_adapters`` / ``reference_context``), so no second copy of the weights is held;
- a trained policy is saved either as an adapter (``save_adapter``, the files ``peft.PeftModel`` reads)
  or as a standalone transformers model with the update merged in (``export_merged``);
- one frozen base can hold several named adapters, one active per forward pass (``use_adapter``): the
  policy (``"default"``) beside a reward model's adapter, each saved and loaded in PEFT's multi-adapter
  layout (``save_adapters``/``load_adapters``: the default adapter at the top, the others in subdirectories).

Typical use, right after loading::

    model = prepare_model(model, lora_r=16, lora_alpha=32, load_in_4bit=True)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    with reference_context(model, ref_model=None) as reference:
        ref_logits = reference(input_ids).logits

Linear layers are matched by name as PEFT matches them: a list of suffixes (``"q_proj"`` matches
``model.layers.0.self_attn.q_proj``), one regular expression that must match the whole name, or
``"all-linear"``: every linear layer but the output head (``lm_head``, a classifier's ``score``), for any
architecture (OPT's ``out_proj``/``fc1``/``fc2``, GPT-NeoX's ``query_key_value``, GPT-2's ``c_attn``...).
GPT-2's layers are transformers' ``Conv1D`` (a linear layer storing W transposed, [in, out]); they are
wrapped as well, and their adapters saved with ``fan_in_fan_out`` as PEFT saves them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "DEFAULT_ADAPTER",
    "DEFAULT_TARGETS",
    "LoRAAdapter",
    "LoRALinear",
    "adapter_names",
    "apply_lora",
    "disable_adapters",
    "export_merged",
    "has_lora",
    "load_adapter",
    "load_adapters",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "prepare_model",
    "quantize_4bit",
    "read_adapter_config",
    "read_adapter_heads",
    "reference_context",
    "save_adapter",
    "save_adapters",
    "unmerge_lora",
    "use_adapter",
]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The attention and MLP projections of Llama/Qwen/Mistral-style models."""
ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer but the output head
HEAD_NAMES = ("lm_head", "score", "classifier")  # top-level output heads that "all-linear" leaves out

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
PEFT_KEY_PREFIX = "base_model.model."
DEFAULT_ADAPTER = "default"  # PEFT's name for the first adapter, saved at the top of an adapter directory


class LoRAAdapter(nn.Module):
    """One named low-rank update ``scaling * B (A dropout(x))``: ``lora_A`` [r, in], ``lora_B`` [out, r], float32.

    Initialisation as PEFT's: A kaiming-uniform (a = sqrt(5), as ``nn.Linear``), B zeros. ``scaling`` is
    alpha / r, or alpha / sqrt(r) with rsLoRA.
    """

    def __init__(
        self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, use_rslora: bool, device
    ):
        super().__init__()
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., out] float32 update."""
        hidden = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # [..., r]
        return F.linear(hidden, self.lora_B) * self.scaling  # [..., out]

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense matrix, ``scaling * B @ A``: [out, in], float32."""
        return self.scaling * (self.lora_B @ self.lora_A)


class LoRALinear(nn.Module):
    """A frozen linear layer plus named low-rank updates, one active at a time: ``base(x) + update_active(x)``.

    ``base`` is an ``nn.Linear``, a GPT-2 ``Conv1D`` or a ``bitsandbytes.nn.Linear4bit``; ``adapters`` maps
    a name to a :class:`LoRAAdapter` (float32 whatever the base dtype: the input is cast to float32 for the
    update and the update back to the base output's dtype, as PEFT does). The adapter named ``active``
    (``"default"`` unless ``use_adapter`` says otherwise) runs; a layer without it computes ``base(x)``.
    ``lora_A``, ``lora_B``, ``r``, ``alpha``, ``scaling``, ``use_rslora`` and ``dropout`` are those of
    the default adapter (the one a single-adapter model has), and ``merge``/``unmerge`` fold it in and out.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_name: str = DEFAULT_ADAPTER,
    ):
        super().__init__()
        self.base = base
        self.fan_in_fan_out = isinstance(base, Conv1D)  # GPT-2's Conv1D stores W as [in, out]
        self.active = DEFAULT_ADAPTER  # the adapter forward() runs (use_adapter switches it)
        self.merged = False  # the default adapter's update is currently added into base.weight
        self.adapters_enabled = True  # False inside disable_adapters(): forward = base(x)
        self.adapters = nn.ModuleDict()
        self.add(adapter_name, r, alpha, dropout, use_rslora)
        if _is_4bit(base):
            _keep_standard_4bit_path(base)

    def add(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        """Add a new adapter called ``name`` beside the others (B = 0: the layer's outputs do not change)."""
        if name in self.adapters or self.merged:
            raise ValueError(f"cannot add adapter {name!r}: the layer has one of that name, or is merged")
        base = self.base
        in_features, out_features = (base.nx, base.nf) if self.fan_in_fan_out else (base.in_features, base.out_features)
        device = base.weight.device
        self.adapters[name] = LoRAAdapter(in_features, out_features, r, alpha, dropout, use_rslora, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # [..., out]
        if self.merged or not self.adapters_enabled or self.active not in self.adapters:
            return out
        return out + self.adapters[self.active](x).to(out.dtype)

    @property
    def default(self) -> LoRAAdapter:
        return self.adapters[DEFAULT_ADAPTER]

    lora_A = property(lambda self: self.default.lora_A)
    lora_B = property(lambda self: self.default.lora_B)
    r = property(lambda self: self.default.r)
    alpha = property(lambda self: self.default.alpha)
    scaling = property(lambda self: self.default.scaling)
    use_rslora = property(lambda self: self.default.use_rslora)
    dropout = property(lambda self: self.default.dropout)

    def delta_weight(self, name: str = DEFAULT_ADAPTER) -> torch.Tensor:
        """The update of adapter ``name`` as a dense matrix, ``scaling * B @ A``: [out, in], float32."""
        return self.adapters[name].delta_weight()

    def delta_in_base_layout(self, name: str = DEFAULT_ADAPTER) -> torch.Tensor:
        """:meth:`delta_weight` laid out as ``base.weight``: [out, in], or [in, out] for a ``Conv1D`` base."""
        delta = self.delta_weight(name)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        """Add the default update into ``base.weight`` (forward is then one matmul); a no-op if already merged."""
        if not self.merged:
            with torch.no_grad():
                self._float_base_weight().add_(self.delta_in_base_layout().to(self.base.weight.dtype))
            self.merged = True

    def unmerge(self) -> None:
        """Subtract the update from ``base.weight`` again (exact up to rounding in the base dtype)."""
        if self.merged:
            with torch.no_grad():
                self._float_base_weight().sub_(self.delta_in_base_layout().to(self.base.weight.dtype))
            self.merged = False

    def _float_base_weight(self) -> torch.Tensor:
        if _is_4bit(self.base):
            raise ValueError(
                "cannot merge LoRA into a 4-bit base weight without re-quantising it (lossy); "
                "use export_merged() to write a float model with the update merged"
            )
        if DEFAULT_ADAPTER not in self.adapters or len(self.adapters) > 1:
            raise ValueError(
                f"cannot merge: this layer holds the adapters {list(self.adapters)}; merging one would change "
                "what the others compute (use export_merged() to write the default adapter merged)"
            )
        return self.base.weight

    def extra_repr(self) -> str:
        described = ", ".join(f"{name}: r={a.r}, scaling={a.scaling:.4g}" for name, a in self.adapters.items())
        return f"adapters=({described}), active={self.active}, merged={self.merged}"


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: a regex must match the whole name; a suffix must match whole dotted components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith("." + target) for target in targets)


def _is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (4-bit layers included) or transformers' ``Conv1D`` (GPT-2)."""
    return isinstance(module, (nn.Linear, Conv1D))


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear layer of ``model``; a layer already wrapped in ``LoRALinear`` (for
    another adapter) appears as the wrapper, not as its ``.base``."""
    wrapped = {name for name, _ in _lora_layers(model)}
    return [
        (name, module)
        for name, module in model.named_modules()
        if name in wrapped or (_is_linear(module) and name.rpartition(".")[0] not in wrapped)
    ]


def _all_linear_names(model: nn.Module) -> list[str]:
    """Names of every linear layer of ``model`` but its output head (the output embeddings, and any top-level
    ``lm_head``/``score``/``classifier``): the layers PEFT's ``"all-linear"`` picks."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in _linear_layers(model) if module is not head and name not in HEAD_NAMES]


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def _require_lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters: call apply_lora() or prepare_model() first")
    return layers


def _adapter_layers(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> list[tuple[str, LoRAAdapter]]:
    """(layer name, adapter) of every layer holding the adapter called ``adapter_name``, in module order."""
    _require_lora_layers(model)
    found = [
        (name, layer.adapters[adapter_name]) for name, layer in _lora_layers(model) if adapter_name in layer.adapters
    ]
    if not found:
        names = adapter_names(model)
        raise ValueError(f"{type(model).__name__} has no LoRA adapter named {adapter_name!r}; it has {names}")
    return found


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters ``model`` holds, in the order they were added (``"default"`` first)."""
    return list(dict.fromkeys(name for _, layer in _lora_layers(model) for name in layer.adapters))


def has_lora(model: nn.Module) -> bool:
    """Whether ``apply_lora`` has wrapped any layer of ``model``."""
    return bool(_lora_layers(model))


def _check_untied(model: nn.Module, chosen: list[tuple[str, nn.Linear]], purpose: str) -> None:
    """Refuse layers whose weight is shared with another module (e.g. lm_head tied to the embeddings)."""
    names_by_parameter = defaultdict(list)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_by_parameter[id(parameter)].append(name)
    for name, linear in chosen:
        shared = names_by_parameter[id(linear.weight)]
        if len(shared) > 1:
            raise ValueError(
                f"cannot {purpose} {name!r}: its weight is tied to {[n for n in shared if n != name + '.weight']} "
                "(tie_word_embeddings); leave it out or untie the weights first"
            )


def _replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new_module)


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    targets: str | Sequence[str] | None = None,
    use_rslora: bool = False,
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Wrap the target linear layers of ``model`` in ``LoRALinear`` and freeze everything else, in place.

    Each chosen W (an ``nn.Linear`` or a 4-bit ``bitsandbytes.nn.Linear4bit``) becomes
    ``h = W x + (alpha / r) B A x`` (Hu et al. 2021, https://arxiv.org/abs/2106.09685), with scaling
    alpha / sqrt(r) when ``use_rslora`` (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732). B starts at
    zero, so the model's outputs are unchanged until the first optimizer step.

    Args:
        model: a causal LM (or any module); modified in place and returned.
        r: rank of the update (> 0).
        alpha: numerator of the scaling.
        dropout: dropout probability on the adapter's input (the base path has none), in [0, 1).
        targets: module-name suffixes (``["q_proj", "v_proj"]``), one regex matched against the whole
            module name (``r".*\\.layers\\.[0-3]\\..*proj"``) or ``"all-linear"`` (every linear layer but the
            output head); default ``DEFAULT_TARGETS``.
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
        adapter_name: a model that already has adapters gets one more under this name (each adapter has
            its own r, alpha, dropout and targets; layers wrapped before keep their adapters and their
            ``requires_grad``); ``use_adapter(model, adapter_name)`` runs it.

    Returns:
        ``model``, whose trainable parameters are now the adapters (``lora_parameters(model, adapter_name)``).
    """
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if adapter_name in adapter_names(model):
        raise ValueError(
            f"model already has LoRA adapters named {adapter_name!r}; apply_lora() adds each adapter name once"
        )
    if not isinstance(adapter_name, str) or not re.fullmatch(r"[\w.-]+", adapter_name) or adapter_name == ".":
        raise ValueError(f"adapter_name must be a plain name (letters, digits, _ - .), got {adapter_name!r}")
    targets = DEFAULT_TARGETS if targets is None else targets
    if not isinstance(targets, str) and (not targets or not all(isinstance(t, str) for t in targets)):
        raise ValueError(f"targets must be a regex string or a non-empty list of name suffixes, got {targets!r}")

    wrapped = dict(_lora_layers(model))  # layers wrapped for other adapters: they get one more
    linears = _linear_layers(model)
    if targets == ALL_LINEAR:
        names = set(_all_linear_names(model))
        chosen = [(name, linear) for name, linear in linears if name in names]
    else:
        chosen = [(name, linear) for name, linear in linears if _matches(name, targets)]
    if not chosen:
        available = [name for name, _ in linears]
        raise ValueError(
            f"LoRA targets {targets!r} matched no nn.Linear in {type(model).__name__}; "
            f"{len(available)} Linear layers exist, e.g. {available[:8]}"
        )
    _check_untied(model, [(n, m.base if n in wrapped else m) for n, m in chosen], "add LoRA to")

    if not wrapped:
        model.requires_grad_(False)
    for name, linear in chosen:
        if name in wrapped:
            wrapped[name].add(adapter_name, r, alpha, dropout=dropout, use_rslora=use_rslora)
        else:
            linear.requires_grad_(False)
            layer = LoRALinear(linear, r, alpha, dropout=dropout, use_rslora=use_rslora, adapter_name=adapter_name)
            _replace_module(model, name, layer)
    return model


def lora_parameters(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> list[nn.Parameter]:
    """The parameters of one adapter (every ``lora_A`` and ``lora_B``), in module order: what the optimizer
    trains."""
    return [p for _, adapter in _adapter_layers(model, adapter_name) for p in (adapter.lora_A, adapter.lora_B)]


def lora_state_dict(
    model: nn.Module, adapter_name: str = DEFAULT_ADAPTER, full_state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """One adapter's tensors (detached) under PEFT's names: ``base_model.model.<module>.lora_A.weight``, ...

    These are the keys of PEFT's ``adapter_model.safetensors`` for a causal LM (adapter name removed).
    ``full_state``: read the tensors from this state dict (module names, e.g. the full state of an FSDP2-sharded
    model from ``rlcore.distributed.full_state_dict``) instead of the model's own parameters.
    """
    state = {}
    for name, adapter in _adapter_layers(model, adapter_name):
        for part in ("lora_A", "lora_B"):
            own = f"{name}.adapters.{adapter_name}.{part}"
            value = getattr(adapter, part).detach() if full_state is None else full_state[own]
            state[f"{PEFT_KEY_PREFIX}{name}.{part}.weight"] = value
    return state


@contextlib.contextmanager
def _layers_set(layers: list[LoRALinear], attribute: str, value, action: str) -> Iterator[None]:
    """Within the block, ``layer.<attribute> = value`` on every layer (restored after); refuses merged layers,
    whose update is inside the base weights."""
    if any(layer.merged for layer in layers):
        raise ValueError(f"adapters are merged into the base weights; call unmerge_lora(model) before {action} them")
    previous = [getattr(layer, attribute) for layer in layers]
    for layer in layers:
        setattr(layer, attribute, value)
    try:
        yield
    finally:
        for layer, old in zip(layers, previous):
            setattr(layer, attribute, old)


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter_name: str) -> Iterator[nn.Module]:
    """Within the block, ``model`` runs the adapter called ``adapter_name``: base + that adapter's update in
    the layers that hold it, the base alone elsewhere; the other adapters are bypassed (not removed).

    One frozen base, several roles switched per forward pass (the policy as ``"default"``, a reward model as
    ``"reward"``, ...). Only the active adapter takes part in the forward pass, so only its parameters get
    gradients. Refuses merged adapters, whose update is inside the base weights.
    """
    _adapter_layers(model, adapter_name)  # refuses a name no layer holds
    with _layers_set([layer for _, layer in _lora_layers(model)], "active", adapter_name, "switching"):
        yield model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes the base model's outputs (adapters bypassed, not removed).

    This is the reference model of DPO/PPO/GRPO at no memory cost. Gradients are not turned off here
    (``reference_context`` does that). Refuses merged adapters, whose update is inside the base weights.
    """
    with _layers_set([layer for _, layer in _require_lora_layers(model)], "adapters_enabled", False, "disabling"):
        yield model


@contextlib.contextmanager
def reference_context(model: nn.Module, ref_model: nn.Module | None = None) -> Iterator[nn.Module]:
    """Yield the module that computes the reference forward, under ``torch.no_grad()``.

    ``ref_model`` if one is given (full fine-tuning keeps a frozen copy); otherwise ``model`` itself with
    its LoRA adapters switched off.
    """
    if ref_model is None and not has_lora(model):
        raise ValueError("no ref_model given and the model has no LoRA adapters to switch off: pass a reference model")
    with torch.no_grad():
        if ref_model is not None:
            yield ref_model
        else:
            with disable_adapters(model):
                yield model


def merge_lora(model: nn.Module) -> nn.Module:
    """Add every update into its base weight, W <- W + scaling * B A, in place (float bases only)."""
    for _, layer in _require_lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora``: W <- W - scaling * B A, in place."""
    for _, layer in _require_lora_layers(model):
        layer.unmerge()
    return model


def _atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)``, then move the file into place in one step."""
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def _peft_target_modules(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> list[str]:
    """Suffixes (``["k_proj", "q_proj"]``) when they pick exactly the wrapped layers, else their full names."""
    wrapped = sorted(name for name, _ in layers)
    suffixes = sorted({name.rpartition(".")[2] for name in wrapped})
    selected = sorted(
        name
        for name, module in model.named_modules()
        if (_is_linear(module) or isinstance(module, LoRALinear))
        and not name.endswith(".base")
        and _matches(name, suffixes)
    )
    return suffixes if selected == wrapped else wrapped


def _score_head(model: nn.Module) -> nn.Module | None:
    """A sequence classifier's ``score`` head (saved with its adapters, as PEFT's SEQ_CLS task does), else None."""
    head = getattr(model, "score", None)
    return head if type(model).__name__.endswith("ForSequenceClassification") and isinstance(head, nn.Module) else None


def save_adapter(
    model: nn.Module,
    directory: str,
    base_model_name_or_path: str | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    full_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write one adapter as PEFT writes it: ``adapter_model.safetensors`` + ``adapter_config.json``.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` and ``load_adapter`` read it back. Each file
    is written to a temporary name and renamed, so a crash never leaves a half-written file.
    ``base_model_name_or_path`` defaults to ``model.name_or_path`` when transformers set it. A sequence
    classifier's adapter also holds its ``score`` head (PEFT's ``SEQ_CLS`` task: ``modules_to_save``, under
    ``base_model.model.score.weight``), without which it scores nothing. ``full_state``: the tensors to
    write, as in :func:`lora_state_dict` (an FSDP2-sharded model's gathered state). Several adapters:
    :func:`save_adapters`.
    """
    layers = _adapter_layers(model, adapter_name)
    first = layers[0][1]
    hyperparameters = {(a.r, a.alpha, a.use_rslora, _dropout_p(a)) for _, a in layers}
    layouts = {layer.fan_in_fan_out for name, layer in _lora_layers(model) if adapter_name in layer.adapters}
    if len(hyperparameters) > 1 or len(layouts) > 1:
        raise ValueError(f"layers have different (r, alpha, use_rslora, dropout): {sorted(hyperparameters)}")
    head = _score_head(model)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if head is None else "SEQ_CLS",
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None) or None,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": _dropout_p(first),
        "target_modules": _peft_target_modules(model, layers),
        "use_rslora": first.use_rslora,
        "bias": "none",
        "fan_in_fan_out": layouts.pop(),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None if head is None else ["score"],
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = lora_state_dict(model, adapter_name, full_state)
    if head is not None:
        head_state = (
            {k: v.detach() for k, v in head.state_dict().items()}
            if full_state is None
            else {k[len("score.") :]: v for k, v in full_state.items() if k.startswith("score.")}
        )
        tensors |= {f"{PEFT_KEY_PREFIX}score.{key}": value for key, value in head_state.items()}
    tensors = {key: value.cpu().contiguous() for key, value in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    _atomic_write(
        os.path.join(directory, ADAPTER_WEIGHTS_NAME), lambda path: save_file(tensors, path, metadata={"format": "pt"})
    )
    _atomic_write(os.path.join(directory, ADAPTER_CONFIG_NAME), lambda path: _write_json(config, path))


def save_adapters(model: nn.Module, directory: str, base_model_name_or_path: str | None = None) -> None:
    """Every adapter of ``model`` in PEFT's multi-adapter layout: ``"default"`` at the top of ``directory``,
    each other adapter in the subdirectory of its name (``directory/reward/adapter_model.safetensors``).

    PEFT reads it as it wrote it: ``PeftModel.from_pretrained(base, directory)`` for the default adapter,
    ``peft_model.load_adapter(directory + "/reward", adapter_name="reward")`` for the others;
    :func:`load_adapters` reads them all.
    """
    for name in adapter_names(model):
        target = directory if name == DEFAULT_ADAPTER else os.path.join(directory, name)
        save_adapter(model, target, base_model_name_or_path, adapter_name=name)


def _dropout_p(adapter: LoRAAdapter) -> float:
    return adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0


def _write_json(value: dict, path: str) -> None:
    with open(path, "w") as file:
        json.dump(value, file, indent=2, sort_keys=True)


def read_adapter_config(directory: str) -> dict:
    """The ``adapter_config.json`` of an adapter directory, checked: LoRA, and no option rlcore lacks (a
    sequence classifier's ``modules_to_save`` of its score head is read, as PEFT's SEQ_CLS task writes it)."""
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} in {directory!r}: not an adapter directory")
    with open(path) as file:
        config = json.load(file)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    heads = set(config.get("modules_to_save") or ())
    unsupported = {
        "use_dora": config.get("use_dora", False),
        "bias": config.get("bias", "none") != "none" and config.get("bias"),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "modules_to_save": sorted(heads) if heads - {"score", "classifier"} else None,
        "layers_to_transform": config.get("layers_to_transform"),
        "exclude_modules": config.get("exclude_modules"),
    }
    used = {key: value for key, value in unsupported.items() if value}
    if used:
        raise ValueError(f"{path} uses LoRA options rlcore does not implement: {used}")
    return config


def read_adapter_heads(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file that are not LoRA's: a sequence classifier's score head, under its own
    names (``{"score.weight": [1, H]}``); {} for a causal LM's adapter."""
    loaded = load_file(os.path.join(directory, ADAPTER_WEIGHTS_NAME))
    return {
        key.removeprefix(PEFT_KEY_PREFIX): value
        for key, value in loaded.items()
        if not key.endswith((".lora_A.weight", ".lora_B.weight"))
    }


def load_adapter(
    model: nn.Module, directory: str, adapter_name: str = DEFAULT_ADAPTER, with_heads: bool = True
) -> nn.Module:
    """Load an adapter saved by ``save_adapter`` or by PEFT's ``save_pretrained`` into ``model``, in place.

    A model without the adapter ``adapter_name`` gets it first (``apply_lora`` with the file's r,
    lora_alpha, lora_dropout, target_modules and use_rslora, beside any adapters it has); a model with it
    must match the file's keys and shapes. A score head in the file (a sequence classifier's adapter) is
    loaded into ``model.score`` when ``with_heads``, and left out otherwise (read it with
    :func:`read_adapter_heads`).
    """
    config = read_adapter_config(directory)
    if adapter_name not in adapter_names(model):
        with _rng_untouched():  # the random initial values are overwritten: leave the run's random stream alone
            apply_lora(
                model,
                r=config["r"],
                alpha=config["lora_alpha"],
                dropout=config.get("lora_dropout", 0.0),
                targets=config["target_modules"],
                use_rslora=config.get("use_rslora", False),
                adapter_name=adapter_name,
            )
    own = lora_state_dict(model, adapter_name)
    heads = read_adapter_heads(directory) if with_heads else {}
    if heads:
        own |= {PEFT_KEY_PREFIX + key: tensor for key, tensor in _head_tensors(model, heads, directory).items()}
    loaded = load_file(os.path.join(directory, ADAPTER_WEIGHTS_NAME))
    if not with_heads:
        loaded = {key: value for key, value in loaded.items() if key.endswith((".lora_A.weight", ".lora_B.weight"))}
    missing, unexpected = sorted(own.keys() - loaded.keys()), sorted(loaded.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(
            f"adapter in {directory!r} does not fit the model: {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:4]}"
        )
    for key, tensor in own.items():
        if tensor.shape != loaded[key].shape:
            raise ValueError(f"{key}: the model has shape {tuple(tensor.shape)}, the file {tuple(loaded[key].shape)}")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(loaded[key])
    return model


def _rng_untouched() -> contextlib.AbstractContextManager:
    """torch's CPU random state (and the current CUDA device's, once CUDA is in use) restored after the block."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def _head_tensors(model: nn.Module, heads: dict[str, torch.Tensor], directory: str) -> dict[str, torch.Tensor]:
    """The model's tensors (detached views, to copy into) named as the adapter file's head tensors."""
    own = {}
    for key in heads:
        module_name, _, tensor_name = key.rpartition(".")
        module = getattr(model, module_name, None)
        if not isinstance(module, nn.Module) or tensor_name not in dict(module.named_parameters(recurse=False)):
            raise ValueError(
                f"adapter in {directory!r} holds {key} (a sequence classifier's head) but "
                f"{type(model).__name__} has no such tensor: load it into a *ForSequenceClassification model"
            )
        own[key] = getattr(module, tensor_name).data
    return own


def load_adapters(model: nn.Module, directory: str) -> nn.Module:
    """Load every adapter of a :func:`save_adapters` (or PEFT multi-adapter) directory: the one at its top
    as ``"default"``, each subdirectory holding an ``adapter_config.json`` under the subdirectory's name."""
    load_adapter(model, directory)
    for name in sorted(os.listdir(directory)):
        if os.path.isfile(os.path.join(directory, name, ADAPTER_CONFIG_NAME)):
            load_adapter(model, os.path.join(directory, name), adapter_name=name)
    return model


def _is_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit`` (without importing bitsandbytes: a 4-bit layer
    can only exist once something has imported it)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _keep_standard_4bit_path(linear: nn.Module) -> None:
    """Keep a ``Linear4bit`` on bitsandbytes' standard path: dequantise, then one matmul in ``compute_dtype``.

    On CPUs with AVX512-BF16 (``bitsandbytes.functional.has_avx512bf16()``), bitsandbytes 0.50 repacks a
    4-bit weight the first time its layer runs in eval mode on an input that needs no gradient (rollouts,
    reference and evaluation passes): the absmax values are rounded to bfloat16 and the matmul runs in bfloat16 whatever
    ``compute_dtype`` says, so logits move by ~2^-9 relative and no longer match a training-mode forward or
    the float model ``export_merged`` writes. ``state_dict()`` repacks back, but not exactly: the bfloat16
    absmax stays, stored transposed when not double-quantised, which scrambles the block scales of any layer
    with more than 64 inputs. This per-layer flag (set from that CPU check in ``Linear4bit.__init__``) turns
    the repacking off, so the stored bytes and quant_state never change.
    """
    if getattr(linear.weight.quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "this 4-bit layer was already repacked by bitsandbytes' bfloat16 CPU path (an eval-mode forward on an "
            "AVX512-BF16 CPU), which rounded its quantisation constants; quantise the float weights again"
        )
    linear.support_avx512bf16_for_cpu = False


def _dense_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight as a float tensor: dequantised for a 4-bit layer, else the weight itself (detached)."""
    if _is_4bit(linear):
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state)
    return linear.weight.detach()


def _merged_state_dict(model: nn.Module, full_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every LoRA layer merged and every 4-bit layer dequantised, under base names.

    ``full_state``: merge the tensors of this state dict (module names: an FSDP2-sharded model's gathered state,
    float bases) instead of the model's own.
    """
    # 4-bit layers are in bitsandbytes' standard layout: _keep_standard_4bit_path keeps its CPU repacking off.
    state = model.state_dict() if full_state is None else dict(full_state)
    dense_layers = [
        (name, module)
        for name, module in model.named_modules()
        if (isinstance(module, LoRALinear) or _is_4bit(module)) and not name.endswith(".base")
    ]
    for name, module in dense_layers:
        layer_state = {key[len(name) + 1 :]: state.pop(key) for key in [k for k in state if k.startswith(name + ".")]}
        base = module.base if isinstance(module, LoRALinear) else module
        prefix = "base." if isinstance(module, LoRALinear) else ""
        weight = _dense_weight(base) if full_state is None else layer_state[prefix + "weight"]  # [out, in]
        if isinstance(module, LoRALinear) and not module.merged and DEFAULT_ADAPTER in module.adapters:
            if full_state is None:
                delta = module.delta_in_base_layout()
            else:  # scaling * B @ A from the gathered tensors ([in, out] for a Conv1D base)
                own = f"adapters.{DEFAULT_ADAPTER}."
                delta = module.scaling * (layer_state[own + "lora_B"] @ layer_state[own + "lora_A"])
                delta = delta.T if module.fan_in_fan_out else delta
            weight = weight + delta.to(weight.dtype)
        state[name + ".weight"] = weight
        if base.bias is not None:
            state[name + ".bias"] = base.bias.detach() if full_state is None else layer_state[prefix + "bias"]
    return state


def export_merged(
    model: nn.Module, tokenizer, directory: str, full_state: dict[str, torch.Tensor] | None = None
) -> None:
    """Save a standalone transformers model directory: adapters merged, 4-bit layers dequantised.

    ``AutoModelForCausalLM.from_pretrained(directory)`` loads it with no PEFT or rlcore code: the keys are the
    base model's own (``...q_proj.weight``), written as safetensors by ``model.save_pretrained``. ``model``
    is not modified. ``tokenizer`` (may be None) is saved beside it. ``full_state``: the tensors to merge and
    write instead of the model's own (an FSDP2-sharded model's, gathered by ``rlcore.distributed.full_state_dict``).
    """
    state = _merged_state_dict(model, full_state)
    with _float_model_config(model):  # quantised while loading: the files written are a float model's
        model.save_pretrained(directory, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


@contextlib.contextmanager
def _float_model_config(model: nn.Module) -> Iterator[None]:
    """Within the block, a model that transformers quantised while loading saves as a float model: no
    ``quantization_config`` in its config.json, no quantiser hooks on ``save_pretrained``."""
    saved = {name: getattr(model, name) for name in ("hf_quantizer", "is_quantized") if name in vars(model)}
    config_quantization = getattr(model.config, "quantization_config", None)
    if getattr(model, "hf_quantizer", None) is None:
        yield
        return
    model.hf_quantizer = None
    if "is_quantized" in saved:
        model.is_quantized = False
    if config_quantization is not None:
        del model.config.quantization_config
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(model, name, value)
        if config_quantization is not None:
            model.config.quantization_config = config_quantization


def quantize_4bit(
    model: nn.Module,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
    skip: str | Sequence[str] = ("lm_head", "score", "value_head"),
) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers by frozen 4-bit nf4 ``bitsandbytes.nn.Linear4bit``, in place.

    nf4 (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) stores each weight as one of 16 levels
    placed at quantiles of a normal distribution, times the absmax of its block of 64 weights, so a weight
    is off by at most half the widest gap between levels (0.152 of its block's absmax) and about 0.1 x
    absmax / 2 on average. ``double_quant`` also quantises the absmax values (8-bit, blocks of 256):
    about 0.37 bit per weight saved. Quantisation runs on the weights' current device (CPU or CUDA);
    bitsandbytes computes on CPU too.

    Args:
        model: modified in place and returned; other parameters (embeddings, norms) are left as they are.
        double_quant: quantise the quantisation constants too.
        compute_dtype: dtype of the matmul; default bfloat16 for weights on CUDA, float32 on CPU (also on
            AVX512-BF16 CPUs in eval mode: ``_keep_standard_4bit_path``).
        skip: name suffixes (or one regex) of layers kept in full precision; default the heads (LM, score and
            value heads), which stay trainable and exact.

    This quantises a model already in memory, so the float weights exist first; to never hold them, load
    with ``rlcore.models.load_policy(..., load_in_4bit=True)`` (quantised as it is read).
    """
    import bitsandbytes as bnb  # imported here: ~0.3 GiB and seconds of start-up that only 4-bit runs need

    linears = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not _is_4bit(module) and not _matches(name, skip)
    ]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear to quantise outside skip={skip!r}")
    _check_untied(model, linears, "quantise")
    for name, linear in linears:
        device = linear.weight.device
        dtype = compute_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=dtype,
            compress_statistics=double_quant,
            quant_type="nf4",
            device="meta",
        )
        # Params4bit quantises when moved to a device: the float weight is released afterwards.
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data,
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type="nf4",
            module=quantized,
        ).to(device)
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        _keep_standard_4bit_path(quantized)
        _replace_module(model, name, quantized)
    return model


def _parse_targets(lora_targets: str | Sequence[str] | None) -> str | Sequence[str] | None:
    """A command-line string: ``"q_proj,v_proj"`` is a list of suffixes, anything else a regex."""
    if isinstance(lora_targets, str) and re.fullmatch(r"\s*[\w.]+(\s*,\s*[\w.]+)*\s*", lora_targets):
        return [target.strip() for target in lora_targets.split(",")]
    return lora_targets


def prepare_model(
    model: nn.Module,
    lora_r: int = 0,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_targets: str | Sequence[str] | None = None,
    load_in_4bit: bool = False,
    double_quant: bool = False,
    use_rslora: bool = False,
) -> nn.Module:
    """Turn a freshly loaded model into what a recipe trains: full, LoRA, or QLoRA, from the CLI flags.

    - ``lora_r=0``: full fine-tuning, the model is returned unchanged;
    - ``lora_r>0``: ``apply_lora`` with ``lora_alpha`` (default 2 * lora_r), ``lora_dropout``,
      ``lora_targets`` (``"q_proj,v_proj"`` = suffixes, any other string = a regex; default
      ``DEFAULT_TARGETS``) and ``use_rslora``;
    - ``load_in_4bit``: first ``quantize_4bit`` (nf4, ``double_quant``) the frozen base, unless it was
      quantised while loading (``rlcore.models.load_policy(load_in_4bit=True)``); needs ``lora_r>0``.
    """
    if not isinstance(lora_r, int) or lora_r < 0:
        raise ValueError(f"lora_r must be an integer >= 0 (0 = full fine-tuning), got {lora_r!r}")
    if load_in_4bit and lora_r == 0:
        raise ValueError("load_in_4bit=True needs LoRA adapters (lora_r > 0): a 4-bit base cannot be trained directly")
    if double_quant and not load_in_4bit:
        raise ValueError("double_quant=True only applies with load_in_4bit=True")
    if lora_r == 0:
        return model
    quantized = [module for module in model.modules() if _is_4bit(module)]
    if load_in_4bit and not quantized:
        quantize_4bit(model, double_quant=double_quant)
    for module in quantized:  # quantised while loading: keep bitsandbytes' CPU path from repacking them
        _keep_standard_4bit_path(module)
    alpha = 2 * lora_r if lora_alpha is None else lora_alpha
    return apply_lora(
        model, r=lora_r, alpha=alpha, dropout=lora_dropout, targets=_parse_targets(lora_targets), use_rslora=use_rslora
    )
