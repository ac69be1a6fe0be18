"""rlcore: post-training for language models as pure functions on tensors.

The math API is re-exported flat from here; engines (toy, models, data, rollout, lora, checkpoint, ...)
live in their own submodules: ``from rlcore.rollout import generate``. Importing ``rlcore`` loads only
torch and the math modules below.
"""

from .advantages import GROUP_SCALES, gae, group_advantages, reinforce_pp_advantages, rloo_advantages
from .distillation import distillation_loss, generalized_jsd
from .kl import KL_KINDS, kl_estimate, kl_shaped_rewards
from .logprobs import (
    chunked_logprobs,
    entropy_from_logits,
    gather_logprobs,
    length_desensitized_logps,
    log_sum_squared_probs,
)
from .losses import (
    AGGREGATION_MODES,
    DPO_LOSS_TYPES,
    F_DIVERGENCES,
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPE_AGGREGATION,
    TIS_MODES,
    aggregate,
    cispo_loss,
    dpo_loss,
    f_divergence_score,
    importance_ratio,
    loss_normalizer,
    policy_loss,
    reward_pairwise_loss,
    sft_loss,
    sft_loss_from_logprobs,
    simpo_loss,
    truncated_importance_weights,
    value_loss,
    wpo_log_weights,
)
from .ops import (
    check_choice,
    check_ndim,
    check_same_shape,
    last_valid_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from .preference import (
    CPO_LOSS_TYPES,
    KTO_LOSS_TYPES,
    cpo_loss,
    kto_loss,
    kto_reference_point,
    log1mexp,
    orpo_loss,
)

__version__ = "0.1.0"

__all__ = [
    "AGGREGATION_MODES",
    "CPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "GROUP_SCALES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KL_KINDS",
    "LOSS_TYPE_AGGREGATION",
    "TIS_MODES",
    "aggregate",
    "check_choice",
    "check_ndim",
    "check_same_shape",
    "cpo_loss",
    "chunked_logprobs",
    "cispo_loss",
    "distillation_loss",
    "dpo_loss",
    "entropy_from_logits",
    "f_divergence_score",
    "gae",
    "gather_logprobs",
    "generalized_jsd",
    "group_advantages",
    "importance_ratio",
    "kl_estimate",
    "kl_shaped_rewards",
    "kto_loss",
    "kto_reference_point",
    "last_valid_index",
    "length_desensitized_logps",
    "log_sum_squared_probs",
    "log1mexp",
    "loss_normalizer",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "orpo_loss",
    "policy_loss",
    "reinforce_pp_advantages",
    "reward_pairwise_loss",
    "rloo_advantages",
    "sft_loss",
    "sft_loss_from_logprobs",
    "simpo_loss",
    "truncated_importance_weights",
    "value_loss",
    "wpo_log_weights",
]
