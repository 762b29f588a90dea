"""A knob's default in one place (issue 28): a training knob's default is its `TrainConfig` field, or the
stage record (recipes.STAGES) that names it, and nothing else in minimind/ or infer/ writes it again as a
default; help text and run.json read it from there. And no knob of any command has its default literal
written twice.

What counts as writing a default (`default_sites`), named by the knob it is the default of:
- a parameter's default, `def f(seq_len=256)` (keyword-only too);
- argparse's `add_argument("--seq-len", default=256)` (the knob: `dest=`, else the first long flag);
- `getattr(x, "seq_len", 256)` and `mapping.get("seq_len", 256)`;
- a class body's `seq_len: int = 256` (a dataclass field);
- a fallback, `x.seq_len if x.seq_len is not None else 256` and `x.seq_len or 256`.
Only numbers and strings count, and not the trivial ones (None, booleans, 0, 1, -1, 0.0, 1.0, ""): those
say "off", "none" or "as is" far more often than they choose a value. Tuples and lists do not count.
The sources themselves (TrainConfig's fields, the Stage class's and its records') are not sites.
"""

import ast
import dataclasses
from collections import defaultdict

from minimind.recipes import STAGES, Stage
from minimind.trainconfig import STAGE_FIELDS, TrainConfig
from tests.conftest import ROOT

PACKAGES = ("minimind", "infer")
TRIVIAL = (None, True, False, 0, 1, -1, 0.0, 1.0, "")
SOURCES = {"minimind/trainconfig.py": "TrainConfig", "minimind/recipes.py": "Stage"}  # file -> the class that is one


def counts(value) -> bool:
    """Whether `value` is a default worth holding to one place: a number or string, not a trivial one."""
    return (isinstance(value, (int, float, str)) and not isinstance(value, bool)
            and not any(value == t and type(value) is type(t) for t in TRIVIAL))


def _literal(node):
    """The number or string `node` writes (a negative number too) if it `counts`, else None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        value = node.operand.value
        value = -value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    else:
        value = node.value if isinstance(node, ast.Constant) else None
    return value if counts(value) else None


def _name_of(node) -> str | None:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None


def _flag_dest(call: ast.Call) -> str | None:
    for kw in call.keywords:
        if kw.arg == "dest" and isinstance(kw.value, ast.Constant):
            return kw.value.value
    flags = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    first = ([f for f in flags if f.startswith("--")] or flags or [None])[0]
    return first.lstrip("-").replace("-", "_") if first else None


def _call_sites(node: ast.Call):
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr == "add_argument":
        for kw in node.keywords:
            if kw.arg == "default" and (dest := _flag_dest(node)):
                yield dest, kw.value
    is_getattr = isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) == 3
    is_get = isinstance(func, ast.Attribute) and func.attr == "get" and len(node.args) == 2
    if is_getattr or is_get:
        key = node.args[1] if is_getattr else node.args[0]
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            yield key.value, node.args[-1]


def _fallback_sites(node):
    if isinstance(node, ast.IfExp) and isinstance(node.test, ast.Compare) and isinstance(node.test.ops[0], ast.IsNot):
        name = _name_of(node.test.left)
        if name is not None and _name_of(node.body) == name:
            yield name, node.orelse
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and len(node.values) == 2:
        if (name := _name_of(node.values[0])) is not None:
            yield name, node.values[1]


def _function_sites(node):
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    for arg, value in zip(positional[len(positional) - len(args.defaults):], args.defaults):
        yield arg.arg, value
    for arg, value in zip(args.kwonlyargs, args.kw_defaults):
        if value is not None:
            yield arg.arg, value


def default_sites(source: str, skip_class: str | None = None) -> list[tuple]:
    """(knob, value, line, scope) for every default `source` writes (see the module docstring); scope is
    the qualified name of the function or class it is written in. The body of class `skip_class` (a
    source of defaults itself) is left out."""
    out = []

    def visit(node, scope: str):
        if isinstance(node, ast.ClassDef) and node.name == skip_class:
            return
        inner = scope
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            inner = f"{scope}.{node.name}" if scope else node.name
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            found = _function_sites(node)
        elif isinstance(node, ast.Call):
            found = _call_sites(node)
        elif isinstance(node, ast.ClassDef):
            found = [(s.target.id, s.value) for s in node.body
                     if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None]
        else:
            found = _fallback_sites(node)
        for name, value_node in found:
            if (value := _literal(value_node)) is not None:
                out.append((name, value, value_node.lineno, inner))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source), "")
    return out


def _sources():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            yield rel, default_sites(path.read_text(encoding="utf-8"), skip_class=SOURCES.get(rel))


def trainconfig_defaults() -> dict[str, set]:
    """Each TrainConfig knob's default literals: its field's, or the stage records' for a knob they decide."""
    out = defaultdict(set)
    for f in dataclasses.fields(TrainConfig):
        if counts(f.default):
            out[f.name].add(f.default)
    for name in STAGE_FIELDS:
        out[name] |= {v for stage in STAGES.values() if counts(v := stage.default(name, on_cpu=False))}
        out[name] |= {v for stage in STAGES.values() if counts(v := stage.default(name, on_cpu=True))}
    return out


# Knobs of the same name that are not the training knob: (file, scope, knob) -> why its default is its own
OTHER_KNOBS = {
    ("minimind/cli.py", "_eval_arguments", "batch_size"): "`minimind eval`'s rows per forward, not training's",
    ("minimind/cli.py", "_eval_device", "device"): "`minimind eval`'s and `minimind report`'s device",
    ("minimind/eval/__init__.py", "load_for_eval", "device"): "`minimind eval`'s device, for callers in Python",
    ("minimind/eval/choice.py", "evaluate", "batch_size"): "`minimind eval choice`'s rows per forward",
    ("minimind/eval/lm_eval.py", "MiniMindLM.__init__", "device"): "lm-eval's model wrapper: eval's device",
    ("minimind/eval/lm_eval.py", "MiniMindLM.__init__", "batch_size"): "lm-eval's model wrapper: eval's batch",
    ("minimind/cli.py", "_eval_parsers", "max_new_tokens"): "`eval answers`' reply length, not GRPO's rollouts'",
    ("minimind/demo.py", "_parser", "batch_size"): "the demo's own measured setting, passed to train.py",
    ("minimind/config.py", "ModelConfig", "kernels"): "the model config's runtime field: a model built without "
    "a run (chat, serve, eval) needs one; a run passes its --kernels",
    ("minimind/optim.py", "Muon.__init__", "lr"): "a torch.optim optimizer's own defaults, torch's convention "
    "(AdamW(lr=1e-3)); the run passes its --lr and --weight-decay (backend.make_backend)",
    ("minimind/optim.py", "Muon.__init__", "weight_decay"): "as Muon's lr",
}


def repeated(defaults: dict[str, set], sites) -> list[tuple]:
    """The sites (file, knob, value, line, scope) in `sites` (file, [(knob, value, line, scope)]) that write
    a default of `defaults` again."""
    return [(file, name, value, line, scope) for file, found in sites for name, value, line, scope in found
            if value in defaults.get(name, ())]


def twice(sites) -> list[str]:
    """Every (knob, value) written as a default in more than one place."""
    where = defaultdict(list)
    for file, found in sites:
        for name, value, line, _ in found:
            where[(name, value)].append(f"{file}:{line}")
    return [f"{name} = {value!r}: {', '.join(places)}" for (name, value), places in where.items() if len(places) > 1]


def test_no_trainconfig_default_is_written_again():
    found = repeated(trainconfig_defaults(), _sources())
    again = [f"{file}:{line} {name} = {value!r} (in {scope})" for file, name, value, line, scope in found
             if (file, scope, name) not in OTHER_KNOBS]
    assert not again, "a TrainConfig (or stage record) default written again:\n" + "\n".join(again)
    stale = set(OTHER_KNOBS) - {(file, scope, name) for file, name, _, _, scope in found}
    assert not stale, f"OTHER_KNOBS names sites that no longer write that default: {sorted(stale)}"


def test_the_defaults_issue_28_found_twice_are_written_once():
    """tag_weight 10.0 (cli.py, prepare.py twice), GRPO's beta 0.04 (its record and stages.py), serve's and
    chat's dtype "auto" (cli.py, chat.py, server.py): now once each."""
    named = {("tag_weight", 10.0), ("beta", 0.04), ("dtype", "auto")}
    sites = [(file, [s for s in found if (s[0], s[1]) in named]) for file, found in _sources()]
    assert twice(sites) == []


PLANTED = '''
import argparse

def run(args, group_size=4):
    p = argparse.ArgumentParser()
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--save", dest="save_every", default=500)
    beta = args.beta if args.beta is not None else 0.04
    lr = getattr(args, "lr", 2e-4)
    seq = args.seq_len or 256
    return {}.get("log_every", 10), 1.0, 0

class Knobs:
    decay_frac: float = 0.2
    keep: int = 1
'''


def test_the_checks_find_planted_duplicates():
    sites = [("planted.py", default_sites(PLANTED))]
    found = {name for _, name, _, _, _ in repeated(trainconfig_defaults(), sites)}
    assert found == {"group_size", "keep", "save_every", "beta", "lr", "seq_len", "log_every", "decay_frac"}, found
    again = [("planted.py", default_sites("def f(tag_weight=10.0):\n    pass\n")),
             ("other.py", default_sites("def g(x):\n    return getattr(x, 'tag_weight', 10.0)\n"))]
    assert twice(again) == ["tag_weight = 10.0: planted.py:1, other.py:2"]
    assert twice(sites) == []  # one of each is no duplicate
    assert default_sites("class TrainConfig:\n    keep: int = 3\n", skip_class="TrainConfig") == []
    assert ("keep", 3, 2, "C") in default_sites("class C:\n    keep: int = 3\n")


def test_the_sources_are_read():
    defaults = trainconfig_defaults()
    assert 0.04 in defaults["beta"] and defaults["save_every"] == {500} and defaults["schedule"] == {"auto"}
    assert 256 in defaults["seq_len"] and Stage.__dataclass_fields__["seq_len"].default == 256
