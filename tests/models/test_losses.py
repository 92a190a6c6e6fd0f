"""The preference losses against TRL 1.16's own code, on the same random batch.

TRL's pieces are called directly where they can run without a trainer:

- ``trl.experimental.orpo.orpo_trainer.ORPOTrainer.get_batch_logps`` (a staticmethod) for
  :func:`sequence_logps`;
- ``ORPOTrainer.odds_ratio_loss`` (a method reading only ``self.beta`` and
  ``self.accelerator.device``), called unbound on a stub, plus the one line of
  ``ORPOTrainer.get_batch_loss_metrics`` that assembles the loss (``policy_nll_loss - losses.mean()``);
- ``trl.trainer.dpo_trainer.DPOTrainer._compute_loss`` (the sigmoid DPO loss lives inside it),
  called unbound on a stub trainer with a tiny Llama patched by TRL's ``add_fused_lm_head``, so
  TRL computes the per-token log-probs itself; the loss and its logged
  ``rewards/{chosen,rejected,margins,accuracies}`` are compared.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from models.train.losses import IGNORE_INDEX, dpo_loss, orpo_loss, sequence_logps

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def random_batch(n=6, t=9, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, generator=g) * 3
    labels = torch.randint(0, v, (n, t), generator=g)
    prompt_len = torch.randint(1, 4, (n,), generator=g)
    pad_from = torch.randint(5, t + 1, (n,), generator=g)
    pos = torch.arange(t)
    labels[(pos < prompt_len[:, None]) | (pos >= pad_from[:, None])] = IGNORE_INDEX
    return logits, labels


def test_sequence_logps_equals_trl_get_batch_logps():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logits, labels = random_batch()
    total, mean, n = sequence_logps(logits, labels)
    torch.testing.assert_close(total, ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=False))
    torch.testing.assert_close(mean, ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True))
    assert n.tolist() == (labels[:, 1:] != IGNORE_INDEX).sum(-1).tolist()


def test_sequence_logps_by_hand():
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])  # the prompt is token 0; position 0 predicts 0, 1 predicts 1
    total, mean, n = sequence_logps(logits, labels)
    expected = math.log(1 / (1 + math.e)) + math.log(1 / (1 + math.e**2))
    assert n.item() == 2
    assert total.item() == pytest.approx(expected)
    assert mean.item() == pytest.approx(expected / 2)
    with pytest.raises(ValueError, match="do not match"):
        sequence_logps(logits, labels[:, :2])


def test_orpo_loss_equals_trl_odds_ratio_loss():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(1)
    chosen = -torch.rand(8, generator=g) * 3  # mean log-probs, both sides of TRL's -ln 2 branch
    rejected = -torch.rand(8, generator=g) * 3
    nll = torch.rand((), generator=g) + 0.5
    beta = 0.25

    stub = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, _, _, _, trl_log_odds_mean = ORPOTrainer.odds_ratio_loss(stub, chosen, rejected)
    trl_loss = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics: loss = policy_nll_loss - losses.mean()

    loss, log_odds = orpo_loss(nll, chosen, rejected, beta=beta)
    torch.testing.assert_close(loss, trl_loss)
    torch.testing.assert_close(log_odds.mean(), trl_log_odds_mean)


def test_orpo_loss_is_finite_at_certainty():
    chosen = torch.tensor([0.0, -1e-9], requires_grad=True)
    loss, log_odds = orpo_loss(torch.tensor(1.0), chosen, torch.tensor([-2.0, -2.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_odds).all() and torch.isfinite(chosen.grad).all()


def test_dpo_loss_is_log2_when_policy_is_the_reference():
    logps = torch.tensor([-3.0, -7.5]), torch.tensor([-4.0, -1.0])
    loss, chosen_rewards, rejected_rewards = dpo_loss(*logps, *logps, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert chosen_rewards.tolist() == rejected_rewards.tolist() == [0.0, 0.0]


def tiny_llama(vocab=13):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def stub_dpo_trainer(model, beta):
    """Just the attributes ``DPOTrainer._compute_loss`` reads for sigmoid DPO with precomputed refs."""
    identity = lambda x: x  # noqa: E731 - single process: gathering is the identity
    return SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity, gather=identity),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def test_dpo_loss_equals_trl_dpo_trainer_compute_loss():
    """Same tiny model, same pairs: TRL's fused-head log-probs and loss vs sequence_logps + dpo_loss."""
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    beta, pairs, width = 0.3, 3, 10
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 13, (2 * pairs, width), generator=g)  # [chosen; rejected]
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, (start, end) in enumerate([(3, 8), (2, 10), (4, 6), (3, 9), (2, 5), (4, 10)]):
        completion_mask[row, start:end] = 1
        attention_mask[row, end:] = 0  # padded on the right
    ref_chosen = -torch.rand(pairs, generator=g) * 20
    ref_rejected = -torch.rand(pairs, generator=g) * 20

    model = tiny_llama()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    logps, _, _ = sequence_logps(logits, labels)
    ours, chosen_rewards, rejected_rewards = dpo_loss(*logps.chunk(2), ref_chosen, ref_rejected, beta=beta)

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    trainer = stub_dpo_trainer(model, beta)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    with torch.no_grad():
        trl_loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    logged = trainer._metrics["eval"]  # the model is in eval mode

    torch.testing.assert_close(ours, trl_loss)
    assert logged["rewards/chosen"][0] == pytest.approx(chosen_rewards.mean().item(), rel=1e-5)
    assert logged["rewards/rejected"][0] == pytest.approx(rejected_rewards.mean().item(), rel=1e-5)
    margins = chosen_rewards - rejected_rewards
    assert logged["rewards/margins"][0] == pytest.approx(margins.mean().item(), rel=1e-5)
    assert logged["rewards/accuracies"][0] == pytest.approx((margins > 0).float().mean().item())
