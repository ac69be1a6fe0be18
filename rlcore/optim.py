"""Optimisation: AdamW with decay only on matrices, warmup + cosine/linear schedule, clipped steps.

Gradient accumulation that gives the same update as one large batch
--------------------------------------------------------------------
For a token-mean loss over a batch split into micro-batches m = 1..M,

    L = (1 / N) * sum_m sum_{t in m} l_t,        N = number of loss tokens in the WHOLE batch,

so each micro-batch must contribute ``sum_{t in m} l_t / N`` (its token *sum* over the window's token
count), not its own token mean: averaging per-micro-batch means weights short micro-batches too much (the
gradient-accumulation bug fixed in transformers 4.46). :func:`loss_tokens` counts N from the python
token lists before any tensor is built (no host sync); recipes pass it as the loss normaliser. For
per-sequence losses (DPO, reward model) N is the number of rows in the window.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import torch

from rlcore import distributed

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
_BITSANDBYTES_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
}


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    extra_groups: Sequence[dict] = (),
    kind: str = "adamw",
    master_weights: str | None = None,
) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019, https://arxiv.org/abs/1711.05101) over the trainable parameters.

    ``kind`` picks the implementation (``OPTIMIZERS``): ``adamw`` is torch's (moments in the parameters'
    dtype); the others are bitsandbytes': ``adamw_8bit`` keeps both moments in 8 bits with one scale per
    block of 256 values (Dettmers et al. 2022, https://arxiv.org/abs/2110.02861; tensors under 4096
    elements stay 32-bit), 2 bytes per parameter instead of 8; ``paged_adamw_8bit`` and ``paged_adamw_32bit``
    put the state in CUDA unified memory, which the driver pages to host RAM when the GPU runs short. On
    CPU bitsandbytes 0.50 runs the 8-bit update and falls back to ordinary (unpaged) state for the paged
    ones, with a warning. All four save and resume through ``state_dict``.

    Weight decay applies to parameters with 2 or more dimensions (matrices, embeddings); biases and norm
    scales (1-d) are not decayed. Frozen parameters (``requires_grad=False``, e.g. a LoRA base) are left out.
    ``extra_groups`` are optimizer parameter groups with their own settings (e.g. a new head at its own
    ``lr``), placed after the default groups; their parameters are left out of the default groups.
    torch's AdamW runs its fused kernel (one multi-tensor update instead of a loop over the parameters) where
    every parameter is a plain tensor on CUDA or every one on the CPU: the same update, equal to the per-tensor
    loop up to float rounding (a few ulps), and cheaper on the CPU too (docs/results.md, "Comparison with TRL").
    ``master_weights="float32"`` (torch's AdamW only) updates float32
    copies of bfloat16/float16 parameters (:class:`MasterWeightAdamW`).
    """
    own = {id(p) for group in extra_groups for p in group["params"]}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in own]
    if not trainable and not own:
        raise ValueError("build_optimizer: the model has no trainable parameters (all requires_grad=False)")
    decayed = [p for _, p in trainable if p.ndim >= 2]
    not_decayed = [p for _, p in trainable if p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]] + [dict(group) for group in extra_groups]
    if kind in _BITSANDBYTES_OPTIMIZERS:
        import bitsandbytes as bnb  # only runs that ask for it pay its import

        return getattr(bnb.optim, _BITSANDBYTES_OPTIMIZERS[kind])(groups, lr=lr, betas=betas, eps=eps)
    if kind != "adamw":
        raise ValueError(f"unknown optimizer {kind!r}; expected one of {OPTIMIZERS}")
    if master_weights not in (None, "float32"):
        raise ValueError(f"master_weights must be None or 'float32', got {master_weights!r}")
    adamw = MasterWeightAdamW if master_weights == "float32" else torch.optim.AdamW
    return adamw(groups, lr=lr, betas=betas, eps=eps, fused=_fusable([p for g in groups for p in g["params"]]) or None)


def _fusable(parameters: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: all on CUDA (DTensor shards included, as FSDP2 makes
    them), or all plain floating-point tensors on the CPU (not DTensor: its CPU fused path is not used here)."""
    if all(p.is_cuda for p in parameters):
        return True
    return all(p.device.type == "cpu" and p.is_floating_point() and not hasattr(p, "device_mesh") for p in parameters)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW that updates float32 master copies of low-precision (bfloat16, float16) parameters.

    Mixed-precision training as Micikevicius et al. 2018 (https://arxiv.org/abs/1710.03740) lay it out: the
    model's weights stay in their dtype (forward and backward run on them), and the optimizer keeps

        w32 <- AdamW(w32, g.float())   (moments m, v in float32)        w <- round(w32)  (to the model's dtype)

    so an update smaller than half a weight's spacing in its dtype (2^-8 relative in bfloat16) accumulates in
    w32 instead of being rounded away at every step, as it is when AdamW updates bfloat16 weights in place.
    float32 parameters are updated in place, with no copy. Memory per low-precision parameter: 2 bytes of
    weight, 2 of gradient, 4 of master copy and 8 of moments (16 bytes, as float32 weights with bfloat16
    autocast; the forward and backward run in bfloat16). ``state_dict`` holds the master copies, so a resumed
    run continues from them and not from the rounded weights.
    """

    def __init__(self, groups: Sequence[dict], **kwargs):
        self._pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # (model parameter, its master copy)
        master_groups = []
        for group in groups:
            params = []
            for parameter in group["params"]:
                if parameter.dtype in (torch.bfloat16, torch.float16):
                    master = parameter.detach().float().clone().requires_grad_(True)
                    self._pairs.append((parameter, master))
                    parameter = master
                params.append(parameter)
            master_groups.append({**group, "params": params})
        super().__init__(master_groups, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        for parameter, master in self._pairs:
            master.grad = None if parameter.grad is None else parameter.grad.float()
        loss = super().step(closure)
        for parameter, master in self._pairs:
            parameter.copy_(master)  # rounded to the model's dtype
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for parameter, _ in self._pairs:
            if set_to_none:
                parameter.grad = None
            elif parameter.grad is not None:
                parameter.grad.zero_()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "master_weights": [master.detach().clone() for _, master in self._pairs]}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        if masters is None or len(masters) != len(self._pairs):
            raise ValueError(
                f"the optimizer state holds {'no' if masters is None else len(masters)} float32 master weights, "
                f"this run has {len(self._pairs)}: resume with the --master_weights the run was saved with"
            )
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for (parameter, master), saved in zip(self._pairs, masters):
                master.copy_(saved)
                parameter.copy_(master)


def lr_multiplier(
    step: int, *, warmup_steps: int, total_steps: int, schedule: str = "cosine", min_lr_ratio: float = 0.0
) -> float:
    """Factor applied to the peak learning rate for the update of optimizer step ``step`` (0-based).

    warmup (step < warmup_steps):  (step + 1) / warmup_steps       (the first update is not wasted at lr 0)
    then with p = (step - warmup_steps) / max(1, total_steps - warmup_steps) in [0, 1):
        cosine:    min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2
        linear:    min_lr_ratio + (1 - min_lr_ratio) * (1 - p)
        constant:  1
    Steps at or past ``total_steps`` get ``min_lr_ratio`` (1 for constant).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over :func:`lr_multiplier`; call ``scheduler.step()`` once after each ``optimizer.step()``."""
    multiplier = functools.partial(
        lr_multiplier,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        schedule=schedule,
        min_lr_ratio=min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def optimizer_step(
    parameters: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    max_grad_norm: float | None,
) -> torch.Tensor:
    """Clip the global gradient norm (if ``max_grad_norm``), step, advance the schedule, zero the grads.

    A non-finite gradient norm (a NaN or infinite loss gives one) skips the update: no optimizer step, no
    schedule step, the gradients are dropped; ``rlcore.guards`` counts such steps and stops a run of them.
    Deciding this reads the norm on the host: one sync per optimizer step.
    Under ``torchrun`` the gradients are first averaged over the processes (``rlcore.distributed``: one
    all-reduce; every process must call this the same number of times).

    Returns:
        The global L2 norm of the gradients before clipping, as a detached 0-d tensor (non-finite: skipped).
    """
    parameters = list(parameters)
    distributed.average_gradients(parameters)
    params = [p for p in parameters if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    grad_norm = total_norm.full_tensor() if hasattr(total_norm, "full_tensor") else total_norm  # FSDP2: over shards
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()
    clip_gradients(params, max_grad_norm, total_norm, float(grad_norm))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.detach()


def clip_gradients(params: list, max_grad_norm: float | None, total_norm: torch.Tensor, norm: float) -> None:
    """``clip_grad_norm_``'s scaling of the gradients by ``min(1, max / (norm + 1e-6))``, skipped where that is
    exactly 1: a pass over every gradient saved on each step that needs no clipping (``total_norm``: the
    norm as ``get_total_norm`` gave it, a DTensor under FSDP2; ``norm``: its value)."""
    if max_grad_norm is not None and norm + 1e-6 > max_grad_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, total_norm)


def loss_tokens(masks: Sequence[Sequence[int]], shift: bool = True) -> int:
    """Number of loss tokens in a window of rows given as python lists of 0/1 (the normaliser N above).

    With ``shift=True`` (next-token losses) the first position of each row is not predicted and is skipped.
    Returns at least 1 so a window without loss tokens gives a zero loss rather than a division by zero.
    """
    start = 1 if shift else 0
    return max(1, sum(int(sum(mask[start:])) for mask in masks))


def from_flags(
    model: torch.nn.Module,
    config,
    updates_per_step: int = 1,
    extra_groups: Sequence[dict] = (),
    num_rows: int | None = None,
    rows_per_step: int | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """(AdamW, schedule) as a recipe's flags say: ``--optim --master_weights --lr --weight_decay --adam_beta1
    --adam_beta2`` and
    ``--warmup_steps --lr_schedule --min_lr_ratio``, the schedule laid out over ``--max_steps`` steps of
    ``updates_per_step`` optimizer updates each (GRPO's ``--num_iterations``, PPO's epochs x mini-batches).

    ``--num_train_epochs E`` first sets ``config.max_steps`` to ``ceil(E * num_rows / rows_per_step)`` (the
    recipe passes its training rows and the rows each step consumes; ``rlcore.runtime.step_batches`` streams
    them epoch after epoch), so what run_config.json records is what runs. ``--warmup_ratio R`` (when
    ``--warmup_steps`` is 0) warms up over ``ceil(R * total updates)``.
    """
    if getattr(config, "num_train_epochs", None) is not None:
        config.max_steps = steps_for_epochs(config.num_train_epochs, num_rows, rows_per_step)
        print(
            f"--num_train_epochs {config.num_train_epochs:g}: {num_rows} rows, {rows_per_step} per step -> {config.max_steps} steps"
        )
    total_steps = config.max_steps * updates_per_step
    betas = (config.adam_beta1, config.adam_beta2)
    optimizer = build_optimizer(
        model,
        config.lr,
        config.weight_decay,
        betas,
        extra_groups=extra_groups,
        kind=config.optim,
        master_weights=getattr(config, "master_weights", None),
    )
    scheduler = build_scheduler(
        optimizer,
        warmup_steps=config.warmup_steps or math.ceil(getattr(config, "warmup_ratio", 0.0) * total_steps),
        total_steps=total_steps,
        schedule=config.lr_schedule,
        min_lr_ratio=config.min_lr_ratio,
    )
    return optimizer, scheduler


def steps_for_epochs(epochs: float, num_rows: int | None, rows_per_step: int | None) -> int:
    """Optimizer steps that consume ``epochs`` passes over ``num_rows`` rows, ``rows_per_step`` per step:
    ``ceil(epochs * num_rows / rows_per_step)``, at least 1 (the last step may reach into the next pass)."""
    if not num_rows or not rows_per_step:
        raise ValueError("--num_train_epochs needs the number of training rows and the rows per step")
    return max(1, math.ceil(epochs * num_rows / rows_per_step - 1e-9))
