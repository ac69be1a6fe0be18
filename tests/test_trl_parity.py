"""Parity with the installed TRL: the same random float64 tensors through TRL's own loss code and rlcore's.

Run it (TRL comes with the ``bench`` extra; the suite is skipped without it and left out of the default run):

    pip install -e ".[bench]"
    python -m pytest -m parity tests/test_trl_parity.py

TRL's losses are methods of its trainers, computed after a model forward pass. Each case below calls the
installed method on a minimal stand-in for the trainer (the attributes the method reads) and a stand-in model
that returns given per-token log-probs (or reward scores) instead of running a network; rlcore gets the same
tensors. Values and gradients with respect to the per-token log-probs must agree to float64 rounding.

Documented differences (asserted as such below, not hidden):
- DPO ``sigmoid``: TRL ignores ``label_smoothing``; rlcore applies it (conservative DPO) unless ``cdpo=False``.
- DPO ``sft`` / RPO: TRL's NLL is the token mean over the batch's chosen tokens; rlcore takes it from the caller
  (``chosen_nll``), here computed the same way with ``sft_loss_from_logprobs``.
- DPO ``sft`` with WPO weighting: TRL 1.16 raises (an in-place product on an expanded tensor); rlcore weighs
  the NLL like the other terms.
- DPO ``alpha_divergence``: TRL has no float64 path (its clamp table stops at float32) and clamps the exponent at
  80; it is compared in float32, away from the clamp.
- GRPO group advantages are computed inline in a long TRL method (``_generate_and_score_completions``) that
  generates and scores completions; the check uses TRL's ``nanstd`` and the formula of that method, listed in
  the test, rather than calling it.
- GRPO ``cispo``: TRL caps the ratio at ``epsilon_high`` itself; rlcore's ``cispo_loss`` at ``1 + clip_high``
  (TRL's E is rlcore's E - 1). Truncated importance sampling: TRL computes its weights inline while generating
  with vLLM; the check passes rlcore's ``truncated_importance_weights`` to TRL's loss as its
  ``importance_sampling_ratio``, so it compares how the two losses apply them.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlcore import (
    DPO_LOSS_TYPES,
    LOSS_TYPE_AGGREGATION,
    aggregate,
    cispo_loss,
    dpo_loss,
    group_advantages,
    kl_estimate,
    length_desensitized_logps,
    loss_normalizer,
    policy_loss,
    reward_pairwise_loss,
    sft_loss_from_logprobs,
    truncated_importance_weights,
    wpo_log_weights,
)

trl = pytest.importorskip("trl")
from trl.trainer import dpo_trainer, grpo_trainer, reward_trainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

pytestmark = pytest.mark.parity

DTYPE = torch.float64


class _Accelerator:
    """What the trainers' loss methods read from accelerate's Accelerator, on one process."""

    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def autocast(self):
        return contextlib.nullcontext()


class _LogprobModel(torch.nn.Module):
    """Stands in for a causal LM with TRL's fused LM head: returns the given per-token outputs."""

    def __init__(self, log_probs, log_sum_sq_probs=None):
        super().__init__()
        self.outputs = SimpleNamespace(
            log_probs=log_probs,
            log_sum_sq_probs=log_sum_sq_probs,
            entropy=torch.zeros_like(log_probs),
            mean_logits=torch.zeros_like(log_probs),
            is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
            aux_loss=None,
        )
        self.is_gradient_checkpointing = False

    def forward(self, **kwargs):
        return self.outputs


# ---------------------------------------------------------------- DPO


def _preference_batch(batch=6, length=9, seed=0):
    """A [2B, T] batch as TRL's DPO collator lays it out (chosen rows, then rejected rows): prompt tokens first,
    then a completion of random length, then padding; per-token log-probs (TRL's fused head puts 0 where the
    label is ignored), reference log-probs and WPO's log sum p^2."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (2 * batch,), generator=generator)
    completion = torch.randint(1, length - 4, (2 * batch,), generator=generator)
    position = torch.arange(length)
    completion_mask = ((position >= prompt[:, None]) & (position < (prompt + completion)[:, None])).long()
    attention_mask = (position < (prompt + completion)[:, None]).long()
    shift_mask = completion_mask[:, 1:]  # [2B, T-1]: position t scores token t + 1

    def token_logps():
        values = -torch.rand(2 * batch, length - 1, generator=generator, dtype=DTYPE) * 3
        return values * shift_mask

    logps, ref_logps = token_logps(), token_logps()
    # log sum_v p^2 >= max_v log p^2 >= 2 log p(y): a value between 2 log p(y) and 0
    log_sum_sq = 2 * logps * torch.rand(2 * batch, length - 1, generator=generator, dtype=DTYPE)
    inputs = {
        "input_ids": torch.randint(0, 50, (2 * batch, length), generator=generator),
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
    }
    return inputs, logps.requires_grad_(), ref_logps, log_sum_sq


def _trl_dpo(inputs, logps, ref_logps, log_sum_sq, loss_type, **options):
    """TRL's DPOTrainer._compute_loss on the given per-token log-probs: returns the loss tensor."""
    args = SimpleNamespace(discopop_tau=options.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None)
    loss_types = loss_type if isinstance(loss_type, list) else [loss_type]
    model = _LogprobModel(logps, log_sum_sq)
    trainer = SimpleNamespace(
        accelerator=_Accelerator(),
        args=args,
        model=model,
        ref_model=_LogprobModel(ref_logps),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        beta=options.get("beta", 0.1),
        loss_types=loss_types,
        loss_weights=options.get("loss_weights") or [1.0] * len(loss_types),
        ld_alpha=options.get("ld_alpha"),
        f_divergence_type=options.get("f_divergence", "reverse_kl"),
        f_alpha_divergence_coef=options.get("f_alpha", 0.5),
        label_smoothing=options.get("label_smoothing", 0.0),
        use_weighting=options.get("use_weighting", False),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    return dpo_trainer.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def _rlcore_dpo(inputs, logps, ref_logps, log_sum_sq, loss_type, **options):
    """rlcore's dpo_loss on the same tensors, with the per-sequence quantities a recipe computes."""
    mask = inputs["completion_mask"][:, 1:]  # [2B, T-1]
    chosen_mask, rejected_mask = mask.chunk(2)
    ld_alpha = options.get("ld_alpha")
    policy, reference = (
        (x * mask).sum(-1).chunk(2)  # [B], [B]
        if ld_alpha is None
        else length_desensitized_logps(x.chunk(2)[0], chosen_mask, x.chunk(2)[1], rejected_mask, ld_alpha)
        for x in (logps, ref_logps)
    )
    lengths = inputs["completion_mask"].sum(-1).chunk(2)
    chosen_nll, _ = sft_loss_from_logprobs(logps.chunk(2)[0], chosen_mask)
    wpo = {}
    if options.get("use_weighting"):
        log_weights = wpo_log_weights(logps, log_sum_sq, mask).chunk(2)
        wpo = {"chosen_wpo_logweights": log_weights[0], "rejected_wpo_logweights": log_weights[1]}
    loss, _ = dpo_loss(
        *policy,
        *reference,
        beta=options.get("beta", 0.1),
        loss_type=loss_type,
        label_smoothing=options.get("label_smoothing", 0.0),
        loss_weights=options.get("loss_weights"),
        cdpo=options.get("cdpo", True),
        f_divergence=options.get("f_divergence", "reverse_kl"),
        f_alpha=options.get("f_alpha", 0.5),
        discopop_tau=options.get("discopop_tau", 0.05),
        chosen_lengths=lengths[0],
        rejected_lengths=lengths[1],
        chosen_nll=chosen_nll,
        **wpo,
    )
    return loss


def _assert_dpo_parity(loss_type, dtype=DTYPE, **options):
    inputs, logps, ref_logps, log_sum_sq = _preference_batch()
    logps = logps.detach().to(dtype).requires_grad_()
    ref_logps, log_sum_sq = ref_logps.to(dtype), log_sum_sq.to(dtype)
    trl_loss = _trl_dpo(inputs, logps, ref_logps, log_sum_sq, loss_type, **options)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)
    ours = _rlcore_dpo(inputs, logps, ref_logps, log_sum_sq, loss_type, **options)
    (our_grad,) = torch.autograd.grad(ours, logps)
    tolerance = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    # TRL sums every position (its fused head gives 0 outside the completion), so only completion positions
    # have a gradient that means anything.
    mask = inputs["completion_mask"][:, 1:]
    torch.testing.assert_close(ours, trl_loss, **tolerance)
    torch.testing.assert_close(our_grad * mask, trl_grad * mask, **tolerance)
    assert (trl_grad * mask).abs().sum() > 0


# Options per loss type: label smoothing where the type reads it (EXO needs it > 0).
_SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_loss_types_match_trl(loss_type, beta):
    _assert_dpo_parity(loss_type, beta=beta, label_smoothing=_SMOOTHING.get(loss_type, 0.0))


def test_dpo_sigmoid_label_smoothing_is_a_documented_difference():
    # TRL's sigmoid ignores label_smoothing; rlcore's applies it (cDPO) unless cdpo=False.
    _assert_dpo_parity("sigmoid", label_smoothing=0.2, cdpo=False)
    with pytest.raises(AssertionError):
        _assert_dpo_parity("sigmoid", label_smoothing=0.2)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"])
def test_dpo_f_divergences_match_trl(divergence, loss_type):
    _assert_dpo_parity(loss_type, f_divergence=divergence, label_smoothing=_SMOOTHING.get(loss_type, 0.0))


@pytest.mark.parametrize("alpha", [0.3, 1.0, 1.6])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_alpha_divergence_matches_trl_in_float32(alpha, loss_type):
    # TRL's alpha divergence has no float64 case (a KeyError on its clamp table): compare in float32.
    _assert_dpo_parity(loss_type, dtype=torch.float32, f_divergence="alpha_divergence", f_alpha=alpha)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair", "apo_zero", "sigmoid_norm", "discopop"])
def test_dpo_wpo_weighting_matches_trl(loss_type):
    _assert_dpo_parity(loss_type, use_weighting=True)


def test_dpo_sft_with_wpo_weighting_fails_in_trl():
    # TRL 1.16 multiplies its expanded (stride-0) sft loss in place by the WPO weights, which torch refuses.
    # rlcore weighs the sft term like any other: chosen_nll * mean_b(w_c w_r).
    inputs, logps, ref_logps, log_sum_sq = _preference_batch()
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        _trl_dpo(inputs, logps, ref_logps, log_sum_sq, "sft", use_weighting=True)
    mask = inputs["completion_mask"][:, 1:]
    nll, _ = sft_loss_from_logprobs(logps.chunk(2)[0], mask.chunk(2)[0])
    log_weights = wpo_log_weights(logps, log_sum_sq, mask).chunk(2)
    expected = nll * torch.exp(log_weights[0] + log_weights[1]).mean()
    ours = _rlcore_dpo(inputs, logps, ref_logps, log_sum_sq, "sft", use_weighting=True)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "aot"])
def test_dpo_ld_alpha_matches_trl(ld_alpha, loss_type):
    _assert_dpo_parity(loss_type, ld_alpha=ld_alpha)


def test_dpo_mpo_weighted_sum_matches_trl():
    # MPO: sigmoid + bco_pair + sft with weights 0.8, 0.2, 1.0 (RPO is ["sigmoid", "sft"] with weights [1, alpha]).
    _assert_dpo_parity(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    _assert_dpo_parity(["sigmoid", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.5)
    _assert_dpo_parity(["sigmoid", "ipo"], loss_weights=[1.0, 0.3], use_weighting=True, ld_alpha=0.5)


# ---------------------------------------------------------------- GRPO


def _trl_grpo_loss(
    loss_type,
    logps,
    old_logps,
    ref_logps,
    advantages,
    mask,
    beta,
    max_completion_length,
    importance_sampling_level="token",
    epsilon_high=0.28,
    importance_sampling_ratio=None,
):
    trainer = SimpleNamespace(
        accelerator=_Accelerator(),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        model=SimpleNamespace(training=True),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=epsilon_high,
        use_vllm=importance_sampling_ratio is not None,
        vllm_importance_sampling_correction=importance_sampling_ratio is not None,
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, torch.zeros_like(logps), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(mask.shape[0], 2, dtype=torch.long),
        "prompt_mask": torch.ones(mask.shape[0], 2, dtype=torch.long),
        "completion_ids": torch.zeros(mask.shape, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
        "ref_per_token_logps": ref_logps,
        "num_items_in_batch": mask.sum().to(DTYPE),
    }
    if importance_sampling_ratio is not None:
        inputs["importance_sampling_ratio"] = importance_sampling_ratio
    return grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_types_match_trl(loss_type, beta):
    generator = torch.Generator().manual_seed(1)
    batch, length = 8, 7
    mask = (torch.rand(batch, length, generator=generator) < 0.75).long()
    mask[:, 0] = 1
    old_logps = -torch.rand(batch, length, generator=generator, dtype=DTYPE) * 2
    # ratios spread over [0.6, 1.5] so that both clips bind somewhere
    logps = old_logps + torch.empty(batch, length, dtype=DTYPE).uniform_(-0.5, 0.4, generator=generator)
    logps.requires_grad_()
    ref_logps = old_logps + 0.1 * torch.randn(batch, length, generator=generator, dtype=DTYPE)
    advantages = torch.randn(batch, generator=generator, dtype=DTYPE)
    max_completion_length = 10

    trl_loss = _trl_grpo_loss(loss_type, logps, old_logps, ref_logps, advantages, mask, beta, max_completion_length)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)

    # rlcore: the aggregation TRL's loss type names (LOSS_TYPE_AGGREGATION) and its normaliser for one micro-batch;
    # the KL penalty is a separate k3 term, aggregated alike.
    options = {"agg": LOSS_TYPE_AGGREGATION[loss_type], "max_len": max_completion_length}
    options["normalizer"] = loss_normalizer(loss_type, mask, mask, 1)
    ours, _ = policy_loss(logps, old_logps, advantages, mask, clip_low=0.2, clip_high=0.28, **options)
    if beta:
        ours = ours + beta * aggregate(
            kl_estimate(logps, ref_logps, kind="k3"),
            mask,
            options["agg"],
            max_len=max_completion_length,
            normalizer=options["normalizer"],
        )
    (our_grad,) = torch.autograd.grad(ours, logps)
    torch.testing.assert_close(ours, trl_loss)
    torch.testing.assert_close(our_grad, trl_grad)


@pytest.mark.parametrize(
    "loss_type, level, tis_mode",
    [
        ("grpo", "sequence", None),
        ("cispo", "token", None),
        ("dapo", "token", "token_truncate"),
        ("grpo", "token", "sequence_mask"),
    ],
)
def test_grpo_variants_match_trl(loss_type, level, tis_mode):
    """GSPO's sequence-level ratio, CISPO and truncated importance sampling. Documented differences: TRL's cispo
    caps the ratio at ``epsilon_high`` itself (here 1.28), rlcore's ``cispo_loss`` at ``1 + clip_high`` (0.28);
    the TIS weights (``truncated_importance_weights``, against sampler log-probs) are given to TRL as its
    ``importance_sampling_ratio`` input, so what is compared is how the loss applies them."""
    generator = torch.Generator().manual_seed(2)
    batch, length = 8, 7
    mask = (torch.rand(batch, length, generator=generator) < 0.75).long()
    mask[:, 0] = 1
    old_logps = -torch.rand(batch, length, generator=generator, dtype=DTYPE) * 2
    logps = old_logps + torch.empty(batch, length, dtype=DTYPE).uniform_(-0.5, 0.4, generator=generator)
    logps.requires_grad_()
    sampler_logps = old_logps + 0.3 * torch.randn(batch, length, generator=generator, dtype=DTYPE)
    advantages = torch.randn(batch, generator=generator, dtype=DTYPE)
    weights = None
    if tis_mode is not None:
        weights = truncated_importance_weights(old_logps, sampler_logps, mask, cap=1.5, mode=tis_mode)
    trl_loss = _trl_grpo_loss(
        loss_type, logps, old_logps, old_logps, advantages, mask, 0.0, 10,
        importance_sampling_level=level, epsilon_high=1.28 if loss_type == "cispo" else 0.28,
        importance_sampling_ratio=weights,
    )  # fmt: skip
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)
    options = {
        "agg": LOSS_TYPE_AGGREGATION[loss_type],
        "max_len": 10,
        "normalizer": loss_normalizer(loss_type, mask, mask, 1),
    }
    options |= {"importance_sampling_level": level, "importance_weights": weights}
    if loss_type == "cispo":
        ours, _ = cispo_loss(logps, old_logps, advantages, mask, clip_high=0.28, **options)
    else:
        ours, _ = policy_loss(logps, old_logps, advantages, mask, clip_low=0.2, clip_high=0.28, **options)
    (our_grad,) = torch.autograd.grad(ours, logps)
    torch.testing.assert_close(ours, trl_loss)
    torch.testing.assert_close(our_grad, trl_grad)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl_formula(scale):
    # TRL's _generate_and_score_completions (sum_then_normalize): A = r - mean_group(r), divided by
    # (nanstd(group) + 1e-4) for "group", (nanstd(all) + 1e-4) for "batch", nothing for "none".
    generator = torch.Generator().manual_seed(2)
    group_size = 4
    rewards = torch.randn(5 * group_size, generator=generator, dtype=DTYPE)
    rewards[:group_size] = 1.0  # a group with equal rewards: advantage 0
    grouped = rewards.view(-1, group_size)
    centered = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        std = nanstd(grouped, dim=1).repeat_interleave(group_size)
    elif scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    expected = centered if scale == "none" else centered / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, group_size, scale=scale), expected)


# ---------------------------------------------------------------- reward model


@pytest.mark.parametrize("center_coef", [None, 0.01])
@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_pairwise_loss_matches_trl(center_coef, with_margin):
    generator = torch.Generator().manual_seed(3)
    batch = 7
    scores = torch.randn(2 * batch, 1, generator=generator, dtype=DTYPE, requires_grad=True)
    margin = torch.rand(batch, generator=generator, dtype=DTYPE)
    inputs = {"input_ids": torch.zeros(2 * batch, 3, dtype=torch.long), "attention_mask": torch.ones(2 * batch, 3)}
    if with_margin:
        inputs["margin"] = margin
    model = SimpleNamespace(training=True)
    trainer = SimpleNamespace(
        model=model,
        args=SimpleNamespace(center_rewards_coefficient=center_coef),
        accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    trl_loss = reward_trainer.RewardTrainer.compute_loss(
        trainer, lambda **kwargs: SimpleNamespace(logits=scores), inputs
    )
    chosen, rejected = scores.squeeze(-1).chunk(2)
    ours, _ = reward_pairwise_loss(
        chosen, rejected, margin=margin if with_margin else None, center_coef=center_coef or 0.0
    )
    torch.testing.assert_close(ours, trl_loss)
    torch.testing.assert_close(torch.autograd.grad(ours, scores)[0], torch.autograd.grad(trl_loss, scores)[0])
    assert not math.isnan(ours.item())


# ---------------------------------------------------------------- KTO, ORPO, CPO / SimPO
# Place for the reference-free and unpaired losses (kto_loss against KTOTrainer, orpo_loss and cpo_loss /
# simpo_loss against the ORPO / CPO loss code of the installed TRL), with the same stand-ins as above.
