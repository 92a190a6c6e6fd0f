"""Preference losses as small pure functions over log-prob tensors (OpenRLHF ``models/loss.py``).

Batch layout: a micro-batch of B pairs is run as one forward pass over 2B rows, the B chosen
responses first, then the B rejected ones in the same order (rows i and B + i are one pair); so
every per-pair tensor here has shape ``(B,)``. Log-probs are those of the response tokens only
(the prompt is labelled ``-100``), as returned by :func:`sequence_logps`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of tokens that carry no loss (torch cross_entropy's ignore_index)

# ORPO's log(1 - p) is -inf at p = 1 (mean log-prob 0) and its gradient NaN there; keep x below this.
_MAX_MEAN_LOGP = -1e-6


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence log-probability of the labelled tokens: ``(sum, mean, n_tokens)``, each ``(N,)``.

    ``logits``: ``(N, T, V)`` from a causal LM; ``labels``: ``(N, T)``, the input ids with the
    prompt and padding set to ``ignore_index``. Position t predicts token t + 1, so logits drop
    the last position and labels the first. log p = logit[label] - logsumexp(logits), in float32.
    A row without labelled tokens has sum 0 and mean 0.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)  # any valid id; masked out below
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)
    per_token = (picked - torch.logsumexp(logits, dim=-1)) * mask
    n_tokens = mask.sum(-1)
    total = per_token.sum(-1)
    return total, total / n_tokens.clamp(min=1), n_tokens


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO, Rafailov et al. 2023, eq. 7: ``(loss, chosen_rewards, rejected_rewards)``.

        L = -E[ log σ( β log π(y_w|x)/π_ref(y_w|x) - β log π(y_l|x)/π_ref(y_l|x) ) ]

    Inputs are summed response log-probs, shape ``(B,)``. The implicit rewards
    r = β (log π - log π_ref) are returned detached, per pair, for logging (TRL's
    ``rewards/chosen``, ``rewards/rejected``; margin = chosen - rejected, accuracy = chosen > rejected).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stably (Mächler 2012: branch at -ln 2, as TRL's ``log1mexp``)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_nll: torch.Tensor,
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO, Hong et al. 2024, eqs. 4, 6, 7: ``(loss, log_odds_ratio)``.

        L = L_SFT + λ L_OR,   L_OR = -log σ( log odds(y_w|x) - log odds(y_l|x) ),
        odds(y|x) = P(y|x) / (1 - P(y|x)),  log P(y|x) = mean response-token log-prob

    so log odds = x - log(1 - exp(x)) for the mean log-prob x. ``chosen_nll`` is the SFT loss on the
    chosen responses (a scalar, or per pair and then averaged); ``beta`` is the paper's λ. The
    per-pair ``log_odds_ratio`` is returned detached for logging. Mean log-probs are kept below
    -1e-6, where log(1 - P) would be -inf (TRL does not clamp; equal elsewhere).
    """
    x_w = chosen_mean_logps.float().clamp(max=_MAX_MEAN_LOGP)
    x_l = rejected_mean_logps.float().clamp(max=_MAX_MEAN_LOGP)
    log_odds = (x_w - x_l) - (log1mexp(x_w) - log1mexp(x_l))
    loss = chosen_nll.mean() - beta * F.logsigmoid(log_odds).mean()
    return loss, log_odds.detach()
