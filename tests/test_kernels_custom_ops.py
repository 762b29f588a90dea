"""torch.compile traces through the Triton ops (issue 17): every launcher is a `minimind::*` operator
with a fake implementation, so `torch.compile(fullgraph=True)` records it as one opaque node instead of
breaking the graph. On the CPU the backend is `aot_eager` (inductor cannot place a Triton kernel on a
CPU tensor); it runs the same forward and backward graphs that inductor would get, so the fakes, the
autograd Functions' traced backward and the ops' schemas are what is checked here. The kernels run
under the interpreter, as in every tests/test_kernels_*.py."""

import pytest
import torch

import minimind.kernels as K
from minimind.config import ModelConfig
from minimind.kernels.testing import assert_close, check_against_ref
from minimind.model import MiniMindForCausalLM


class _Recorder:
    """aot_eager that keeps the forward and backward graphs it compiled (torch._dynamo.testing has one,
    but not in every torch this project supports)."""

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.graphs = {"fw": [], "bw": []}

        def keep(kind):
            def compiler(gm, example_inputs):
                self.graphs[kind].append(gm)
                return make_boxed_func(gm.forward)

            return compiler

        self.backend = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))

    def ops(self, kind: str) -> set[str]:
        """The minimind:: operators called in the recorded graphs of `kind` ("fw" or "bw"), also those a
        mutating op is wrapped in (auto_functionalized(minimind.rope_.default, ...))."""
        names = set()
        for gm in self.graphs[kind]:
            for n in gm.graph.nodes:
                for target in (n.target, *n.args):
                    if isinstance(target, torch._ops.OpOverload) and target.namespace == "minimind":
                        names.add(target._opname)
        return names


def _compiled(fn):
    torch._dynamo.reset()
    rec = _Recorder()
    return torch.compile(fn, fullgraph=True, backend=rec.backend), rec


def _targets(n, v):
    t = torch.randint(0, v, (n,))
    t[2] = -100
    return t


def _moe_inputs(n=9, d=20, f=40, e=5, top_k=2):
    idx = torch.stack([torch.randperm(e - 1)[:top_k] for _ in range(n)])  # the last expert receives no token
    weight = torch.rand(n, top_k)
    experts = tuple(torch.randn(*s) / s[-1] ** 0.5 for s in ((e, f, d), (e, f, d), (e, d, f)))
    return (torch.randn(n, d), weight / weight.sum(-1, keepdim=True), idx, *experts)


# name -> (triton op, reference, inputs, the inputs to differentiate, the minimind:: ops of forward and backward)
CASES = {
    "rmsnorm": (lambda x, w: K.rmsnorm(x, w, 1e-6), lambda x, w: K.rmsnorm_ref(x, w, 1e-6),
                lambda: (torch.randn(3, 37, 123), torch.randn(123)), (0, 1), {"rmsnorm_fwd"}, {"rmsnorm_bwd"}),
    "add_rmsnorm": (lambda x, r, w: K.add_rmsnorm(x, r, w, 1e-6), lambda x, r, w: K.add_rmsnorm_ref(x, r, w, 1e-6),
                    lambda: (torch.randn(2, 5, 64), torch.randn(2, 5, 64), torch.randn(64)), (0, 1, 2),
                    {"rmsnorm_fwd"}, {"rmsnorm_bwd"}),
    "rope": (K.rope, K.rope_ref,
             lambda: (torch.randn(2, 7, 4, 16), torch.randn(2, 7, 2, 16), torch.randn(9, 8), torch.randn(9, 8),
                      torch.cat([torch.arange(3), torch.arange(4)]).expand(2, 7)), (0, 1), {"rope"}, {"rope"}),
    "swiglu": (K.swiglu, K.swiglu_ref, lambda: (torch.randn(3, 37, 123), torch.randn(3, 37, 123)), (0, 1),
               {"swiglu_fwd"}, {"swiglu_bwd"}),
    "cross_entropy": (lambda x, t, w: K.cross_entropy(x, t, w, rows_per_program=2), K.cross_entropy_ref,
                      lambda: (torch.randn(13, 300) * 3, _targets(13, 300), torch.rand(13)), (0, 2),
                      {"cross_entropy_fwd"}, set()),  # its backward scales the gradient the forward wrote
    "fused_linear_cross_entropy": (
        lambda h, w, t, tw: K.fused_linear_cross_entropy(h, w, t, tw, reduction="sum", chunk_size=4),
        lambda h, w, t, tw: K.fused_linear_cross_entropy_ref(h, w, t, tw, reduction="sum"),
        lambda: (torch.randn(13, 24), torch.randn(300, 24) / 24**0.5, _targets(13, 300), torch.rand(13)), (0, 1, 3),
        {"fused_linear_cross_entropy_fwd"}, set()),
    "fused_linear_cross_entropy_none": (  # per-row gradients: the backward recomputes, chunk by chunk
        lambda h, w, t, tw: K.fused_linear_cross_entropy(h, w, t, tw, reduction="none", chunk_size=4),
        lambda h, w, t, tw: K.fused_linear_cross_entropy_ref(h, w, t, tw, reduction="none"),
        lambda: (torch.randn(13, 24), torch.randn(300, 24) / 24**0.5, _targets(13, 300), torch.rand(13)), (0, 1, 3),
        {"fused_linear_cross_entropy_fwd"}, {"fused_linear_cross_entropy_fwd"}),
    "moe_gate": (lambda h, g: K.moe_gate(h, g, 2, True), lambda h, g: K.moe_gate_ref(h, g, 2, True),
                 lambda: (torch.randn(37, 20), torch.randn(5, 20)), (0, 1), {"moe_gate_fwd"}, {"moe_gate_bwd"}),
    "moe_dispatch_combine": (
        lambda *a: K.moe_dispatch_combine(*a, block_sizes=(16, 16, 16)), K.moe_dispatch_combine_ref, _moe_inputs,
        (0, 1, 3, 4, 5), {"moe_grouped_mm"}, {"moe_grouped_mm", "swiglu_bwd", "moe_grouped_wgrad"}),
}


def _sorted_topk(op):
    """moe_gate's top-k order is unspecified in the reference: compare the outputs sorted by expert id."""
    def sorted_op(h, g):
        tw, ti, probs = op(h, g)
        ti, order = ti.sort(dim=-1)
        return tw.gather(-1, order), ti, probs
    return sorted_op


@pytest.mark.parametrize("name", list(CASES))
def test_op_compiles_without_graph_breaks(name):
    op, ref, make_inputs, wrt, fw_ops, bw_ops = CASES[name]
    compiled, rec = _compiled(op)
    args = make_inputs()
    if name == "moe_gate":
        op, ref, compiled = _sorted_topk(op), _sorted_topk(ref), _sorted_topk(compiled)
    check_against_ref(compiled, op, args, wrt=wrt, msg=f"{name}: compiled vs eager")
    check_against_ref(compiled, ref, args, wrt=wrt, msg=f"{name}: compiled vs reference")
    assert rec.ops("fw") == fw_ops, f"{name}: forward graph calls {rec.ops('fw')}"
    assert rec.ops("bw") == bw_ops, f"{name}: backward graph calls {rec.ops('bw')}"


def test_inplace_rope_compiles():
    q, k, cos, sin = torch.randn(1, 3, 4, 16), torch.randn(1, 3, 2, 16), torch.randn(8, 8), torch.randn(8, 8)
    pos = torch.tensor([[5, 6, 7]])
    want = K.rope_ref(q, k, cos, sin, pos)
    compiled, rec = _compiled(lambda q, k: K.rope(q, k, cos, sin, pos, inplace=True))
    with torch.no_grad():
        q2, k2 = compiled(q, k)
    assert q2 is q and k2 is k
    assert_close(q, want[0], msg="q rotated in place")
    assert_close(k, want[1], msg="k rotated in place")
    assert rec.ops("fw") == {"rope_"}


@pytest.mark.parametrize("variant, overrides", [("dense", []), ("moe", ["use_moe=true", "n_routed_experts=4"])])
def test_tiny_model_compiles_without_graph_breaks(variant, overrides):
    """The whole `tiny` model with kernels="triton" and the trainer's loss, forward and backward in one
    graph each: no graph break, every op opaque, and the same loss and gradients as eager."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", overrides, kernels="triton"))
    ids = torch.randint(0, 6400, (2, 13))
    weights = torch.rand(24)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)

    def loss_fn(ids, weights, position_ids):
        out = model(ids[:, :-1], position_ids=position_ids, return_hidden=True)
        hidden = out.hidden.reshape(-1, out.hidden.shape[-1])
        ce = model.ops.fused_linear_cross_entropy(hidden, model.lm_head.weight, ids[:, 1:].reshape(-1), weights,
                                                  reduction="sum")
        return ce / weights.sum() + out.aux_loss

    assert model.ops.name == "triton"
    compiled, rec = _compiled(loss_fn)
    grads = {}
    for mode, fn in (("eager", loss_fn), ("compiled", compiled)):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, weights, position_ids)
        loss.backward()
        grads[mode] = [loss.detach()] + [p.grad for p in model.parameters()]
    # fullgraph=True raises at a graph break; one forward and one backward graph says nothing was split
    assert len(rec.graphs["fw"]) == 1 and len(rec.graphs["bw"]) == 1, rec.graphs
    want = {"rmsnorm_fwd", "rope", "swiglu_fwd", "fused_linear_cross_entropy_fwd"}
    want |= {"moe_gate_fwd", "moe_grouped_mm"} if variant == "moe" else set()
    assert rec.ops("fw") == want, rec.ops("fw")
    for i, (got, want) in enumerate(zip(grads["compiled"], grads["eager"])):
        assert got is not None and want is not None, i
        assert_close(got, want, "model", f"{variant}: loss and grads [{i}]")


def _opcheck_inputs():
    x, w = torch.randn(4, 3, 16), torch.randn(16)
    q, k, cos, sin = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8), torch.randn(5, 4), torch.randn(5, 4)
    pos = torch.tensor([0, 1, 2])
    logits, targets = torch.randn(5, 40), _targets(5, 40)
    hidden, lm = torch.randn(5, 8), torch.randn(40, 8)
    probs = torch.randn(6, 4).softmax(-1)
    return {
        "rmsnorm_fwd": [(x, None, w, 1e-6, None), (x, x.clone(), w, 1e-6, 2)],
        "rmsnorm_bwd": [(x, x, w, torch.rand(12), None, None, torch.float32),
                        (x, x, w, torch.rand(12), x.clone(), 4, torch.float32)],
        "rope": [(q, k, cos, sin, pos, 1.0, None)],
        "rope_": [(q.clone(), k.clone(), cos, sin, pos, None)],
        "swiglu_fwd": [(x, x.clone(), None)],
        "swiglu_bwd": [(x, x.clone(), x.clone(), None)],
        "cross_entropy_fwd": [(logits, targets, None, -100, True, None),
                              (logits, targets, torch.rand(5), -100, False, 2)],
        "fused_linear_cross_entropy_fwd": [(hidden, lm, targets, torch.rand(5), -100, 2, True, None),
                                           (hidden, lm, targets, None, -100, 4, False, None),
                                           (hidden, lm, targets, None, -100, 4, True, torch.rand(5))],
        "moe_gate_fwd": [(torch.randn(6, 4), 2, True)],
        "moe_gate_bwd": [(probs, torch.rand(6, 2), torch.tensor([[0, 1]] * 6), torch.rand(6, 2), None, 2, True)],
    }


@pytest.mark.parametrize("name", list(_opcheck_inputs()))
def test_opcheck(name):
    """torch.library.opcheck: the schema matches what the op mutates, the fake matches the real outputs
    (shapes, dtypes, strides), and the op survives aot tracing with dynamic shapes."""
    op = getattr(torch.ops.minimind, name)
    for args in _opcheck_inputs()[name]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_moe_grouped_ops():
    from minimind.kernels.moe import _route

    x, tw, idx, w_gate, w_up, w_down = _moe_inputs(n=6, d=16, f=16, e=3)
    r = _route(idx, 3, 16)
    blocks = [16, 16, 16]
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for args in ((x, r.tok, w_gate, w_up, r.seg_start, r.counts, r.tile_end, r.n_tiles, True, True, blocks),
                 (torch.randn(12, 16), r.tok, w_down, None, r.seg_start, r.counts, r.tile_end, r.n_tiles, False,
                  False, blocks)):
        torch.library.opcheck(torch.ops.minimind.moe_grouped_mm, args, test_utils=utils)
    args = (torch.randn(12, 16), x, r.tok, r.seg_start, r.counts, w_gate, True, blocks)
    torch.library.opcheck(torch.ops.minimind.moe_grouped_wgrad, args, test_utils=utils)


def test_every_op_is_checked():
    """A new minimind:: op must get an opcheck case above."""
    import minimind.kernels.triton_ops  # noqa: F401  (every kernel module, so every op is registered)

    names = torch._C._dispatch_get_all_op_names()
    registered = {name.split("::")[1] for name in names if name.startswith("minimind::")}
    assert registered == set(_opcheck_inputs()) | {"moe_grouped_mm", "moe_grouped_wgrad"}
