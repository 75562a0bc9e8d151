"""Direct preference optimization (Rafailov et al., 2023) as a loss of its own inside the training recipe.

The frozen reference is the policy with its LoRA layers switched off (tandem.gathered_lora.adapters_off): the base
model, so no second copy of the weights is held. A pair's implicit reward margin is how much more the policy,
relative to the reference, favours the chosen answer over the rejected one; the loss is -log sigmoid(beta * margin).
"""

from __future__ import annotations

from tandem.data.features import IGNORE


def sequence_logps(logits, labels):
    """Summed log-probability of each row's labelled tokens (labels shifted by one, IGNORE skipped)."""
    import torch

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float):
    """(mean loss, per-pair accuracy: 1 where the policy's margin favours the chosen answer)."""
    import torch.nn.functional as F

    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin).mean(), (margin > 0).float()


def pair_rows(rows: list[dict]) -> list[dict]:
    """The chosen rows, then the same prompts with their rejected answers: one forward scores both."""
    return [*rows, *({"input_ids": r["rejected_input_ids"], "labels": r["rejected_labels"]} for r in rows)]
