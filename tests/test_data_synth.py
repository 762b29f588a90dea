"""The synthetic corpus: every SPEC §3 format, deterministic, with true facts and arithmetic, and held-out problems."""

import csv
import json
import re

import pytest

from minimind.cli import main
from minimind.data.synth import SIZES, arithmetic_prompts, is_held_out, make_world, write_corpus

FILES = ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "reason.jsonl", "lora_identity.jsonl", "rlaif.jsonl",
         "eval_choice.csv")
EN_EQ = re.compile(r"(\d+) ([+\-*]) (\d+) = (\d+)")
ZH_EQ = re.compile(r"(\d+)(加|减|乘以)(\d+)等于(\d+)")
ZH_OP = {"加": "+", "减": "-", "乘以": "*"}
PROBLEM = re.compile(r"(\d+) ?([+\-*]|加|减|乘以|plus|minus|times) ?(\d+)")
WORD_OP = {"plus": "+", "minus": "-", "times": "*", **ZH_OP}


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _equations(text):
    for a, op, b, r in EN_EQ.findall(text):
        yield op, int(a), int(b), int(r)
    for a, op, b, r in ZH_EQ.findall(text):
        yield ZH_OP[op], int(a), int(b), int(r)


def _value(op, a, b):
    return a + b if op == "+" else a - b if op == "-" else a * b


def test_writes_every_format(synth_dir):
    assert sorted(p.name for p in synth_dir.iterdir()) == sorted(FILES)
    for row in _lines(synth_dir / "pretrain.jsonl"):
        assert isinstance(row["text"], str) and row["text"]
    for name in ("sft", "reason", "lora_identity"):
        for row in _lines(synth_dir / f"{name}.jsonl"):
            roles = [m["role"] for m in row["conversations"]]
            assert roles[-1] == "assistant" and set(roles) <= {"system", "user", "assistant"}
    for row in _lines(synth_dir / "dpo.jsonl"):
        assert row["chosen"][:-1] == row["rejected"][:-1]
        assert row["chosen"][-1]["role"] == row["rejected"][-1]["role"] == "assistant"
        assert row["chosen"][-1]["content"] != row["rejected"][-1]["content"]
    for row in _lines(synth_dir / "rlaif.jsonl"):
        conv = row["conversations"]
        assert conv[-1]["role"] == "user" and row["answer"] or conv[-1]["role"] == "assistant"
    for msg in (m for row in _lines(synth_dir / "reason.jsonl") for m in row["conversations"][1:]):
        assert "reasoning_content" in msg or re.fullmatch(r"<think>\n.+\n</think>\n<answer>\n.+\n</answer>",
                                                          msg["content"], re.S)


def test_bilingual_and_multi_turn(synth_dir):
    sft = _lines(synth_dir / "sft.jsonl")
    text = json.dumps(sft, ensure_ascii=False)
    assert re.search(r"[\u4e00-\u9fff]", text) and re.search(r"[A-Za-z]{4,}", text)
    assert any(len(r["conversations"]) >= 4 for r in sft)
    assert any(r["conversations"][0]["role"] == "system" for r in sft)


def test_deterministic_for_a_seed(tmp_path):
    a, b, c = (write_corpus(tmp_path / d, seed=s, scale=0.05) for d, s in (("a", 3), ("b", 3), ("c", 4)))
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes()
    assert a["sft"].read_bytes() != c["sft"].read_bytes()


def test_scale_controls_size(tmp_path):
    small = write_corpus(tmp_path / "s", scale=0.05)
    big = write_corpus(tmp_path / "b", scale=0.2)
    assert len(_lines(small["pretrain"])) == max(SIZES["pretrain"][1], round(SIZES["pretrain"][0] * 0.05))
    assert len(_lines(big["pretrain"])) == round(SIZES["pretrain"][0] * 0.2)
    with pytest.raises(ValueError, match="scale"):
        write_corpus(tmp_path / "z", scale=0)


def test_arithmetic_is_correct(synth_dir):
    n = 0
    for name in ("pretrain.jsonl", "sft.jsonl", "reason.jsonl"):
        for op, a, b, r in _equations((synth_dir / name).read_text(encoding="utf-8")):
            assert _value(op, a, b) == r, (name, op, a, b, r)
            n += 1
    assert n > 1000
    for row in _lines(synth_dir / "dpo.jsonl"):
        good = list(_equations(row["chosen"][-1]["content"]))
        bad = list(_equations(row["rejected"][-1]["content"]))
        assert all(_value(op, a, b) == r for op, a, b, r in good)
        assert all(_value(op, a, b) != r for op, a, b, r in bad)


def test_facts_are_consistent(synth_dir):
    world = make_world(0)
    city = {p.en: world.places[p.city].en for p in world.people}
    seen = 0
    for row in _lines(synth_dir / "pretrain.jsonl"):
        for name, place in re.findall(r"([A-Z][a-z]+ [A-Z][a-z]+) lives in ([A-Z][a-z]+)\.", row["text"]):
            assert city[name] == place
            seen += 1
    assert seen > 100


def test_held_out_arithmetic_is_disjoint_from_every_file(synth_dir):
    corpus = "".join((synth_dir / f).read_text(encoding="utf-8") for f in FILES)
    written = {(WORD_OP.get(op, op), int(a), int(b)) for a, op, b in PROBLEM.findall(corpus)}
    assert len(written) > 500 and not any(is_held_out(*p) for p in written)
    prompts = arithmetic_prompts(seed=1, n=80)  # of the ~88 held-out problems
    assert len({q for q, _ in prompts}) == 80
    for q, answer in prompts:
        (a, op, b), = PROBLEM.findall(q)
        op = WORD_OP.get(op, op)
        assert is_held_out(op, int(a), int(b)) and str(_value(op, int(a), int(b))) == answer
        assert (op, int(a), int(b)) not in written
    assert arithmetic_prompts(seed=1, n=20) == prompts[:20]
    rlaif_questions = {r["conversations"][0]["content"] for r in _lines(synth_dir / "rlaif.jsonl")}
    assert not rlaif_questions & {q for q, _ in prompts}


def test_eval_choice_csv(synth_dir):
    with open(synth_dir / "eval_choice.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "question", "A", "B", "C", "D", "answer"]
    for row in rows:
        assert row["answer"] in "ABCD" and len({row[k] for k in "ABCD"}) == 4
        if m := PROBLEM.search(row["question"]):
            a, op, b = m.groups()
            assert row[row["answer"]] == str(_value(WORD_OP.get(op, op), int(a), int(b)))


def test_cli(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "c"), "--scale", "0.01", "--seed", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(report) == sorted(f.split(".")[0] for f in FILES)
    assert main(["synth", "--out", str(tmp_path / "d"), "--scale", "-1"]) == 2


def _user_turns(synth_dir) -> set[str]:
    turns = set()
    for name in ("sft", "reason", "lora_identity", "rlaif"):
        for row in _lines(synth_dir / f"{name}.jsonl"):
            turns |= {m["content"] for m in row["conversations"] if m["role"] == "user"}
    for row in _lines(synth_dir / "dpo.jsonl"):
        turns |= {m["content"] for m in row["chosen"] if m["role"] == "user"}
    return turns


def test_held_out_prompts_are_asked_in_no_file(synth_dir):
    """Every family's held-out question: no user turn, no Q/A or instruction piece of pretraining, no CSV row."""
    from minimind.data.synth import FAMILIES, held_out_prompts

    rows = held_out_prompts(seed=0)
    assert {r["family"] for r in rows} == {f"{f}/{lang}" for f in FAMILIES for lang in ("en", "zh")}
    assert all(r["conversations"][-1]["role"] == "user" and r["answer"] for r in rows)
    turns = _user_turns(synth_dir)
    pretrain = (synth_dir / "pretrain.jsonl").read_text(encoding="utf-8")
    csv_text = (synth_dir / "eval_choice.csv").read_text(encoding="utf-8")
    for r in rows:
        q = r["conversations"][-1]["content"]
        assert q not in turns and q not in csv_text, r
        assert not any(piece in pretrain for piece in (f"Q: {q} A:", f"问：{q}答：", f"{q} Answer:", f"{q}答案：")), r
    assert held_out_prompts(seed=0) == rows


def test_held_out_facts_are_stated_in_pretraining_but_never_asked(synth_dir):
    from minimind.data.synth import FACT_KINDS, fact_answer, fact_questions, is_held_out_fact

    world = make_world(0)
    corpus = "".join((synth_dir / f).read_text(encoding="utf-8") for f in FILES)
    pretrain = (synth_dir / "pretrain.jsonl").read_text(encoding="utf-8")
    held, asked = 0, 0
    for p in world.people:
        for kind in range(FACT_KINDS):
            for zh in (False, True):
                phrasings = fact_questions(p, kind, zh)
                if is_held_out_fact(p, kind):
                    held += 1
                    assert not any(q in corpus for q in phrasings), (p, kind, zh)
                    assert fact_answer(world, p, kind, zh) in pretrain, (p, kind, zh)
                else:
                    asked += any(q in corpus for q in phrasings)
    assert 20 <= held <= 120 and asked > 200  # a fifth held out; the rest asked somewhere
