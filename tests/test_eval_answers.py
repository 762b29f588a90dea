"""`minimind eval answers`: exact match that can fail, grouping by family, named input errors, and the
command end to end on a checkpoint whose greedy reply is known by construction ("always 7": every
position's logits favour the token "7", so with --max-new-tokens 1 every reply is "7")."""

import json

import pytest
from tokenizers import Tokenizer

from minimind.checkpoint import save_checkpoint
from minimind.cli import main
from minimind.eval import EvalDataError
from minimind.eval.answers import is_match, normalize, read_questions
from tests.test_eval import always_says


def test_exact_match_can_fail():
    assert is_match("7 + 5 = 12.", "7 + 5 = 12.") and is_match("  7 + 5  = 12 ", "7 + 5 = 12.")
    assert not is_match("11 + 7 = 16", "7 + 5 = 12.")
    assert not is_match("7 + 5 = 12. And more.", "7 + 5 = 12.")
    assert not is_match("rabbit rain", "elppa")
    assert is_match("purple red", "purple red") and not is_match("Purple red", "purple red")
    assert is_match("张兰超最喜欢红色。", "张兰超最喜欢红色")
    assert not is_match("张兰超最喜欢蓝色。", "张兰超最喜欢红色。")
    assert normalize(" a\n b。") == "a b"


def test_an_integer_answer_is_the_replys_last_integer():
    assert is_match("12", "12") and is_match("7 + 5 = 12.", "12") and is_match("7加5等于12。", "12")
    assert not is_match("12 + 1 = 13", "12") and not is_match("twelve", "12") and not is_match("-12", "12")
    assert is_match("3 - 5 = -2", "-2")


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def _q(question, answer, family=None):
    row = {"conversations": [{"role": "user", "content": question}], "answer": answer}
    return row | ({"family": family} if family else {})


def test_reads_rlaif_lines_and_names_the_bad_line(tmp_path):
    reference = {"conversations": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]}
    rows = read_questions(_write(tmp_path / "ok.jsonl", [_q("a?", "b", "x"), "", reference]))
    assert [(r["answer"], r["family"], r["messages"][-1]["content"]) for r in rows] == [("b", "x", "a?"),
                                                                                       ("2", "all", "1 + 1?")]
    for bad, why in (("{not json", "not valid JSON"), (json.dumps({"conversations": []}), "conversations"),
                     (json.dumps(_q("a?", "")), "no expected answer"),
                     (json.dumps({"conversations": [{"role": "assistant", "content": "x"}], "answer": "y"}),
                      "end with a user turn")):
        f = _write(tmp_path / "bad.jsonl", [_q("a?", "b"), bad])
        with pytest.raises(EvalDataError, match=f"bad.jsonl:2: .*{why}"):
            read_questions(f)
    with pytest.raises(EvalDataError, match="no questions"):
        read_questions(_write(tmp_path / "empty.jsonl", []))


@pytest.fixture(scope="module")
def always_7_ckpt(tokenizer_dir, tmp_path_factory):
    seven = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode("7", add_special_tokens=False).ids
    assert len(seven) == 1
    return save_checkpoint(tmp_path_factory.mktemp("always_7") / "ckpt", always_says(seven[0]),
                           tokenizer_dir=tokenizer_dir)


def test_eval_answers_end_to_end(always_7_ckpt, tmp_path, capsys):
    data = _write(tmp_path / "q.jsonl", [_q("What is 3 + 4?", "7", "arithmetic/en"),
                                         _q("What is 3 + 5?", "8", "arithmetic/en"),
                                         _q("Say seven.", "7.", "words"),
                                         _q("Say eight.", "eight", "words"),
                                         _q("Say seven again.", "7", "words")])
    report_file = tmp_path / "r" / "report.json"
    rc = main(["eval", "answers", "--ckpt", str(always_7_ckpt), "--data", str(data), "--max-new-tokens", "1",
               "--samples", "2", "--device", "cpu", "--report", str(report_file)])
    assert rc == 0
    report = json.loads(report_file.read_text(encoding="utf-8"))
    assert json.loads(capsys.readouterr().out) == report
    assert (report["questions"], report["correct"]) == (5, 3)
    fams = report["families"]
    assert (fams["arithmetic/en"]["correct"], fams["arithmetic/en"]["questions"]) == (1, 2)
    assert (fams["words"]["correct"], fams["words"]["questions"], fams["words"]["accuracy"]) == (2, 3, 2 / 3)
    assert [s["got"] for s in fams["words"]["samples"]] == ["7", "7"]
    assert [s["match"] for s in fams["words"]["samples"]] == [True, False]


def test_eval_answers_bad_file_exits_2(always_7_ckpt, tmp_path, capsys):
    data = _write(tmp_path / "q.jsonl", [_q("a?", "b"), "[1, 2]"])
    rc = main(["eval", "answers", "--ckpt", str(always_7_ckpt), "--data", str(data), "--device", "cpu"])
    assert rc == 2 and "q.jsonl:2:" in capsys.readouterr().err
