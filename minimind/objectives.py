"""Training objectives: each turns (model, batch) into a summed loss, the weight that sum is over, and
the stage's own metrics, and counts the tokens of its batches (it knows their type). The training loop
divides by the total weight of the optimizer step (all micro-batches, all ranks), so accumulation and
DDP give the same update as one big batch.

Shapes: B rows, T time, V vocab; N = B*T flattened tokens.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


def _unwrap(model):
    return getattr(model, "module", model)


def token_nll(model, batch, weights=None, reduction="sum"):
    """Forward + weighted next-token NLL through the model's fused linear-CE op (never all N x V logits
    on the Triton path). -> (loss, aux_loss)."""
    out = model(batch.input_ids, position_ids=batch.position_ids, return_hidden=True)
    inner = _unwrap(model)
    hidden = out.hidden.flatten(0, 1)  # (N, D)
    w = batch.weights if weights is None else weights
    loss = inner.head_loss(hidden, inner.lm_head.weight, batch.targets.flatten(), w.flatten(), reduction=reduction)
    return loss, out.aux_loss


class CausalLM:
    """pretrain / sft / lora: sum of w * NLL over target tokens; weight = sum of w."""

    metrics = ()

    def weight(self, batch) -> torch.Tensor:
        return batch.weights.sum()

    @staticmethod
    def tokens(batch) -> int:
        """The tokens a batch feeds the model (tokens_per_s)."""
        return batch.input_ids.numel()

    @staticmethod
    def useful(batch) -> int:
        """Those of them that carry loss (useful_tokens_per_s)."""
        return int((batch.weights > 0).sum())

    def __call__(self, model, batch):
        loss_sum, aux = token_nll(model, batch)
        return loss_sum, aux, {}


class Reason(CausalLM):
    """reason: SFT whose <think>/<answer> tag tokens carry a higher weight (set by prepare);
    reports tag_loss, the mean NLL on the tag tokens alone."""

    metrics = ("tag_loss",)

    def __call__(self, model, batch):
        out = model(batch.input_ids, position_ids=batch.position_ids)
        inner = _unwrap(model)
        nll = inner.ops.cross_entropy(
            out.logits.flatten(0, 1), batch.targets.flatten(), None, reduction="none"
        )  # (N,)
        w = batch.weights.flatten()
        tags = (w > 1).float()
        with torch.no_grad():
            tag_loss = (nll * tags).sum() / tags.sum().clamp_min(1)
        return (nll * w).sum(), out.aux_loss, {"tag_loss": tag_loss}


class DPO:
    """Sigmoid DPO (arXiv:2305.18290) on summed response log-probs against a frozen reference."""

    metrics = ("margin", "accuracy", "reward_chosen", "reward_rejected")

    def __init__(self, ref_model, beta: float):
        self.ref, self.beta = ref_model, beta

    def weight(self, batch) -> torch.Tensor:
        return torch.tensor(float(batch.chosen.input_ids.shape[0]))

    @staticmethod
    def tokens(batch) -> int:
        return batch.chosen.input_ids.numel() + batch.rejected.input_ids.numel()

    @staticmethod
    def useful(batch) -> int:
        return int((batch.chosen.weights > 0).sum() + (batch.rejected.weights > 0).sum())

    @staticmethod
    def _both(batch):
        c, r = batch.chosen, batch.rejected
        t = max(c.input_ids.shape[1], r.input_ids.shape[1])

        def pad(x, value):
            return F.pad(x, (0, t - x.shape[1]), value=value)

        ids = torch.cat([pad(c.input_ids, 0), pad(r.input_ids, 0)])  # (2B, T)
        targets = torch.cat([pad(c.targets, -100), pad(r.targets, -100)])
        weights = torch.cat([pad(c.weights, 0.0), pad(r.weights, 0.0)])
        return ids, targets, weights

    @staticmethod
    def _logps(model, ids, targets, weights):
        out = model(ids)
        nll = _unwrap(model).ops.cross_entropy(
            out.logits.flatten(0, 1), targets.flatten(), weights.flatten(), reduction="none"
        )
        return -nll.view(ids.shape).sum(dim=1), out.aux_loss  # (2B,)

    def __call__(self, model, batch):
        ids, targets, weights = self._both(batch)
        b = batch.chosen.input_ids.shape[0]
        logp, aux = self._logps(model, ids, targets, weights)
        with torch.no_grad():
            ref_logp, _ = self._logps(self.ref, ids, targets, weights)
        (logp_c, logp_r), (ref_c, ref_r) = logp.split(b), ref_logp.split(b)  # chosen rows first
        chosen = self.beta * (logp_c - ref_c)
        rejected = self.beta * (logp_r - ref_r)
        loss = -F.logsigmoid(chosen - rejected)  # (B,)
        with torch.no_grad():
            metrics = {
                "reward_chosen": chosen.mean(),
                "reward_rejected": rejected.mean(),
                "margin": (chosen - rejected).mean(),
                "accuracy": (chosen > rejected).float().mean(),
            }
        return loss.sum(), aux, metrics


class Distill(CausalLM):
    """White-box distillation (Hinton et al., arXiv:1503.02531): alpha * CE + (1 - alpha) * tau^2 *
    KL(teacher || student) at temperature tau, over the weighted (assistant) tokens."""

    metrics = ("kl",)

    def __init__(self, teacher, temperature: float, alpha: float):
        self.teacher, self.tau, self.alpha = teacher, temperature, alpha

    def __call__(self, model, batch):
        out = model(batch.input_ids, position_ids=batch.position_ids)
        with torch.no_grad():
            t_logits = self.teacher(batch.input_ids, position_ids=batch.position_ids).logits
        s = out.logits.flatten(0, 1).float()  # (N, V)
        t = t_logits.flatten(0, 1).float()
        w = batch.weights.flatten()
        nll = _unwrap(model).ops.cross_entropy(s, batch.targets.flatten(), None, reduction="none")
        log_ps = F.log_softmax(s / self.tau, dim=-1)
        log_pt = F.log_softmax(t / self.tau, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)  # (N,)
        per_token = self.alpha * nll + (1 - self.alpha) * self.tau**2 * kl
        with torch.no_grad():
            kl_mean = (kl * w).sum() / w.sum().clamp_min(1e-12)
        return (per_token * w).sum(), out.aux_loss, {"kl": kl_mean}


# ----------------------------------------------------------------- GRPO (batches: grpo.Rollouts)
class RolloutBatch(NamedTuple):
    input_ids: torch.Tensor  # (R, T) prompt + completion, R = prompts * group size
    targets: torch.Tensor  # (R, T) next tokens, -100 outside the completion
    weights: torch.Tensor  # (R, T) 1 on completion targets
    position_ids: torch.Tensor | None
    advantages: torch.Tensor  # (R,)
    old_logp: torch.Tensor  # (R, T) policy log-probs at sampling time
    ref_logp: torch.Tensor  # (R, T)
    reward: torch.Tensor  # (R,)
    # of the groups sampled for this batch (dynamic sampling draws more than it keeps): the share whose rewards
    # were all equal (no advantage, dropped) and how many were sampled; 0-dim tensors, None for a plain batch
    zero_adv: torch.Tensor | None = None
    sampled: torch.Tensor | None = None


def token_logps(model, ids, targets):
    logits = model(ids).logits.float()  # (R, T, V)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return logp * (targets != -100)


class GRPO:
    """The clipped surrogate with a k3 KL penalty, summed over completion tokens (the step divides by its
    token count: DAPO's token-level normalisation). Each batch of rollouts makes one update, so the ratio is
    1 when it is taken and the clip never binds (DAPO's clip-higher, an upper clip of 0.28, gave the same
    held-out counts on 3 seeds: BENCHMARKS.md, "GRPO")."""

    metrics = ("reward", "kl", "zero_adv", "sampled")

    def __init__(self, beta: float, clip_eps: float = 0.2):
        self.beta, self.clip = beta, clip_eps

    def weight(self, batch) -> torch.Tensor:
        return batch.weights.sum()

    @staticmethod
    def tokens(batch) -> int:
        return batch.input_ids.numel()

    @staticmethod
    def useful(batch) -> int:
        return int(batch.weights.sum())

    def __call__(self, model, batch):
        logp = token_logps(model, batch.input_ids, batch.targets)
        ratio = torch.exp(logp - batch.old_logp)
        adv = batch.advantages.unsqueeze(1)
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - self.clip, 1 + self.clip) * adv)
        log_r = batch.ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1  # k3 estimator of KL(policy || ref), >= 0
        per_token = -(surrogate - self.beta * kl) * batch.weights
        w = batch.weights
        with torch.no_grad():
            kl_mean = (kl * w).sum() / w.sum().clamp_min(1)
        zero = per_token.new_zeros(())
        metrics = {"reward": batch.reward.mean(), "kl": kl_mean}
        if batch.zero_adv is not None:
            metrics.update(zero_adv=batch.zero_adv, sampled=batch.sampled)
        return per_token.sum(), zero, metrics
