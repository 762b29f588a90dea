"""`--optim muon` (minimind/optim.py): the Newton-Schulz step orthogonalizes, our Muon step equals a
plain float64 reference and has torch.optim.Muon's directions, expert stacks are per-slice, the split between Muon
and AdamW is the intended one, and a run trains, saves and resumes with it."""

import pytest
import torch

from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM
from minimind.optim import Muon, Optimizers, build_optimizer, newton_schulz
from tests.test_train import FAST, train_inproc


@pytest.fixture(scope="module")
def pretrain_data(synth_dir, tokenizer_dir, tmp_path_factory):
    from minimind.data.prepare import prepare

    return prepare("pretrain", synth_dir / "pretrain.jsonl", tokenizer_dir, tmp_path_factory.mktemp("muon") / "pre",
                   max_seq_len=512)


def scaled(x):
    """x (wide) scaled so its largest singular value is at most 1: by its Frobenius norm, then by the
    square root of the largest absolute row sum of x x^T (a bound on ||x x^T||_2)."""
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    return x / ((x @ x.mT).abs().sum(-1).amax(-1)[..., None, None] + 1e-7).sqrt()


def reference_muon(p, grads, *, lr, wd, momentum=0.95, steps=4):
    """The algorithm as written in its papers, one matrix, float64, no batching, no tricks; the one
    change is the tighter scaling before the iteration (`scaled`), which lets it take 4 steps, not 5."""
    a, b, c = 3.4445, -4.7750, 2.0315
    p, buf = p.double().clone(), torch.zeros_like(p, dtype=torch.float64)
    for g in grads:
        g = g.double()
        buf = momentum * buf + (1 - momentum) * g
        u = (1 - momentum) * g + momentum * buf  # Nesterov: the gradient moved toward the new buffer
        x = scaled(u.T if u.shape[0] > u.shape[1] else u)
        for _ in range(steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x.T if u.shape[0] > u.shape[1] else x
        p = p * (1 - lr * wd) - lr * 0.2 * max(p.shape) ** 0.5 * x
    return p


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_newton_schulz_keeps_the_singular_vectors_and_evens_the_values(shape):
    g = torch.randn(*shape, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    x = newton_schulz(g)
    inner = u.T @ x @ vh.T  # diagonal if x = U S' V^T
    off = inner - torch.diag(torch.diagonal(inner))
    assert off.abs().max() < 1e-6
    assert torch.diagonal(inner).min() > 0.5 and torch.diagonal(inner).max() < 1.5  # s spans 10x or more
    assert s.max() / s.min() > 5


def test_muon_step_equals_a_plain_reference():
    torch.manual_seed(0)
    p0 = torch.randn(16, 48, dtype=torch.float64)
    grads = [torch.randn(16, 48, dtype=torch.float64) for _ in range(3)]
    p = torch.nn.Parameter(p0.clone())
    opt = Muon([p], lr=0.01, weight_decay=0.1, ns_dtype=torch.float64)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), reference_muon(p0, grads, lr=0.01, wd=0.1), rtol=0, atol=1e-10)


def test_muon_step_has_torch_optim_muons_directions_nearer_orthogonal():
    """torch.optim.Muon scales by the Frobenius norm and takes 5 steps; ours scales by a tighter bound
    and takes 4. One step on a gradient shaped like a momentum (half its singular values within 3x of
    the largest, the rest down to 1000x smaller): the same singular vectors (the update is U D V^T with
    D diagonal, in both), and ours' smallest values at least as near 1. (On a matrix with one dominant
    direction the Frobenius norm is nearly tight and 4 steps fall short of 5.)"""
    torch.manual_seed(0)
    p0 = torch.randn(256, 512)
    left, _ = torch.linalg.qr(torch.randn(256, 256))
    right, _ = torch.linalg.qr(torch.randn(512, 256))
    spectrum = torch.cat([torch.linspace(1, 0.3, 128), torch.logspace(-1.5, -3, 128)])
    g = left @ torch.diag(spectrum) @ right.T
    ours, theirs = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    a = Muon([ours], lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    b = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")  # in bf16
    ours.grad, theirs.grad = g.clone(), g.clone()
    a.step()
    b.step()
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    diagonals = []
    for moved, tol in ((ours, 1e-3), (theirs, 0.1)):  # theirs rounds g to bf16: its 1e-3 directions blur
        update = (p0 * (1 - 0.02 * 0.1) - moved.detach()).double() / (0.02 * 0.2 * 512 ** 0.5)
        inner = u.T @ update @ vh.T
        off = inner - torch.diag(torch.diagonal(inner))
        assert off.abs().max() < tol  # a different direction would be O(1)
        diagonals.append(torch.diagonal(inner))
    ours_d, theirs_d = diagonals
    assert ours_d.min() >= theirs_d.min() and ours_d.max() < 1.25


def test_an_expert_stack_is_stepped_as_separate_matrices():
    torch.manual_seed(0)
    stack = torch.nn.Parameter(torch.randn(3, 8, 20))
    alone = [torch.nn.Parameter(stack[e].detach().clone()) for e in range(3)]
    g = torch.randn(3, 8, 20)
    stack.grad = g.clone()
    for e, p in enumerate(alone):
        p.grad = g[e].clone()
    Muon([stack], lr=0.05).step()
    Muon(alone, lr=0.05).step()
    torch.testing.assert_close(stack.detach(), torch.stack([p.detach() for p in alone]), rtol=1e-5, atol=1e-6)


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", ["use_moe=true"]))
    opt = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, device=torch.device("cpu"))
    assert isinstance(opt, Optimizers)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    assert muon.isdisjoint(adamw) and muon | adamw == set(names.values())
    assert "model.layers.0.self_attn.q_proj.weight" in muon and "model.layers.0.mlp.experts.up_proj" in muon
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.gate.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert name in adamw, name
    assert len(opt.param_groups) == 4  # AdamW's decay, no-decay and embedding groups, and Muon's: the schedule sees all


def test_a_muon_run_trains_resumes_and_refuses_the_other_optimizer(pretrain_data, tmp_path):
    import json

    out = tmp_path / "muon"
    args = ["--stage", "pretrain", *FAST, "--data", pretrain_data, "--optim", "muon", "--lr", "3e-3",
            "--save-every", 6, "--log-every", 2]
    rc, err = train_inproc(*args, "--max-steps", 12, "--out", out)
    assert rc == 0, err[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    rc, err = train_inproc(*args, "--max-steps", 14, "--out", out, "--resume", "--optim", "adamw")
    assert rc == 2 and "--optim muon" in err, err[-2000:]
    rc, err = train_inproc(*args, "--max-steps", 14, "--out", out, "--resume")
    assert rc == 0 and (out / "step-14").is_dir(), err[-2000:]
    # a checkpoint from before the embeddings got their own AdamW group: refused by name, nothing lost
    state_file = out / "step-14" / "trainer_state" / "optimizer.pt"
    state = torch.load(state_file, weights_only=True)
    groups = state["adamw"]["param_groups"]
    groups[0]["params"] += groups.pop()["params"]
    torch.save(state, state_file)
    rc, err = train_inproc(*args, "--max-steps", 16, "--out", out, "--resume")
    assert rc == 2 and "parameter groups" in err and "--init" in err, err[-2000:]
    assert not (out / "step-16").exists()


def test_the_schedules_lr_reaches_the_optimizers_after_a_resume():
    """load_state_dict replaces each optimizer's group dicts: the lr the schedule writes through
    Optimizers.param_groups must still reach them (it did not: a resumed Muon run stepped at the saved lr)."""
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", kernels="torch"))
    opt = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, device=torch.device("cpu"))
    assert isinstance(opt, Optimizers)
    opt.load_state_dict(opt.state_dict())
    for group in opt.param_groups:
        group["lr"] = 5e-5
    assert all(g["lr"] == 5e-5 for o in opt.optimizers.values() for g in o.param_groups)


@pytest.mark.parametrize("shape", [(16, 96), (96, 16), (3, 32, 128)])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_the_gram_form_of_newton_schulz_is_the_same_iteration(shape, dtype, tol):
    """Wide matrices iterate on their Gram matrix in float32/64 (fewer products): the result must be the
    plain iteration's, x <- a x + (b G + c G^2) x, computed here in float64."""
    from minimind.optim import NS_COEFFICIENTS

    torch.manual_seed(0)
    g = torch.randn(*shape, dtype=torch.float64) * torch.logspace(0, -3, shape[-1], dtype=torch.float64)
    x = scaled(g.mT if shape[-2] > shape[-1] else g)
    a, b, c = NS_COEFFICIENTS
    for _ in range(4):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    want = x.mT if shape[-2] > shape[-1] else x
    got = newton_schulz(g.to(dtype)).double()
    assert (got - want).norm() / want.norm() < tol
