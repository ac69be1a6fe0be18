"""Several processes, one result: ``torchrun`` data parallelism on PyTorch's own ``torch.distributed``.

Launch any recipe with ``torchrun --nproc_per_node N recipes/<name>.py ...`` (or ``accelerate launch`` with a
plain multi-process config, which sets the same environment: ``distributed_type: MULTI_GPU``, accelerate's
torchrun launcher, also on CPU; its ``MULTI_CPU`` type starts one process unless mpirun is set up). Without a
launcher nothing here does anything: every function is the identity of a world of one process. Backend: NCCL on CUDA (one GPU per process,
``cuda:$LOCAL_RANK``), gloo on CPU.

The contract, for the recipes and for whoever writes a new one
----------------------------------------------------------------
**A step does not depend on the number of processes.** The flags describe the global step exactly as in a
single process (``--batch_size`` rows per micro-batch, ``--grad_accum_steps`` micro-batches); each of the W
ranks takes its own contiguous, disjoint ``1/W`` of every micro-batch (:func:`shard`; an online step's
prompts, so a group of G completions never spans ranks). The learning-rate schedule is the same.

**Gradients are averaged over ranks**, so each rank's loss is its *share* of the global loss times W. Means
over rows of equal-size slices (DPO, reward model) need nothing; a loss normalised by a count of the whole
step (tokens, rows, pairs) divides its rank's sum by ``N_global / W``: :func:`rank_normalizer`. Statistics of
the whole batch (GRPO ``scale_rewards=batch``, REINFORCE++ and PPO whitening, the token count of DAPO) are
computed on the gathered global batch: :func:`gather_rows`, :func:`on_global_batch`. Logged step metrics are
averaged over the ranks that report them (:func:`reduce_stats`, called by ``rlcore.run.Run``).

**Sampling does not depend on the number of processes.** :func:`sampling_draws` gives ``generate`` a
generator seeded from one draw of the (rank-identical) global RNG, and the rows of the global batch whose
random draws this rank's completions take: each decode step draws the uniforms of the global batch (the
single-process draws) and keeps its rows. The price: W times the uniforms of one rank's batch per token
(``[N_global, V]``), small beside the forward pass at the batch sizes RL samples.

Sharding modes (``--sharding``):

- ``ddp`` (default): every rank holds the whole model; :func:`prepare` broadcasts rank 0's weights, and
  ``rlcore.optim.optimizer_step`` averages the gradients in ONE coalesced all-reduce per optimizer step
  (:func:`average_gradients`) before clipping. This is what ``DistributedDataParallel`` computes (with
  ``no_sync`` over the accumulation micro-batches), without its wrapper. Why no wrapper: DDP reduces in
  autograd hooks armed by the wrapper's forward, so (1) a recipe that calls a submodule directly (the reward
  model's backbone, a transformer body with a chunked LM head, an adapters-off reference) would silently skip
  the reduction, and (2) every rank must run the same number of backward passes, while GRPO leaves out rows
  with nothing to learn and online DPO trains only on decided pairs, so ranks differ. Here any call pattern
  is fine as long as every rank calls ``optimizer_step`` the same number of times (the recipes do: the
  number of optimizer steps is a function of the flags). Parameters without a gradient on every rank stay
  without one (AdamW does not move them), those with one on some rank get the average with zeros.
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every decoder layer, then on the root (parameters
  sharded as DTensors; gradients reduce-scattered in backward; on CUDA bf16 parameters and fp32 gradient
  reduction through ``MixedPrecisionPolicy``). Its contract is stricter, and the recipes keep it: forward
  passes go through the ROOT module (the root's hooks gather the embeddings and the head), and all ranks run
  the same number of forward and backward passes of the sharded model (its collectives are inside them):
  GRPO then keeps the rows with nothing to learn, and PPO and online DPO (whose processes hold different
  numbers of mini-batch rows or pairs) run zero-weighted passes until every process has run as many as the
  busiest (:func:`equal_passes`); distillation reads the student's LM head right after the student's
  forward (the root keeps its parameters gathered until backward). LoRA under FSDP2: the frozen base weights are sharded with the
  adapters, and only the adapters (the parameters with a gradient) are reduce-scattered; the final adapter and
  merged model are written from the full state gathered on rank 0 (a 4-bit base is refused: bitsandbytes'
  packed weights cannot be split). Checkpoints are sharded: every process writes its shards of the model and optimizer state
  (``torch.distributed.checkpoint``; ``rlcore.checkpoint``) and resumes from them at the same world size.
  Generation gathers the full parameters once per rollout (:func:`full_parameters`), not layer by layer at
  every token (the classic slow path): the memory of one full copy during sampling is the price.

Checkpoints under DDP are the single-process ones (rank 0 writes, the ranks' RNG states beside): a resume at
the same world size continues bit-for-bit on CPU. The final model is one directory that
``AutoModelForCausalLM.from_pretrained`` loads, written by rank 0 (under FSDP2 from the full state dict
gathered there). Evaluation under DDP is sharded: each batch of held-out rows is split over the processes
(:func:`evaluation_part`), the per-row values gathered back in the single process's order
(:func:`gather_evaluation`) and the metrics computed from them on every process, so they equal the single
process's; rank 0 logs them. Every held-out metric is sharded this way (the greedy metric, SFT's loss and
token accuracy, the preference metrics, the sampled reward and pass@k), under FSDP2 too: there a process whose
part of a batch is empty runs a discarded pass on one row, so that every process runs the same passes
(:func:`evaluation_rows`).

For code that reads weights without calling a module (a chunked LM head taking ``lm_head.weight``, a native
decode step): under DDP the weights are plain tensors; under FSDP2 read them inside :func:`full_parameters`
(outside it they are the local shards).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

SHARDING_MODES = ("ddp", "fsdp2")
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------
# the process group


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate) started this process: it sets ``WORLD_SIZE`` and ``RANK``."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device: torch.device) -> torch.device:
    """Join the process group when launched (NCCL on CUDA, gloo on CPU); returns the device this rank uses
    (``cuda:$LOCAL_RANK`` on CUDA). Without a launcher: ``device`` unchanged, nothing initialised."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return device


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs, draws the bar and curves, and writes files."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (at the end of a run; harmless without one)."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# data


def shard_range(num_rows: int) -> range:
    """Positions ``[r * n, (r + 1) * n)`` of rank r among ``num_rows = n * W`` rows (a contiguous block).

    Raises:
        ValueError: ``num_rows`` is not a multiple of the world size.
    """
    world = world_size()
    if num_rows % world:
        raise ValueError(
            f"{num_rows} rows per micro-batch (or prompts per step) cannot be split over {world} processes: "
            f"make --batch_size a multiple of {world}"
        )
    size = num_rows // world
    return range(rank() * size, (rank() + 1) * size)


def shard(rows: Sequence[T]) -> list[T]:
    """This rank's contiguous, disjoint ``1/W`` of ``rows`` (row indices of a micro-batch or of a step's
    prompts); all of them in a single process. See :func:`shard_range`."""
    return [rows[i] for i in shard_range(len(rows))]


def own_rows(global_rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """This rank's rows among ``global_rows`` (indices into a global batch of ``num_rows`` rows, e.g. a PPO
    mini-batch drawn from a permutation shared by every rank), as indices into its own block, in order."""
    block = shard_range(num_rows)
    return global_rows[(global_rows >= block.start) & (global_rows < block.stop)] - block.start


def rank_normalizer(global_count: float | torch.Tensor) -> float | torch.Tensor:
    """The normaliser of a rank's share of a loss ``sum_{rows of the step} l / N_global``: ``N_global / W``.

    Gradients are averaged over the W ranks, so rank r's loss ``W * sum_{rows of r} l / N_global`` averages to
    the global loss: the gradient and the logged loss equal the single process's. ``global_count`` is the
    count of the WHOLE step (tokens, rows, pairs), e.g. from :func:`all_reduce_sum` of the ranks' counts.
    """
    return global_count / world_size()


def all_reduce_sum(value: torch.Tensor | float) -> torch.Tensor:
    """Sum over ranks (a new tensor; a number becomes a float64 CPU tensor on gloo, or on this rank's GPU)."""
    tensor = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    if is_initialized():
        if dist.get_backend() == "nccl" and not tensor.is_cuda:
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The global batch ``[n * W, ...]`` from every rank's ``[n, ...]`` rows, in rank order (= the order of
    :func:`shard`). Dimension 1 may differ between ranks (completion lengths): it is right-padded with zeros to
    the longest, as a single process pads its batch. Every rank must hold the same number of rows."""
    if not is_initialized() or world_size() == 1:
        return x
    device = x.device if dist.get_backend() != "nccl" else torch.device("cuda", torch.cuda.current_device())
    local = x.to(device)
    if x.ndim >= 2:
        length = all_reduce_max(x.shape[1])
        local = torch.nn.functional.pad(local, (0, 0) * (x.ndim - 2) + (0, length - x.shape[1]))
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts).to(x.device)


def all_reduce_max(value: int) -> int:
    tensor = torch.tensor([value], dtype=torch.long)
    if is_initialized():
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def on_global_batch(function: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """``function`` of the GLOBAL batch, returned for this rank's rows: gather every argument's rows
    (:func:`gather_rows`), apply, keep this rank's block (and its own length of dimension 1).

    For batch statistics that must equal the single-process value: GRPO's batch std, REINFORCE++ and PPO's
    advantage whitening. Costs one all-gather per argument (rows of rewards or of a ``[B, T]`` mask: small).
    """
    if world_size() == 1:
        return function(*tensors)
    result = function(*(gather_rows(t) for t in tensors))
    block = shard_range(result.shape[0])
    local = result[block.start : block.stop]
    return local[:, : tensors[0].shape[1]] if local.ndim >= 2 and tensors[0].ndim >= 2 else local


def sampling_draws(num_rows: int, device: torch.device) -> dict[str, Any]:
    """Keyword arguments of ``rlcore.rollout.generate`` that make this rank's samples the single process's.

    ``generator``: seeded from one draw of the global RNG (the same on every rank, and one draw whatever the
    rollout's length, so the global RNG stays in step across ranks and with a single process); ``draws``: the
    rows of the global batch (this rank's ``num_rows`` completions among ``num_rows * W``) whose uniforms
    these completions take.
    """
    seed = int(torch.randint(0, 2**62, (1,)).item())
    draws = None
    if world_size() > 1:
        block = shard_range(num_rows * world_size())
        draws = (torch.arange(block.start, block.stop, device=device), num_rows * world_size())
    return {"generator": torch.Generator(device).manual_seed(seed), "draws": draws}


# ----------------------------------------------------------------------------------------------------------
# models and gradients


def prepare(model: torch.nn.Module, sharding: str = "ddp", bf16: bool = False) -> torch.nn.Module:
    """Make ``model`` data parallel (in place; returns it). Call before building its optimizer.

    ``ddp``: broadcast rank 0's parameters and buffers (every rank then starts from the same weights even
    if their initialisations differed). ``fsdp2``: :func:`fully_shard_model`. Single process: unchanged.
    """
    if sharding not in SHARDING_MODES:
        raise ValueError(f"--sharding must be one of {', '.join(SHARDING_MODES)}; got {sharding!r}")
    if world_size() == 1 and sharding == "ddp":
        return model
    if sharding == "fsdp2":
        if not is_initialized():
            raise ValueError("--sharding fsdp2 needs a process group: launch with torchrun")
        return fully_shard_model(model, bf16)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() or tensor.dtype in (torch.long, torch.int):
                dist.broadcast(tensor.data, src=0)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers model (``model.model.layers`` and the like; LoRA-wrapped too):
    the modules of every ``ModuleList`` whose elements have the same class and hold parameters."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and any(True for _ in module[0].parameters()):
            if len({type(layer) for layer in module}) == 1 and "Layer" in type(module[0]).__name__:
                return list(module)
    return []


def fully_shard_model(model: torch.nn.Module, bf16: bool = False) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (torch.distributed.fsdp, PyTorch >= 2.6).

    With ``bf16`` (CUDA by default) parameters are gathered in bf16 for compute and gradients reduced in fp32
    (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``); the sharded master weights and
    AdamW states stay fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    # children of the root that share no parameter with another (a classifier's backbone and score head, an
    # untied LM head) get their own group, so that calling them directly gathers their parameters too
    children = [child for child in model.children() if any(True for _ in child.parameters())]
    owned = [{id(p) for p in child.parameters()} for child in children]
    for index, child in enumerate(children):
        if all(not owned[index] & other for other_index, other in enumerate(owned) if other_index != index):
            fully_shard(child, **kwargs)
    fully_shard(model, **kwargs)
    return model


def equal_passes(micro_batches: Sequence[T], model: torch.nn.Module, filler: T) -> list[tuple[T, bool]]:
    """``(micro_batch, True)`` for each of this process's micro-batches; under FSDP2 then ``(filler, False)``
    until it has as many as the process with the most (one all-reduce of the counts).

    FSDP2's collectives are inside the forward and backward passes, so every process must run the same number
    of them; a recipe whose processes hold different numbers of rows (PPO's mini-batches, online DPO's decided
    pairs) runs the filler passes with its loss multiplied by 0: the gradients and metrics are the real
    micro-batches' only (``0 * loss`` adds exact zeros to the gradients). Under DDP and in one process: the
    micro-batches as they are, no collective.
    """
    passes = [(micro_batch, True) for micro_batch in micro_batches]
    if world_size() > 1 and is_sharded(model):
        passes += [(filler, False)] * (all_reduce_max(len(passes)) - len(passes))
    return passes


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or a submodule) was made an FSDP2 module by :func:`fully_shard_model`."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block an FSDP2 model holds its full parameters (gathered ONCE: ``unshard()`` on every
    FSDP module, resharded at exit), so generation does not all-gather each layer at every token. A DDP or
    single-process model is yielded as is."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in sharded:
        module.set_reshard_after_forward(False, recurse=False)  # forward passes inside keep them gathered
        module.unshard()
    try:
        yield model
    finally:
        for module in sharded:
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)  # fully_shard's defaults


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded, float32, CPU) state dict of an FSDP2 model on rank 0 ({} elsewhere): every process
    must call it (an all-gather per tensor). None for a model that is not sharded (save it as it is)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied = every - {name for name, _ in model.named_parameters()}  # a tied copy (LM head = embeddings) is not saved
    return {name: tensor for name, tensor in state.items() if name not in tied}


def average_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of replicated (DDP) parameters over ranks, in place, in one all-reduce.

    A parameter has a gradient afterwards iff it had one on some rank (a rank without contributes zeros).
    FSDP2 parameters (DTensors, already reduce-scattered in backward) are left alone. No-op in one process.
    """
    if world_size() == 1:
        return
    from torch.distributed.tensor import DTensor

    replicated = [p for p in parameters if p.requires_grad and not isinstance(p, DTensor)]
    if not replicated:
        return
    device = replicated[0].device
    has_grad = torch.tensor([p.grad is not None for p in replicated], dtype=torch.uint8, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    reduced = [p for p, flag in zip(replicated, has_grad.tolist()) if flag]
    if not reduced:
        return
    for p in reduced:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).float() for p in reduced])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for p in reduced:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


# ----------------------------------------------------------------------------------------------------------
# metrics and state


def reduce_stats(
    stats: Mapping[str, torch.Tensor | float], counts: Mapping[str, torch.Tensor | float] | None = None
) -> dict[str, torch.Tensor | float]:
    """A step's metrics averaged over the ranks that report each key (keys may differ between ranks).

    ``counts[key]``: how many items (tokens, rows) this rank's value of ``key`` is a mean over; such a key is
    the mean weighted by them, ``sum_r count_r * value_r / sum_r count_r``, i.e. the whole batch's mean (a
    token accuracy over every process's tokens, not the mean of the processes' accuracies); 0 where no rank
    counted any item. One gather of the key names (host side) and one all-reduce of the values; the result
    stays a tensor (logged at logging steps only). Single process: ``stats`` unchanged.
    """
    if world_size() == 1:
        return dict(stats)
    counts = counts or {}
    names: list[list[str]] = [[] for _ in range(world_size())]
    dist.all_gather_object(names, sorted(stats))
    keys = sorted({key for rank_keys in names for key in rank_keys})
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.zeros(2, len(keys), dtype=torch.float64, device=device)  # [weighted sum, weight]
    for index, key in enumerate(keys):
        if key in stats:
            value, weight = stats[key], counts.get(key, 1.0)
            weight = weight.detach().double() if isinstance(weight, torch.Tensor) else float(weight)
            values[0, index] = weight * (value.detach().double() if isinstance(value, torch.Tensor) else float(value))
            values[1, index] = weight
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    means = torch.where(values[1] > 0, values[0] / values[1].clamp(min=1e-300), 0.0).float()
    return dict(zip(keys, means.unbind()))


def whole_batch_means(sums: Mapping[str, torch.Tensor], counts: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``{key: total of sums[key] / total of sums[counts[key]]}`` with totals over every process (one all-reduce;
    0 where the count is 0): a mean over a subset of the step's rows (KTO's desirable rows, say) as one process
    computes it over the whole batch, the same on every process. ``sums`` holds the sums and the counts."""
    names = sorted(sums)
    totals = dict(zip(names, all_reduce_sum(torch.stack([torch.as_tensor(sums[k]).double() for k in names])).cpu()))
    return {key: (totals[key] / totals[count].clamp(min=1)).float() for key, count in counts.items()}


# ----------------------------------------------------------------------------------------------------------
# evaluation


def evaluation_sharded(model: torch.nn.Module) -> bool:
    """Whether the held-out evaluation of ``model`` is split over the processes: under torchrun (DDP or FSDP2;
    under FSDP2 every process runs a pass for every batch, see :func:`evaluation_rows`)."""
    return world_size() > 1


def evaluation_part(num_rows: int, model: torch.nn.Module) -> range:
    """This process's contiguous part of an evaluation batch of ``num_rows`` rows: rows
    ``[floor(r n / W), floor((r + 1) n / W))`` of rank r (parts differ by at most one row; some are empty when
    ``n < W``). All the rows when the evaluation is not sharded (:func:`evaluation_sharded`)."""
    if not evaluation_sharded(model):
        return range(num_rows)
    world, r = world_size(), rank()
    return range(r * num_rows // world, (r + 1) * num_rows // world)


def evaluation_rows(num_rows: int, model: torch.nn.Module) -> tuple[range, bool]:
    """``(rows to run, keep)`` for this process's part of an evaluation batch of ``num_rows`` rows: its part
    (:func:`evaluation_part`) and True; under FSDP2 an empty part (``num_rows < W``) runs row 0 instead and
    discards it (False), because every process must run the same forward passes (FSDP2's collectives are
    inside them). Under DDP an empty part runs nothing."""
    part = evaluation_part(num_rows, model)
    if not part and is_sharded(model):
        return range(0, 1), False
    return part, True


def gather_evaluation(parts: list[Any], model: torch.nn.Module) -> list[Any]:
    """Every batch's values from its parts on the processes: ``parts[b]`` is this process's values (a tensor
    with rows first, or a list) of batch b (:func:`evaluation_part`); returns, for each batch, the
    concatenation in rank order, i.e. the batch's values in the single process's row order, on every process.
    Unchanged when the evaluation is not sharded. Costs one ``all_gather_object`` (CPU copies; evaluation
    steps only)."""
    if not evaluation_sharded(model):
        return parts
    every = gather_objects([part.cpu() if isinstance(part, torch.Tensor) else part for part in parts])
    merged = []
    for batch, part in enumerate(parts):
        pieces = [rank_parts[batch] for rank_parts in every]
        merged.append(torch.cat(pieces).to(part.device) if isinstance(part, torch.Tensor) else sum(pieces, []))
    return merged


def gather_objects(value: Any) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` on every rank (``[value]`` in one process)."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values
