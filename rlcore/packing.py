"""Packed forwards: several sequences in one row, kept apart by a block attention mask.

Two uses, both exactly equal to the padded computation (values and gradients; tests/test_packing.py):

- **padding-free batches**: a micro-batch's sequences end to end in fewer rows, each attending causally to
  itself only, position ids restarting at 0 (rows as long as the padded ones under dense attention, one row
  under variable-length attention: ``rlcore.models.packed_batch``);
- **prefix sharing** (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing",
  https://arxiv.org/abs/2410.20305): the rows that share a prompt (the G completions of a GRPO prompt, the
  chosen and rejected completions of a DPO pair) become one sequence ``[prompt, c_1, ..., c_G]`` whose
  completions each attend to the prompt and causally to their own tokens, nothing else; completion
  positions continue from the prompt's length, as in the unshared row. The prompt is computed once; its
  gradient collects the contributions of every completion.

The mask is a pure function of per-token segment ids and an optional "prefix" relation:

    allowed[b, q, k] = k <= q  and  seg[b, k] >= 0  and  (seg[b, k] == seg[b, q]  or  seg[b, k] == prefix[b, q])
    position[b, q]   = (index of q within its segment) + (length of segment prefix[b, q], 0 if none)

(a padding query, ``seg == -1``, attends to itself only so that its softmax stays finite; its output is
never read). A segment is contiguous and its prefix segment lies before it in the row.

How transformers 5 takes such a mask (``masking_utils._preprocess_mask_arguments``): a 4D
``attention_mask`` [B, 1, L, L] is passed to the attention layers as given, for every layer. sdpa takes a
boolean mask (True = attend); eager *adds* the mask to the scores, so it needs an additive float mask
(0 / the dtype's minimum): a boolean mask there would be added as 0/1 and attend everywhere
(:func:`model_attention_mask` gives each what it needs). flash_attention_2 cannot take a dense mask:
padding-free batches then pass no mask and let position ids restarting at 0 mark the sequences (transformers'
varlen path); prefix sharing is refused. Without a 4D mask, sdpa/eager also separate sequences whose
position ids restart (``find_packed_sequence_indices``), but only with ``attention_mask=None`` and
``use_cache=False``: ``rlcore.data.pack_sequences`` relies on that; the forwards here pass the mask explicitly.

Cost: the packed attention is dense over the packed row (sdpa computes the masked-out scores too), so
sharing pays where the linear layers dominate (short rows, or long prompts with G completions each much
shorter than the prompt); ``benchmarks/prefix_sharing.py`` measures it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

DENSE_MASK_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take a dense 4D mask."""


def _check_segments(segment_ids: torch.Tensor, prefix_ids: torch.Tensor | None) -> torch.Tensor:
    if segment_ids.dim() != 2 or segment_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"segment_ids must be a [B, L] integer tensor, got {tuple(segment_ids.shape)} {segment_ids.dtype}"
        )
    if prefix_ids is None:
        return torch.full_like(segment_ids, -1)
    if prefix_ids.shape != segment_ids.shape:
        raise ValueError(f"prefix_ids {tuple(prefix_ids.shape)} must match segment_ids {tuple(segment_ids.shape)}")
    return prefix_ids


def segment_attention_mask(segment_ids: torch.Tensor, prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean block attention mask of a packed batch, True where query q may attend to key k.

        allowed[b, q, k] = k <= q and seg[b, k] >= 0 and (seg[b, k] == seg[b, q] or seg[b, k] == prefix[b, q])

    plus ``allowed[b, q, q]`` for padding queries (``seg[b, q] == -1``), which then attend to themselves only.

    Args:
        segment_ids: [B, L] long, the segment of each token (-1 on padding); segments are contiguous.
        prefix_ids: [B, L] long or None, the segment each token may also attend to (its prompt's segment,
            placed before it), -1 for none. None: every segment attends to itself only (padding-free).

    Returns:
        [B, 1, L, L] bool (the head dimension broadcast), as transformers' sdpa attention takes it.
    """
    prefix_ids = _check_segments(segment_ids, prefix_ids)
    length = segment_ids.shape[1]
    query, key = segment_ids.unsqueeze(2), segment_ids.unsqueeze(1)  # [B, L, 1], [B, 1, L]
    related = (key == query) | (key == prefix_ids.unsqueeze(2))  # [B, L, L]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()  # [L, L]
    allowed = related & (key >= 0) & causal
    padding_self = torch.eye(length, dtype=torch.bool, device=segment_ids.device) & (query < 0)  # [B, L, L]
    return (allowed | padding_self).unsqueeze(1)  # [B, 1, L, L]


def segment_position_ids(segment_ids: torch.Tensor, prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of a packed batch: each token's index within its segment, plus its prefix segment's length.

        position[b, q] = q - start(seg[b, q]) + (number of tokens of segment prefix[b, q], 0 if none)

    so a completion continues from its prompt's length exactly as in its own unpacked row. Padding (-1)
    gets its index within the padding run (any value would do: its output is never read).

    Args:
        segment_ids, prefix_ids: as :func:`segment_attention_mask`.

    Returns:
        [B, L] long.
    """
    prefix_ids = _check_segments(segment_ids, prefix_ids)
    batch, length = segment_ids.shape
    columns = torch.arange(length, device=segment_ids.device).expand(batch, length)  # [B, L]
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]  # a new segment (or padding run) begins
    start_column = torch.where(starts, columns, torch.zeros_like(columns)).cummax(dim=1).values  # [B, L]
    segments = int(segment_ids.max().clamp(min=0)) + 1
    lengths = torch.zeros(batch, segments, dtype=torch.long, device=segment_ids.device)
    lengths.scatter_add_(1, segment_ids.clamp(min=0), (segment_ids >= 0).long())  # [B, S] tokens per segment
    prefix_length = torch.where(prefix_ids >= 0, lengths.gather(1, prefix_ids.clamp(min=0)), 0)  # [B, L]
    return columns - start_column + prefix_length


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask: 0 where allowed, ``finfo(dtype).min`` elsewhere (eager attention)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def model_attention_mask(
    attn_implementation: str, segment_ids: torch.Tensor, prefix_ids: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """The ``attention_mask`` a transformers model with ``attn_implementation`` takes for a packed batch.

    sdpa: the boolean [B, 1, L, L] mask of :func:`segment_attention_mask`; eager: the same as an additive mask
    in ``dtype`` (the model's embedding dtype); any other implementation (flash_attention_2, ...): None
    for padding-free batches (position ids restarting at 0 mark the sequences), an error with a prefix
    relation, which needs the dense mask.
    """
    if attn_implementation not in DENSE_MASK_ATTENTION:
        if prefix_ids is not None and bool((prefix_ids >= 0).any()):
            raise ValueError(
                f"prefix sharing needs a dense attention mask, which attn_implementation={attn_implementation!r} "
                f"does not take: use one of {list(DENSE_MASK_ATTENTION)} or turn prefix sharing off"
            )
        return None
    allowed = segment_attention_mask(segment_ids, prefix_ids)
    return allowed if attn_implementation == "sdpa" else additive_mask(allowed, dtype)


def prompt_groups(input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """[B] group id of each row: rows with identical prompt columns (ids where ``prompt_mask`` is 1, and the mask)
    share one, numbered in order of first appearance.

    The G completions of a rollout's prompt form a group (G consecutive rows), as do the chosen and rejected
    rows of an online DPO pair wherever they sit; two equal prompts of different rows merge too, which
    changes nothing (their forwards are identical).
    """
    keys = torch.cat([input_ids * prompt_mask, prompt_mask], dim=1)  # [B, 2P]
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)  # [U, 2P], [B]: ids in sorted order
    rows = torch.arange(len(keys), device=keys.device)
    first = torch.full((len(unique),), len(keys), device=keys.device).scatter_reduce(0, inverse, rows, "amin")  # [U]
    return torch.argsort(torch.argsort(first))[inverse]  # [B]: renumbered by first appearance


@dataclass(frozen=True)
class PackedBatch:
    """A padded batch's sequences packed into fewer, longer rows (:func:`pack_batch`). R packed rows of L
    columns; N scored tokens.

    Attributes:
        input_ids: [R, L] the packed tokens (0 on padding).
        segment_ids: [R, L] the segment of each token, -1 on padding.
        prefix_ids: [R, L] the segment each token may also attend to (its shared prompt), -1 for none.
        position_ids: [R, L] (:func:`segment_position_ids`).
        positions: [N, 2] (packed row, column) of the hidden state that predicts each scored token.
        targets: [N] the scored token ids.
        sources: [N, 2] (row, column) of each scored token in the padded batch.
    """

    input_ids: torch.Tensor
    segment_ids: torch.Tensor
    prefix_ids: torch.Tensor
    position_ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    sources: torch.Tensor

    def to(self, device) -> PackedBatch:
        return PackedBatch(**{field.name: getattr(self, field.name).to(device) for field in fields(self)})

    def unpack(self, values: torch.Tensor, shape: tuple[int, int], column_offset: int = 0) -> torch.Tensor:
        """[N] values of the scored tokens -> [B, n] in the padded batch's layout, column ``c - column_offset``
        for padded column c; zero where nothing was scored. Differentiable."""
        rows, columns = self.sources.unbind(1)
        return values.new_zeros(shape).index_put((rows, columns - column_offset), values)


def _tokens_read(wanted: list[int], length: int) -> int:
    """How many of a row's first ``length`` real tokens its scored tokens (ascending indices ``wanted``) read:
    token i is predicted by the hidden state of token i - 1, which attends to tokens 0..i - 1 only (causal),
    so the tokens after the one before the last scored token change no scored value. A row without a
    scored token keeps all its tokens."""
    return wanted[-1] if wanted else length


def pack_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
    groups: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    padding_free: bool = False,
    row_length: int | None = None,
) -> PackedBatch:
    """Pack the real tokens of a padded batch, sharing prompts within groups and/or dropping padding.

    Each row's real tokens (``attention_mask`` 1, any padding side) form its sequence, up to the one before
    its last scored token: no scored value reads the tokens after it (:func:`_tokens_read`), so they are not
    fed (a DPO pair's two final tokens, each GRPO completion's last one). Without ``groups``
    every sequence is one segment. With ``groups``, the rows of a group (equal ids) share their prompt
    (``prompt_mask`` 1: the first real tokens of each row, identical across the group): one prompt segment,
    then one segment per row holding its remaining tokens, whose prefix is the prompt (an empty prompt:
    nothing shared, one segment per row). Without
    ``padding_free`` each group (each row without ``groups``) gets its own packed row; with it, each group, the
    longest first, goes end to end into the first row with room for it (first fit decreasing). Rows hold at
    most ``max(row_length, the longest group)`` tokens, or fewer where narrower rows feed fewer tokens in all
    (:func:`_fewest_tokens_capacity`): packing never makes the batch wider than the longest group, nor feed
    more tokens than one group a row (None: everything in one row). Packed rows are right-padded to the longest.

    A scored token (``score_mask`` 1; never a row's first real token) is predicted by the hidden state of
    the row's previous real token: for a completion's first token, the prompt's last position.

    Args:
        input_ids, attention_mask, score_mask: [B, T]; groups: [B] or None; prompt_mask: [B, T] with groups.
        padding_free, row_length: several groups per packed row (first fit decreasing), rows of at most
            max(row_length, longest group) tokens, the capacity that feeds the fewest tokens.

    Returns:
        A :class:`PackedBatch` on the CPU (move it with ``.to(device)``).
    """
    if not input_ids.shape == attention_mask.shape == score_mask.shape or input_ids.dim() != 2:
        raise ValueError("input_ids, attention_mask and score_mask must all be [B, T]")
    if (groups is None) != (prompt_mask is None):
        raise ValueError("pack_batch: groups and prompt_mask go together")
    real, scored = attention_mask.cpu().bool(), score_mask.cpu().bool()
    if bool((scored & ~real).any()):
        raise ValueError("pack_batch: score_mask marks a padding token")
    prompt = prompt_mask.cpu().bool() if prompt_mask is not None else torch.zeros_like(real)
    # the layout is built on python lists (one tensor per field at the end): per-row tensor ops cost more here
    ids, real, scored, prompt = (x.tolist() for x in (input_ids.cpu(), real, scored, prompt))
    group_of = groups.cpu().tolist() if groups is not None else list(range(len(ids)))
    members: dict[int, list[int]] = {}
    for row, group in enumerate(group_of):
        members.setdefault(group, []).append(row)

    tokens, segments, prefixes = [], [], []  # per packed row: flat lists of token ids, segment ids, prefix ids
    segment_count: list[int] = []  # per packed row: segments placed so far
    positions, targets, sources = [], [], []

    def add(target: int, part: list[int], prefix: int) -> None:  # a new segment at the end of row `target`
        tokens[target] += part
        segments[target] += [segment_count[target]] * len(part)
        prefixes[target] += [prefix] * len(part)
        segment_count[target] += 1

    group_rows = list(members.values())
    shared_prompts = [[t for t, in_prompt in zip(ids[rows[0]], prompt[rows[0]]) if in_prompt] for rows in group_rows]
    columns_of = [[c for c, is_real in enumerate(row_real) if is_real] for row_real in real]  # each row's real columns
    wanted_of = [  # each row's scored tokens, as indices into its sequence of real tokens
        [i for i, c in enumerate(columns) if row_scored[c]] for columns, row_scored in zip(columns_of, scored)
    ]
    read = [_tokens_read(wanted, len(columns)) for wanted, columns in zip(wanted_of, columns_of)]
    sizes = [  # each group's packed tokens: its prompt once, then the tokens of every row that are read
        len(shared) + sum(max(read[row] - len(shared), 0) for row in rows)
        for rows, shared in zip(group_rows, shared_prompts)
    ]
    if row_length is not None:  # the longest group sets the width anyway: rows as long cost no longer attention rows
        row_length = max([row_length, *sizes])
        if padding_free and sizes:  # the narrowest rows that feed the fewest tokens: merging never pads wider
            row_length = _fewest_tokens_capacity(sorted(sizes, reverse=True), row_length)
    order = list(range(len(sizes)))
    if padding_free:  # first fit decreasing: the longest groups placed first fill the rows more tightly
        order.sort(key=lambda group: -sizes[group])  # stable: equal sizes keep the batch's order
    for rows, shared, size in ((group_rows[g], shared_prompts[g], sizes[g]) for g in order):
        fits = [r for r, row_tokens in enumerate(tokens) if padding_free and _fits(len(row_tokens), size, row_length)]
        target = fits[0] if fits else len(tokens)  # first fit
        if target == len(tokens):
            tokens.append([]), segments.append([]), prefixes.append([]), segment_count.append(0)
        offset = len(tokens[target])  # where the group starts in its row

        if shared:
            prompt_segment, prompt_offset = segment_count[target], offset
            add(target, shared, -1)
            offset += len(shared)
        own = len(shared)
        for row in rows:
            columns, wanted = columns_of[row], wanted_of[row]
            sequence = [ids[row][c] for c in columns]
            if own and not (
                sum(prompt[row]) == own and all(prompt[row][c] for c in columns[:own]) and sequence[:own] == shared
            ):
                raise ValueError(f"pack_batch: row {row} does not start with the prompt of row {rows[0]} (same group)")
            rest = sequence[own : read[row]]  # the tokens after the last one a scored token reads: never fed
            location = list(range(prompt_offset, prompt_offset + own)) if own else []
            location += range(offset, offset + len(rest))  # packed columns of the row's tokens
            if wanted and wanted[0] == 0:
                raise ValueError(f"pack_batch: row {row}'s first token is scored, but nothing precedes it")
            positions += [(target, location[i - 1]) for i in wanted]
            targets += [sequence[i] for i in wanted]
            sources += [(row, columns[i]) for i in wanted]
            if rest:
                add(target, rest, prompt_segment if own else -1)
                offset += len(rest)

    width = max(map(len, tokens), default=0)

    def padded(parts: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([part + [fill] * (width - len(part)) for part in parts], dtype=input_ids.dtype)  # [R, L]

    segment_ids, prefix_ids = padded(segments, -1), padded(prefixes, -1)
    return PackedBatch(
        input_ids=padded(tokens, 0),
        segment_ids=segment_ids,
        prefix_ids=prefix_ids,
        position_ids=segment_position_ids(segment_ids, prefix_ids),
        positions=torch.tensor(positions, dtype=torch.long).view(-1, 2),
        targets=torch.tensor(targets, dtype=input_ids.dtype),
        sources=torch.tensor(sources, dtype=torch.long).view(-1, 2),
    )


def _fits(used: int, size: int, row_length: int | None) -> bool:
    return row_length is None or used + size <= row_length


def _first_fit(sizes: list[int], capacity: int) -> list[int]:
    """The tokens in each row when ``sizes`` (in this order) go first fit into rows of ``capacity`` tokens."""
    fills: list[int] = []
    for size in sizes:
        row = next((r for r, used in enumerate(fills) if used + size <= capacity), None)
        if row is None:
            fills.append(size)
        else:
            fills[row] += size
    return fills


def _fewest_tokens_capacity(sizes: list[int], capacity: int) -> int:
    """The row capacity in ``[max(sizes), capacity]`` whose first-fit packing of ``sizes`` (longest first) feeds
    the fewest tokens (rows x the fullest row's length), the narrowest of equals.

    Merging groups can cost tokens: 32 groups of 15-18 tokens in rows of 26 fit one merge, and 31 rows
    padded to 26 (806 tokens) feed more than 32 rows of 18 (576). A packing into rows of capacity C whose
    fullest row holds w tokens is also the packing for every capacity in [w, C] (each placement compares a
    fill with the capacity, and every fill that fitted is at most w), so the capacities below w are the
    only others to try: a few packings, not one per capacity.
    """
    best_tokens, best = None, capacity
    while capacity >= sizes[0]:
        fills = _first_fit(sizes, capacity)
        widest = max(fills)
        if best_tokens is None or len(fills) * widest <= best_tokens:
            best_tokens, best = len(fills) * widest, widest
        capacity = widest - 1
    return best
