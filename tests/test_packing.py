"""Packed forwards (rlcore.packing): the block mask and position ids by hand and against a slow loop; prefix
sharing (GRPO groups, DPO pairs) and padding-free batches equal to the padded forward in float64, values and
gradients, for eager and sdpa attention, the chunked and the full LM head, Llama and Qwen2."""

import pytest
import torch
from helpers import PAD, VOCAB, small_qwen2_config
from transformers import Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from rlcore import data, lora, models, packing, toy

# ------------------------------------------------------------------------------------------------ the mask


def test_mask_and_positions_by_hand():
    # row: prompt "a b" (segment 0), completion "c d" (1, prefix 0), completion "e" (2, prefix 0), one pad
    segments = torch.tensor([[0, 0, 1, 1, 2, -1]])
    prefixes = torch.tensor([[-1, -1, 0, 0, 0, -1]])
    allowed = packing.segment_attention_mask(segments, prefixes)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],  # a: itself
            [1, 1, 0, 0, 0, 0],  # b: a, itself
            [1, 1, 1, 0, 0, 0],  # c: the prompt, itself
            [1, 1, 1, 1, 0, 0],  # d: the prompt, c, itself
            [1, 1, 0, 0, 1, 0],  # e: the prompt, itself (not the other completion)
            [0, 0, 0, 0, 0, 1],  # padding: itself only
        ]
    )
    assert torch.equal(allowed, expected)
    # positions: the prompt 0, 1; each completion continues from the prompt's length 2
    assert packing.segment_position_ids(segments, prefixes).tolist() == [[0, 1, 2, 3, 2, 0]]
    # without a prefix relation: block-diagonal causal, positions restart
    assert packing.segment_position_ids(segments).tolist() == [[0, 1, 0, 1, 0, 0]]
    assert packing.segment_attention_mask(segments)[0, 0, 2].tolist() == [False, False, True, False, False, False]


def test_mask_equals_a_slow_loop():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 5, (2, 6), generator=generator)  # 6 segments per row, then padding
    segments = torch.full((2, 30), -1)
    for row in range(2):
        segments[row, : int(lengths[row].sum())] = torch.repeat_interleave(torch.arange(6), lengths[row])
    prefixes = torch.where(segments > 0, (segments - 1) // 2 * 2, -1)  # segment 2k-1, 2k -> prefix 2k-2 (some before)
    prefixes = torch.where(prefixes < segments, prefixes, -1)
    allowed = packing.segment_attention_mask(segments, prefixes)[:, 0]
    for b in range(2):
        for q in range(30):
            for k in range(30):
                sq, sk, pq = int(segments[b, q]), int(segments[b, k]), int(prefixes[b, q])
                want = k <= q and sk >= 0 and (sk == sq or sk == pq) if sq >= 0 else k == q
                assert bool(allowed[b, q, k]) == want, (b, q, k)


def test_eager_gets_an_additive_mask_and_flash_refuses_prefix_sharing():
    segments, prefixes = torch.tensor([[0, 1]]), torch.tensor([[-1, 0]])
    eager = packing.model_attention_mask("eager", segments, prefixes, torch.float64)
    assert eager.dtype == torch.float64 and eager[0, 0].tolist() == [[0.0, torch.finfo(torch.float64).min], [0.0, 0.0]]
    assert packing.model_attention_mask("sdpa", segments, prefixes, torch.float32).dtype == torch.bool
    assert packing.model_attention_mask("flash_attention_2", segments, None, torch.float32) is None
    with pytest.raises(ValueError, match="prefix sharing needs a dense attention mask"):
        packing.model_attention_mask("flash_attention_2", segments, prefixes, torch.float32)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_position_ids_alone_separate_packed_rows_only_without_cache(implementation):
    """What rlcore.data.pack_sequences relies on: no mask + restarting position ids + use_cache=False."""
    model = toy.tiny_model().double().eval()
    model.set_attn_implementation(implementation)
    first, second = torch.randint(4, VOCAB, (1, 7)), torch.randint(4, VOCAB, (1, 5))
    apart = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1)
    ids, positions = torch.cat([first, second], 1), torch.cat([torch.arange(7), torch.arange(5)])[None]
    packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(packed, apart, rtol=0, atol=1e-12)
    leaking = model(input_ids=ids, position_ids=positions, use_cache=True).logits  # a cache: sequences mix
    assert (leaking - apart).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ forwards


def _model(kind: str, implementation: str):  # float64 weights
    torch.manual_seed(0)
    model = toy.tiny_model() if kind == "llama" else Qwen2ForCausalLM(small_qwen2_config())
    model.set_attn_implementation(implementation)
    return model.double().train()


def _rollout_batch(prompts: int = 3, group: int = 3, completion: int = 5):
    """Left-padded prompts of lengths 1..6 repeated ``group`` times, then completions of ragged lengths."""
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(5, VOCAB, (prompts, 6), generator=generator)
    prompt_mask = (torch.arange(6) >= 6 - torch.tensor([1, 6, 3])[:prompts, None]).long()
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, PAD).repeat_interleave(group, 0)
    prompt_mask = prompt_mask.repeat_interleave(group, 0)
    rows = prompts * group
    lengths = torch.randint(1, completion + 1, (rows,), generator=generator)
    lengths[0] = completion  # one truncated row (no EOS)
    completion_mask = (torch.arange(completion) < lengths[:, None]).long()
    completion_ids = torch.randint(5, VOCAB, (rows, completion), generator=generator)
    completion_ids[torch.arange(rows), lengths - 1] = 1  # EOS ends each row (but the truncated one)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, PAD)
    sequences = torch.cat([prompt_ids, completion_ids], 1)
    return sequences, torch.cat([prompt_mask, completion_mask], 1), completion_mask, group


def _row_by_row_logprobs(model, sequences, attention_mask, last, temperature=1.0, chunk_size=4):
    """The slow reference: each row alone, its padding dropped, scored over its last ``last`` columns.
    (Eager attention in float64 gives NaN on left-padded batches in transformers: its softmax runs in
    float32, where the float64 mask minimum is -inf, so a padding row is all -inf; rows alone have none.)"""
    rows = []
    for ids, real in zip(sequences, attention_mask.bool()):
        tokens = ids[real][None]  # [1, n_b]
        scored = int(real[-last:].sum())  # the row's real completion tokens (right-padded completion)
        logp, entropy = models.token_logprobs(
            model, tokens, torch.ones_like(tokens), scored, temperature, with_entropy=True, chunk_size=chunk_size
        )
        pad = (0, last - scored)
        rows.append((torch.nn.functional.pad(logp[0], pad), torch.nn.functional.pad(entropy[0], pad)))
    return torch.stack([logp for logp, _ in rows]), torch.stack([entropy for _, entropy in rows])


# transformers computes RMSNorm in float32 whatever the dtype: summing the prompt's gradient once (shared) or
# G times (unshared) then rounds at 1e-7. With the norms kept in float64 (the fixture below), sdpa in float64
# is float64 throughout and the two agree to summation order. Eager attention runs its softmax in float32
# whatever the dtype, so rows with different masked columns round differently (~1e-7): a looser tolerance.
TOLERANCE = {"sdpa": {"rtol": 1e-9, "atol": 1e-10}, "eager": {"rtol": 1e-5, "atol": 1e-6}}


def _norm_in_input_dtype(self, hidden):
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.fixture(autouse=True)
def float64_norms(monkeypatch):
    for norm in (LlamaRMSNorm, Qwen2RMSNorm):
        monkeypatch.setattr(norm, "forward", _norm_in_input_dtype)


def _grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(
    "kind,implementation,chunk", [("llama", "eager", 4), ("llama", "sdpa", 0), ("qwen2", "sdpa", 4)]
)
def test_grpo_prefix_sharing_equals_unshared(kind, implementation, chunk):
    model = _model(kind, implementation)
    sequences, attention_mask, mask, group = _rollout_batch()
    weights = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    prompt_mask = attention_mask * (torch.arange(sequences.shape[1]) < sequences.shape[1] - mask.shape[1])
    assert packing.prompt_groups(sequences, prompt_mask).tolist() == (torch.arange(9) // group).tolist()
    forwards = {
        "row by row": lambda: _row_by_row_logprobs(model, sequences, attention_mask, mask.shape[1], 0.7, chunk),
        "shared": lambda: models.token_logprobs(
            model,
            sequences,
            attention_mask,
            mask.shape[1],
            0.7,
            with_entropy=True,
            chunk_size=chunk,
            share_prompts=True,
        ),
    }
    if implementation == "sdpa":  # the padded batch (eager float64 pads to NaN, see _row_by_row_logprobs)
        forwards["padded"] = lambda: models.token_logprobs(
            model, sequences, attention_mask, mask.shape[1], 0.7, with_entropy=True, chunk_size=chunk
        )
    results = {}
    for name, forward in forwards.items():
        logp, entropy = forward()
        (logp * mask * weights).sum().backward()
        results[name] = (logp * mask, entropy * mask, _grads(model))
    logp, entropy, grads = results.pop("shared")
    assert len(grads) > 0
    for name, (other_logp, other_entropy, other_grads) in results.items():
        torch.testing.assert_close(logp, other_logp, **TOLERANCE[implementation], msg=name)
        torch.testing.assert_close(entropy, other_entropy, **TOLERANCE[implementation], msg=name)
        for grad, other in zip(grads, other_grads, strict=True):
            torch.testing.assert_close(grad, other, **TOLERANCE[implementation], msg=name)


def test_grpo_prefix_sharing_entropy_gradient_and_lora_reference():
    """The full-logits path (an entropy bonus's gradient) and the LoRA reference (adapters off)."""
    model = lora.prepare_model(_model("llama", "sdpa"), 4, 8, 0.0, "all-linear", False).double()
    for module in model.modules():  # non-zero B, so that adapters on and off differ
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B, std=0.1)
    sequences, attention_mask, mask, group = _rollout_batch(prompts=2, group=4)
    results = []
    for shared in (False, True):
        _, entropy = models.token_logprobs(
            model, sequences, attention_mask, mask.shape[1], with_entropy=True, entropy_grad=True, share_prompts=shared
        )
        (entropy * mask).sum().backward()
        with lora.reference_context(model) as reference:
            ref_logp, _ = models.token_logprobs(
                reference, sequences, attention_mask, mask.shape[1], share_prompts=shared
            )
        results.append((entropy * mask, ref_logp * mask, _grads(model)))
    with torch.no_grad():  # adapters on differ from off
        policy_logp, _ = models.token_logprobs(model, sequences, attention_mask, mask.shape[1], share_prompts=True)
    assert not torch.allclose(policy_logp * mask, results[1][1])
    for unshared_value, shared_value in zip(results[0][:2], results[1][:2]):
        torch.testing.assert_close(shared_value, unshared_value, **TOLERANCE["sdpa"])
    for grad, shared in zip(results[0][2], results[1][2], strict=True):
        torch.testing.assert_close(shared, grad, **TOLERANCE["sdpa"])


def test_prompt_groups_anywhere_in_the_batch():
    """Online DPO's layout: chosen rows, then rejected rows; each pair's rows share a prompt far apart."""
    model = _model("llama", "sdpa")
    sequences, attention_mask, mask, _ = _rollout_batch()
    order = torch.tensor([0, 3, 6, 1, 4, 7, 2, 5, 8])  # the groups of 3 interleaved
    sequences, attention_mask, mask = sequences[order], attention_mask[order], mask[order]
    prompt_mask = attention_mask * (torch.arange(sequences.shape[1]) < sequences.shape[1] - mask.shape[1])
    assert packing.prompt_groups(sequences, prompt_mask).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    padded, _ = models.sequence_logprobs(model, sequences, attention_mask, mask, average=True)
    shared, _ = models.sequence_logprobs(model, sequences, attention_mask, mask, average=True, share_prompts=True)
    torch.testing.assert_close(shared, padded, **TOLERANCE["sdpa"])


def _preference_batch():
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    chosen = [[20, 21, 1], [22, 1], [23]]
    rejected = [[30, 1], [31, 32, 33, 34, 1], [35, 36]]
    return data.collate_preference(prompts, chosen, rejected, PAD)


@pytest.mark.parametrize("shared_prefix,padding_free", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_dpo_pairs_packed_equal_padded(implementation, shared_prefix, padding_free):
    model = _model("llama", implementation)
    batch = _preference_batch()
    results = []
    for options in ({}, {"shared_prefix": shared_prefix, "padding_free": padding_free}):
        logps, token_logp = models.pair_logprobs(model, batch, chunk_size=4, **options)
        chosen, rejected = logps.chunk(2)
        (torch.nn.functional.logsigmoid(chosen - rejected).sum() + 0.1 * logps.sum()).backward()
        results.append((logps, token_logp * batch["completion_mask"][:, 1:], _grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], **TOLERANCE[implementation])
    torch.testing.assert_close(results[1][1], results[0][1], **TOLERANCE[implementation])
    for grad, packed in zip(results[0][2], results[1][2], strict=True):
        torch.testing.assert_close(packed, grad, **TOLERANCE[implementation])


def test_pack_batch_layout_and_bad_groups():
    batch = _preference_batch()
    groups = torch.arange(6) % 3
    prompt_mask = batch["attention_mask"] * (1 - batch["completion_mask"])
    inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"], groups, prompt_mask)
    packed = packing.pack_batch(*inputs)
    # pair 0: prompt [5 6 7], chosen [20 21 1], rejected [30 1]. The chosen's first token is predicted by the
    # prompt's last position (2). Each completion's final token (1) predicts nothing and is left out:
    # [5 6 7 | 20 21 | 30], the rejected's 1 predicted by its 30 (position 5).
    assert packed.input_ids[0].tolist()[:6] == [5, 6, 7, 20, 21, 30]
    assert packed.position_ids[0].tolist()[:6] == [0, 1, 2, 3, 4, 3]
    assert packed.positions[:5].tolist() == [[0, 2], [0, 3], [0, 4], [0, 2], [0, 5]]
    assert packed.targets[:5].tolist() == [20, 21, 1, 30, 1]
    # pair 2: prompt [9..13], chosen [23] (read from the prompt alone: no segment), rejected [35 36] -> [35]
    assert packed.input_ids[2].tolist()[:6] == [9, 10, 11, 12, 13, 35] and packed.segment_ids[2, :6].max() == 1
    # padding-free: everything in one row (row_length None), or first fit into rows of at most 16 tokens,
    # narrower where that feeds fewer tokens: one row of 12 and one of 6 (24 tokens) would feed more than three
    # of 6 (18)
    one_row = packing.pack_batch(*inputs, padding_free=True)  # three pairs of 6 packed tokens each
    assert one_row.input_ids.shape == (1, 18) and one_row.position_ids[0, 6:9].tolist() == [0, 1, 1]
    assert one_row.segment_ids[0, 6] == 3  # pair 1's prompt [8], the row's fourth segment
    assert one_row.prefix_ids[0, 7:9].tolist() == [3, 3]  # pair 1's chosen [22] and rejected [31..] see it
    bins = packing.pack_batch(*inputs, padding_free=True, row_length=16)
    assert bins.input_ids.shape == (3, 6)
    model = _model("llama", "sdpa")
    padded, _ = models.pair_logprobs(model, batch)
    for packed in (one_row, bins):
        logp, _ = models.packed_logprobs(model, packed)
        summed = packed.unpack(logp, (6, batch["input_ids"].shape[1] - 1), column_offset=1).sum(1)
        torch.testing.assert_close(summed, padded, **TOLERANCE["sdpa"])
    # rows never narrower than the longest group: row_length 4 < 6 packs into rows of 6, as wide as unpacked
    assert packing.pack_batch(*inputs, padding_free=True, row_length=4).input_ids.shape == (3, 6)
    wrong = groups.clone()
    wrong[3] = 1  # rejected of pair 0 grouped with pair 1: a different prompt
    with pytest.raises(ValueError, match="row 3 does not start with the prompt of row 1"):
        packing.pack_batch(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], wrong, prompt_mask)


def test_padding_free_rows_as_wide_as_the_longest_sequence():
    """Sequences of 6, 3 and 3 tokens, every token but the first scored, row_length 2 (narrower than any). Each
    sequence's last token predicts nothing and is not fed: 5, 2 and 2 tokens, in rows of 5 filled first fit,
    so the two short sequences share a row; the packed batch is no wider than the longest sequence."""
    ids = torch.arange(1, 19).view(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 3 + [0] * 3])
    packed = packing.pack_batch(ids, mask, mask * (torch.arange(6) > 0), padding_free=True, row_length=2)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 13, 14, 0]]
    assert packed.position_ids[1].tolist()[:4] == [0, 1, 0, 1]
    assert packed.sources.tolist() == [[0, c] for c in range(1, 6)] + [[1, 1], [1, 2], [2, 1], [2, 2]]


def test_padding_free_rows_feed_the_fewest_tokens():
    """The row capacity is the one, up to row_length, whose first-fit-decreasing rows feed the fewest tokens.

    By hand, sizes 10, 6, 4, 3 in rows of at most 20 tokens (rows x fullest row):
        20: [10+6+4, 3] -> 2 x 20 = 40     19: [10+6+3, 4] -> 38     18: [10+6, 4+3] -> 32
        15: [10+4, 6+3] -> 2 x 14 = 28     13: [10+3, 6+4] -> 26     12: [10, 6+4, 3] -> 30
    so rows of 13; capacities between a packing's fullest row and its capacity give the same packing.
    Against a reference that tries every capacity, on random sizes: the same token count, never more than
    one group a row.
    """
    assert packing._first_fit([10, 6, 4, 3], 13) == [13, 10]
    assert packing._fewest_tokens_capacity([10, 6, 4, 3], 20) == 13
    # rows of up to 26: the one merge that fits (15 + 10) would pad every row to 25, 5 x 25 = 125 tokens
    # against 6 x 18 = 108 unmerged; none is made
    assert packing._fewest_tokens_capacity([18, 17, 16, 15, 15, 10], 26) == 18
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        count = int(torch.randint(1, 20, (1,), generator=generator))
        sizes = sorted(torch.randint(1, 30, (count,), generator=generator).tolist(), reverse=True)
        cap = sizes[0] + int(torch.randint(0, 40, (1,), generator=generator))

        def tokens(capacity: int, sizes: list[int] = sizes) -> int:
            fills = packing._first_fit(sizes, capacity)
            return len(fills) * max(fills)

        chosen = packing._fewest_tokens_capacity(sizes, cap)
        assert sizes[0] <= chosen <= cap
        assert tokens(chosen) == min(tokens(c) for c in range(sizes[0], cap + 1)) <= len(sizes) * sizes[0]


def test_pack_batch_of_a_left_padded_rollout_by_hand():
    """GRPO's layout: left-padded prompts, right-padded completions, G = 2 rows per prompt; one completion of
    one token, one empty. Each group becomes [prompt, completion_1, completion_2], each completion without its
    last token (it predicts nothing): [5 6 | 7] and [9 10 11 | 12]. A one-token or empty completion adds nothing;
    the first completion token is predicted by the prompt's last position."""
    input_ids = torch.tensor([[0, 5, 6, 7, 1], [0, 5, 6, 8, 0], [9, 10, 11, 12, 1], [9, 10, 11, 0, 0]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    prompt_mask = attention_mask * (torch.arange(5) < 3)
    score_mask = attention_mask - prompt_mask
    packed = packing.pack_batch(input_ids, attention_mask, score_mask, torch.tensor([0, 0, 1, 1]), prompt_mask)
    assert packed.input_ids.tolist() == [[5, 6, 7, 0], [9, 10, 11, 12]]
    assert packed.segment_ids.tolist() == [[0, 0, 1, -1], [0, 0, 0, 1]]
    assert packed.prefix_ids.tolist() == [[-1, -1, 0, -1], [-1, -1, -1, 0]]
    assert packed.position_ids.tolist()[1] == [0, 1, 2, 3]  # completions continue the prompt
    assert packed.position_ids.tolist()[0][:3] == [0, 1, 2]
    assert packed.positions.tolist() == [[0, 1], [0, 2], [0, 1], [1, 2], [1, 3]]
    assert packed.targets.tolist() == [7, 1, 8, 12, 1]
    assert packed.sources.tolist() == [[0, 3], [0, 4], [1, 3], [2, 3], [2, 4]]
    assert packed.positions.dtype == packed.sources.dtype == packed.targets.dtype == torch.long
    nothing = packing.pack_batch(input_ids, attention_mask, torch.zeros_like(score_mask))  # nothing scored
    assert nothing.positions.shape == (0, 2) and nothing.targets.shape == (0,) and nothing.input_ids.shape == (4, 5)


# ------------------------------------------------------------------------------------------------ recipes


def _losses(run_dir) -> list[tuple[int, float]]:
    from test_recipes_online import read_metrics

    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r and "step" in r]


@pytest.mark.slow
def test_grpo_recipe_with_prefix_sharing_repeats_the_unshared_run(tmp_path):
    from test_recipes_online import run_recipe

    flags = ("--max_steps", "3", "--batch_size", "2", "--num_generations", "2", "--beta", "0.1", "--seed", "1")
    runs = []
    for name, extra in (("unshared", ("--no-prefix_sharing",)), ("shared", ("--prefix_sharing",))):
        (tmp_path / name).mkdir()
        runs.append(_losses(run_recipe("grpo", tmp_path / name, *flags, *extra)))
    assert len(runs[0]) == 3 and any(loss != 0 for _, loss in runs[0])
    for (step, loss), (shared_step, shared_loss) in zip(*runs, strict=True):
        assert step == shared_step and abs(shared_loss - loss) <= 1e-6 + 1e-5 * abs(loss), (step, loss, shared_loss)


@pytest.mark.parametrize(
    "recipe, flags, packed_flags",
    [
        ("sft", [], ["--padding_free"]),
        pytest.param(
            "dpo", ["--warm_start_steps", "0", "--no-prefix_sharing"], ["--padding_free"], marks=pytest.mark.slow
        ),
        pytest.param(  # + the chosen NLL
            "dpo",
            ["--warm_start_steps", "0", "--rpo_alpha", "1.0"],
            ["--prefix_sharing", "--no-padding_free"],
            marks=pytest.mark.slow,
        ),
        pytest.param(  # the default: pairs [prompt, chosen, rejected], several to a row
            "dpo", ["--warm_start_steps", "0"], ["--prefix_sharing", "--padding_free"], marks=pytest.mark.slow
        ),
    ],
)
def test_packed_recipe_repeats_the_padded_run(tmp_path, recipe, flags, packed_flags):
    from helpers import load_recipe
    from test_recipes_offline import SMALL_RUN

    main = load_recipe(recipe).main
    common = ["--max_steps", "3", "--batch_size", "4", "--eval_split", "none", *SMALL_RUN, *flags]
    padded_flags = ["--no-prefix_sharing", "--no-padding_free"] if recipe == "dpo" else []
    main(["--output_dir", str(tmp_path / "padded"), *common, *padded_flags])
    main(["--output_dir", str(tmp_path / "packed"), *common, *packed_flags])
    padded, packed = _losses(tmp_path / "padded"), _losses(tmp_path / "packed")
    assert len(padded) == 3 and [step for step, _ in packed] == [step for step, _ in padded]
    for (_, loss), (_, packed_loss) in zip(padded, packed):
        assert abs(packed_loss - loss) <= 1e-6, (padded, packed)
