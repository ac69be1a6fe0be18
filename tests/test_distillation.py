"""distillation_loss and generalized_jsd: hand-derived values, the naive full-vocabulary computation, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlcore import distillation_loss, generalized_jsd

# Student logits (0, 0): S = (1/2, 1/2); teacher logits (log 3, 0): T = (3/4, 1/4).
STUDENT = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
TEACHER = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
FORWARD_KL = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(T || S)
REVERSE_KL = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(S || T)
# beta = 1/2: M = T/2 + S/2 = (5/8, 3/8)
KL_T_M = 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)
KL_S_M = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
HAND = {0.0: FORWARD_KL, 1.0: REVERSE_KL, 0.5: 0.5 * KL_T_M + 0.5 * KL_S_M}


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_by_hand(beta):
    torch.testing.assert_close(generalized_jsd(STUDENT, TEACHER, beta), torch.tensor([HAND[beta]], dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_top_k_renormalises_over_the_teachers_top_tokens(beta):
    # A third token, unlikely for the teacher and likely for the student, is outside the teacher's top 2: over
    # tokens {0, 1} both distributions renormalise to S = (1/2, 1/2) and T = (3/4, 1/4), the values above.
    student = torch.tensor([[0.0, 0.0, 7.0]], dtype=torch.float64)
    teacher = torch.tensor([[math.log(3.0), 0.0, -5.0]], dtype=torch.float64)
    torch.testing.assert_close(
        generalized_jsd(student, teacher, beta, top_k=2), torch.tensor([HAND[beta]], dtype=torch.float64)
    )
    assert generalized_jsd(student, teacher, beta, top_k=3) > HAND[beta]  # the full vocabulary sees the third token


def naive_jsd(student_logits, teacher_logits, beta, temperature):
    """The full-vocabulary computation as TRL's GKDTrainer writes it (F.kl_div(input, target) = KL(target || input))."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1)
    beta_t = torch.tensor(beta, dtype=log_s.dtype)
    log_m = torch.logsumexp(torch.stack([log_s + torch.log1p(-beta_t), log_t + torch.log(beta_t)]), dim=0)
    kl_teacher = F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_chunked_loss_matches_the_naive_full_vocabulary_computation_in_float64(beta):
    torch.manual_seed(0)
    n, vocab = 10, 17
    student_hidden = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    student_weight = torch.randn(vocab, 6, dtype=torch.float64, requires_grad=True)
    student_bias = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(n, 9, dtype=torch.float64), torch.randn(vocab, 9, dtype=torch.float64)
    inputs = (student_hidden, student_weight, student_bias)

    loss, stats = distillation_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, beta=beta, temperature=0.8,
        chunk_size=3, normalizer=4.0, student_bias=student_bias,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, inputs)
    naive = naive_jsd(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T, beta, 0.8)
    naive_grads = torch.autograd.grad(naive.sum() / 4.0, inputs)
    torch.testing.assert_close(loss, naive.sum() / 4.0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats["jsd"], naive.mean(), rtol=1e-12, atol=1e-12)
    for grad, naive_grad in zip(grads, naive_grads):
        torch.testing.assert_close(grad, naive_grad, rtol=1e-10, atol=1e-12)


def test_chunked_gradients_against_finite_differences():
    torch.manual_seed(1)
    student_hidden = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    student_weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)

    def loss(hidden, weight):
        return distillation_loss(hidden, weight, teacher_hidden, teacher_weight, beta=0.5, top_k=4, chunk_size=2)[0]

    assert torch.autograd.gradcheck(loss, (student_hidden, student_weight))


def test_float32_chunks_agree_with_one_chunk_and_the_teacher_gets_no_gradient():
    torch.manual_seed(2)
    student_hidden = torch.randn(33, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    teacher_hidden = torch.randn(33, 8, requires_grad=True)
    teacher_weight = torch.randn(50, 8, requires_grad=True)
    whole, _ = distillation_loss(student_hidden, weight, teacher_hidden, teacher_weight, chunk_size=1000)
    chunked, _ = distillation_loss(student_hidden, weight, teacher_hidden, teacher_weight, chunk_size=4)
    torch.testing.assert_close(whole, chunked)
    chunked.backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None and weight.grad is not None


def test_identical_models_have_zero_divergence_and_bad_inputs_are_named():
    hidden, weight = torch.randn(4, 3), torch.randn(6, 3)
    for beta in (0.0, 0.5, 1.0):
        loss, _ = distillation_loss(hidden, weight, hidden, weight, beta=beta)
        assert abs(loss.item()) < 1e-6
    with pytest.raises(ValueError, match="vocabularies differ"):
        distillation_loss(hidden, weight, hidden, torch.randn(7, 3))
    with pytest.raises(ValueError, match="beta"):
        distillation_loss(hidden, weight, hidden, weight, beta=1.5)
    with pytest.raises(ValueError, match="top_k"):
        generalized_jsd(torch.zeros(2, 3), torch.zeros(2, 3), top_k=4)
