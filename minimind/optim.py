"""The optimizers `train.py --optim` builds: fused AdamW (the default), or Muon for the hidden matrices
with AdamW for everything else (embeddings, the tied head, norms, the MoE router), as in the
modded-nanogpt speedrun.

Muon (Keller Jordan, 2024; "Muon is Scalable for LLM Training", Moonshot 2025) takes SGD momentum
(Nesterov) and replaces each matrix's update by the nearest semi-orthogonal matrix, found by four
steps of a quintic Newton-Schulz iteration: every direction of the update moves the weights by about
the same amount. The update is rescaled by 0.2 * sqrt(max(rows, cols)) so its RMS matches AdamW's,
which lets it reuse AdamW's learning rate and weight decay (Moonshot's rule).

torch.optim.Muon exists, and the tests check this one against it; ours is kept because it (a)
orthogonalizes all matrices of one shape as a single batched product instead of a Python loop over
parameters, (b) takes MoE expert stacks (E, out, in) as E matrices, and (c) runs the iteration in
the run's precision on a CPU: bf16 when the run trains in bf16 (which `--dtype auto` chooses only
where a timed step finds bf16 faster: ~2.4x float32 for `small`'s matrices on a CPU with bf16 units),
float32 otherwise (on an AVX2-only CPU bf16 is ~30x slower). On CUDA it runs in bf16.
"""

from collections import defaultdict

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic's (a, b, c): steepest slope at 0 that still converges


def param_groups(model, weight_decay: float, embed_lr_scale: float = 1.0):
    """AdamW's groups: no decay on norms, biases and embeddings (and on the tied lm_head, the embedding).
    The embeddings (and head) have a group of their own whose `lr_scale` the loop multiplies the lr by."""
    decay, no_decay, embed = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "embed_tokens" in name or name == "lm_head.weight":
            embed.append(p)
        elif p.ndim < 2 or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            {"params": embed, "weight_decay": 0.0, "lr_scale": embed_lr_scale}]


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """What Muon trains: the blocks' weight matrices (and expert stacks), not embeddings, the head, norms
    or the MoE router (E x D: a few rows that decide routing; AdamW keeps them steady)."""
    return p.ndim >= 2 and ".layers." in f".{name}" and "norm" not in name and not name.endswith("mlp.gate.weight")


def newton_schulz(g: torch.Tensor, steps: int = 4, eps: float = 1e-7, dtype: torch.dtype | None = None):
    """An approximately semi-orthogonal matrix with g's singular vectors: U V^T for g = U S V^T, its
    singular values brought into about [0.7, 1.2] rather than exactly 1 (enough for the update). g:
    (..., m, n), batched over the leading dims. Computed in `dtype` (default g's).

    Each step is x <- p(x x^T) x with p(G) = a + b G + c G^2, which lifts a small singular value s to
    ~3.4 s; so the fewer steps, the larger the smallest values must start. x is scaled by a bound on its
    largest singular value: ||x||_2^2 = ||G||_2 <= G's largest absolute row sum (G = x x^T; Gershgorin),
    much tighter than the usual Frobenius norm (the trace of G) for a momentum whose energy is spread
    over many directions, and free (the first step needs G anyway). From it, 4 steps reach the spread
    that 5 reached from the Frobenius norm (BENCHMARKS.md, issue 27). A scalar, so the singular vectors
    are kept exactly.

    In float32 or float64, when the matrix is wide enough (m < ~2n/3), the steps run on the m x m Gram
    matrix instead (`_gram_steps`): the same polynomial, fewer products (`small`'s 512 x 1408 MLP
    matrices: 1.3x cheaper). In bf16 that form loses its accuracy (errors in G compound), so bf16 always
    iterates on x."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype or g.dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the wide side: the Gram matrix is the smaller one
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # first to <= 1, so bf16's products stay in range
    gram = x @ x.mT
    bound = gram.abs().sum(-1).amax(-1)[..., None, None] + eps  # >= ||x||_2^2
    x, gram = x / bound.sqrt(), gram / bound
    m, n = x.shape[-2:]
    gram_cheaper = 8 * steps * m**3 + 2 * m * m * n < steps * (4 * m * m * n + 2 * m**3) - 2 * m * m * n
    if x.dtype in (torch.float32, torch.float64) and gram_cheaper:
        x = _gram_steps(x, gram, steps)
    else:
        for i in range(steps):
            if i:
                gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def _gram_steps(x: torch.Tensor, gram: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` Newton-Schulz steps on x (m x n, m <= n) through its Gram matrix G = x x^T: each step's
    polynomial P is one of G, so x_k = Q x with Q = P_k ... P_1, and the next Gram matrix is P G P.
    With G given, costs ~8 m^3 per step and 2 m^2 n at the end, instead of steps * (4 m^2 n + 2 m^3)."""
    a, b, c = NS_COEFFICIENTS
    eye = torch.eye(gram.shape[-1], dtype=x.dtype, device=x.device)
    q = None
    for i in range(steps):
        p = a * eye + (b * eye + c * gram) @ gram
        q = p if q is None else p @ q
        if i < steps - 1:
            gram = p @ gram @ p
    return q @ x


class Muon(torch.optim.Optimizer):
    """Muon on matrices (2-D) and stacks of matrices (3-D: each (out, in) slice on its own)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 4, ns_dtype: torch.dtype | None = None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes matrices or stacks of them, got a tensor of shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype

    def _dtype(self, device: torch.device) -> torch.dtype:
        if self.ns_dtype is not None:
            return self.ns_dtype
        return torch.bfloat16 if device.type == "cuda" else torch.float32  # see the module docstring

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape = defaultdict(list)  # matrices of one shape are orthogonalized in one batched product
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[(p.shape[-2:], p.device, p.dtype)].append(p)
            mom, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            for (shape, device, _), params in by_shape.items():
                grads = [p.grad for p in params]
                bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - mom)  # buf = mom * buf + (1 - mom) * grad
                updates = torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs
                stacked = torch.cat([u.reshape(-1, *shape) for u in updates])  # (k, m, n)
                ortho = newton_schulz(stacked, group["ns_steps"], dtype=self._dtype(device))
                scale = 0.2 * max(shape) ** 0.5  # the update's RMS matched to AdamW's
                if wd:
                    torch._foreach_mul_(params, 1 - lr * wd)
                at = 0
                for p in params:
                    n = p.numel() // (shape[0] * shape[1])
                    p.add_(ortho[at:at + n].view_as(p), alpha=-lr * scale)
                    at += n
        return loss


class Optimizers:
    """Several optimizers driven as one (AdamW + Muon): `param_groups` is all of theirs, so the loop's
    learning-rate schedule, GradScaler's unscale and clipping see every parameter; `state_dict` keeps
    each one's state under its name."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        # read live: an optimizer's load_state_dict replaces its group dicts, and a list kept from before
        # would take the schedule's lr while the optimizers stepped with the one saved (an inexact resume)
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def step(self, closure=None):
        for o in self.optimizers.values():
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state: dict):
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)}, this run uses {sorted(self.optimizers)}")
        for name, o in self.optimizers.items():
            o.load_state_dict(state[name])


def build_optimizer(model, name: str, *, lr: float, weight_decay: float, device: torch.device,
                    betas: tuple[float, float] = (0.9, 0.95), ns_dtype: torch.dtype | None = None,
                    embed_lr_scale: float = 1.0):
    """`--optim adamw`: fused AdamW over every trainable parameter. `--optim muon`: Muon on the hidden
    matrices, fused AdamW on the rest; both at the same lr and weight decay (see the module docstring).
    `ns_dtype`: the dtype of Muon's iteration (None: bf16 on CUDA, float32 on a CPU)."""
    fused = device.type in ("cuda", "cpu")
    if name == "adamw":
        groups = [g for g in param_groups(model, weight_decay, embed_lr_scale) if g["params"]]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)
    if name != "muon":
        raise ValueError(f"--optim must be adamw or muon, got {name!r}")
    hidden = [p for n, p in model.named_parameters() if p.requires_grad and is_hidden_matrix(n, p)]
    chosen = {id(p) for p in hidden}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in chosen]}
            for g in param_groups(model, weight_decay, embed_lr_scale)]
    adamw = torch.optim.AdamW([g for g in rest if g["params"]], lr=lr, betas=tuple(betas), fused=fused)
    muon = Muon(hidden, lr=lr, weight_decay=weight_decay, ns_dtype=ns_dtype)
    return Optimizers(adamw=adamw, muon=muon)
