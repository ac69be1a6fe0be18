"""Parity with TRL: rlcore's KTO, ORPO and CPO / SimPO losses against the installed TRL's own loss code, on the
same random float64 tensors.

Run: ``pip install -e .[bench]`` (TRL), then ``python -m pytest -m parity tests/test_trl_parity_kto_orpo.py``.
Nothing of TRL is copied: each test calls TRL's method unbound, with a stand-in for the trainer's ``self`` that
holds only the attributes the method reads (beta, loss type, weights, the accelerator's device).

Documented differences (asserted where they show):
- ``ORPOTrainer.odds_ratio_loss`` casts the log-probs to float32 (``.float()``), so ORPO agrees to float32
  precision only; rlcore keeps the input dtype.
- TRL's ORPO NLL covers prompt and completion tokens, rlcore's recipe only the completion: the NLL is an input
  of ``orpo_loss`` here, the same tensor on both sides.
- KTO: TRL computes the loss inside ``KTOTrainer._compute_loss`` from model outputs; the test feeds it a stand-in
  model that returns the given per-token log-probs, with the reference log-probs precomputed.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlcore import cpo_loss, kto_loss, orpo_loss, simpo_loss

pytest.importorskip("trl")
pytestmark = pytest.mark.parity

B, T = 12, 7  # rows, tokens per row (T - 1 scored positions)


def _trl_module(path: str):
    module = pytest.importorskip(path)
    return module


def random_logps(generator: torch.Generator, rows: int = B, low: float = -6.0, high: float = -0.05) -> torch.Tensor:
    return low + (high - low) * torch.rand(rows, generator=generator, dtype=torch.float64)


def accelerator() -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)


# ---------------------------------------------------------------- KTO


class ScriptedModel:
    """Stands in for the policy (or reference) in ``KTOTrainer._compute_loss``: returns fixed per-token
    log-probs for the matched rows (input_ids == 1) and for the mismatched KL rows (input_ids == 2)."""

    def __init__(self, matched: torch.Tensor, mismatched: torch.Tensor) -> None:
        self.matched, self.mismatched = matched, mismatched

    def __call__(self, input_ids, **kwargs):
        log_probs = self.matched if bool((input_ids == 1).all()) else self.mismatched  # [B, T-1]
        return SimpleNamespace(
            log_probs=log_probs, entropy=torch.zeros_like(log_probs), mean_logits=torch.zeros_like(log_probs)
        )


def per_token(generator: torch.Generator, totals: torch.Tensor) -> torch.Tensor:
    """[B, T-1] per-token log-probs summing to ``totals``, zero on the first (prompt) positions."""
    weights = torch.rand(len(totals), T - 1, generator=generator, dtype=torch.float64)
    weights[:, :2] = 0.0  # two prompt positions: not scored
    return totals[:, None] * weights / weights.sum(dim=1, keepdim=True)


@pytest.mark.parametrize(
    "loss_type, calculate_kl, desirable_weight, undesirable_weight, kl_shift",
    [
        ("kto", True, 1.0, 1.0, 0.5),  # a positive reference point
        ("kto", True, 1.33, 0.8, -3.0),  # a negative KL estimate, clamped to 0
        ("kto", False, 1.0, 1.0, 0.0),  # TRL's calculate_KL=False: z0 = 0
        ("apo_zero_unpaired", False, 1.0, 1.2, 0.0),
    ],
)
def test_kto_matches_trl(loss_type, calculate_kl, desirable_weight, undesirable_weight, kl_shift):
    from trl.trainer.kto_trainer import KTOTrainer

    generator = torch.Generator().manual_seed(17)
    logps, ref_logps = random_logps(generator), random_logps(generator)
    kl_logps = random_logps(generator)
    ref_kl_logps = kl_logps - kl_shift + 0.3 * torch.randn(B, generator=generator, dtype=torch.float64)
    labels = torch.rand(B, generator=generator) > 0.5
    labels[:2] = torch.tensor([True, False])  # both kinds present
    beta = 0.3

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator(),
        calculate_KL=calculate_kl,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[:, :3] = 0
    batch = {
        "input_ids": torch.ones(B, T, dtype=torch.long),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "completion_mask": completion_mask,
        "KL_input_ids": torch.full((B, T), 2, dtype=torch.long),
        "KL_attention_mask": torch.ones(B, T, dtype=torch.long),
        "KL_completion_mask": completion_mask,
        "label": labels,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    model = ScriptedModel(per_token(generator, logps), per_token(generator, kl_logps))
    trl_loss = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)

    kl_inputs = (kl_logps, ref_kl_logps) if calculate_kl else (None, None)
    loss, stats = kto_loss(
        logps,
        ref_logps,
        labels,
        *kl_inputs,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        loss_type=loss_type,
    )
    torch.testing.assert_close(loss, trl_loss, rtol=1e-12, atol=1e-12)
    metrics = trainer._metrics["train"]
    if loss_type == "kto":
        assert stats["kl"].item() == pytest.approx(metrics["kl"][-1], rel=1e-12, abs=1e-15)
        assert (stats["kl"].item() > 0) == (kl_shift > 0)  # the cases reach both sides of the clamp
    assert stats["rewards/chosen"].item() == pytest.approx(metrics["rewards/chosen"][-1], rel=1e-12)
    assert stats["rewards/rejected"].item() == pytest.approx(metrics["rewards/rejected"][-1], rel=1e-12)
    assert stats["logps/chosen"].item() == pytest.approx(metrics["logps/chosen"][-1], rel=1e-12)


# ---------------------------------------------------------------- ORPO


def test_orpo_matches_trl():
    orpo = _trl_module("trl.experimental.orpo.orpo_trainer")
    generator = torch.Generator().manual_seed(3)
    # averaged log-probs, including values near 0 (log1mexp's other branch) and far below
    chosen = torch.cat([random_logps(generator, 10, -3.0, -0.01), torch.tensor([-1e-4, -20.0], dtype=torch.float64)])
    rejected = torch.cat([random_logps(generator, 10, -3.0, -0.01), torch.tensor([-0.5, -1e-3], dtype=torch.float64)])
    nll = torch.tensor(0.83, dtype=torch.float64)
    beta = 0.25
    trainer = SimpleNamespace(beta=beta, accelerator=accelerator())
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = orpo.ORPOTrainer.odds_ratio_loss(
        trainer, chosen, rejected
    )
    trl_loss = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics: policy_nll_loss - losses.mean()

    loss, stats = orpo_loss(chosen, rejected, nll, beta=beta)
    # TRL works in float32 (documented difference): agreement to float32 precision
    torch.testing.assert_close(loss, trl_loss.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats["log_odds_ratio"], log_odds_ratio.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats["log_odds_chosen"], log_odds_chosen.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["rewards/chosen"], chosen_rewards.mean().double(), rtol=1e-6, atol=1e-7)
    assert losses.dtype == torch.float32  # the cast this test tolerates; fails loudly if TRL changes it
    # in float64 on both sides (TRL's function on inputs it has no reason to cast): rlcore's log1mexp is TRL's
    torch.testing.assert_close(orpo.log1mexp(chosen), __import__("rlcore").log1mexp(chosen), rtol=1e-14, atol=1e-300)


# ---------------------------------------------------------------- CPO and SimPO (TRL's CPOTrainer)


@pytest.mark.parametrize(
    "loss_type, label_smoothing",
    [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0), ("simpo", 0.0), ("simpo", 0.1)],
)  # TRL's hinge and ipo take no label smoothing
def test_cpo_matches_trl(loss_type, label_smoothing):
    cpo = _trl_module("trl.experimental.cpo.cpo_trainer")
    generator = torch.Generator().manual_seed(5)
    chosen, rejected = random_logps(generator), random_logps(generator)
    nll = torch.tensor(1.7, dtype=torch.float64)
    beta, simpo_gamma, cpo_alpha = (2.0, 1.2, 0.5) if loss_type == "simpo" else (0.2, 0.5, 1.0)
    trainer = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        loss_type=loss_type,
        simpo_gamma=simpo_gamma,
        label_smoothing=label_smoothing,
        accelerator=accelerator(),
    )
    losses, chosen_rewards, rejected_rewards = cpo.CPOTrainer.cpo_loss(trainer, chosen, rejected)
    trl_loss = losses.mean() + cpo_alpha * nll  # CPOTrainer.get_batch_loss_metrics

    if loss_type == "simpo":  # CPO-SimPO: rlcore's simpo_loss + the same NLL term
        loss, stats = simpo_loss(chosen, rejected, beta, simpo_gamma / beta, label_smoothing)
        loss = loss + cpo_alpha * nll
    else:
        loss, stats = cpo_loss(
            chosen, rejected, nll, beta=beta, nll_weight=cpo_alpha, loss_type=loss_type, label_smoothing=label_smoothing
        )
    torch.testing.assert_close(loss, trl_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats["rewards/chosen"], chosen_rewards.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats["rewards/rejected"], rejected_rewards.mean(), rtol=1e-12, atol=1e-12)
