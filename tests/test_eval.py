"""`minimind eval choice / ppl / lm-eval` on real checkpoints whose answers are known by construction.

"Always C": attention and MLP outputs are zeroed, so the final hidden state is the normalised
embedding of the last token; every embedding has a large positive coordinate 0 and the untied
lm_head reads coordinate 0 into the logit of token "C" only, so C wins among A-D at every position.
"Uniform": an all-zero untied lm_head gives logits 0, so every next token has probability 1/V and
the per-token NLL is ln V exactly (perplexity V; tolerance rel 1e-6 for fp32 log-softmax).
"""

import csv
import json
import math

import pytest
import torch
from tokenizers import Tokenizer

from minimind.checkpoint import save_checkpoint
from minimind.cli import main
from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM

QUESTIONS = {  # subject -> answers; 3 of 10 are C
    "algebra_val": "CABDC",
    "biology_val": "ABCDD",
}


def _model(untied=True) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(ModelConfig.from_preset("tiny", [f"tie_word_embeddings={not untied}"],
                                                       kernels="torch")).eval()


def always_says(token_id: int) -> MiniMindForCausalLM:
    """A `tiny` model whose every next token is `token_id`: attention and MLP outputs zeroed, so the last
    hidden state is the normalised embedding, whose large coordinate 0 the untied lm_head reads into
    that one token's logit."""
    model = _model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight[:, 0] = 5.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id, 0] = 10.0
    return model


@pytest.fixture(scope="module")
def always_c_ckpt(tokenizer_dir, tmp_path_factory):
    c_id = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode("C", add_special_tokens=False).ids[0]
    return save_checkpoint(tmp_path_factory.mktemp("always_c") / "ckpt", always_says(c_id), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def uniform_ckpt(tokenizer_dir, tmp_path_factory):
    model = _model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return save_checkpoint(tmp_path_factory.mktemp("uniform") / "ckpt", model, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def random_ckpt(tokenizer_dir, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("random") / "ckpt", _model(untied=False),
                           tokenizer_dir=tokenizer_dir)


def write_subject(path, answers: str, header=("id", "question", "A", "B", "C", "D", "answer")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, a in enumerate(answers):
            w.writerow([i, f"第{i}题：{i} 加 {i} 等于多少？", f"{2 * i}", f"{2 * i + 1}", "七", "x", a])


@pytest.fixture
def choice_dir(tmp_path):
    d = tmp_path / "val"
    d.mkdir()
    for subject, answers in QUESTIONS.items():
        write_subject(d / f"{subject}.csv", answers)
    return d


def run_json(argv, capsys) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("shots", [0, 2])
def test_always_c_scores_fraction_of_c(always_c_ckpt, choice_dir, tmp_path, shots, capsys):
    report_file = tmp_path / "report.json"
    report = run_json(["eval", "choice", "--ckpt", str(always_c_ckpt), "--data", str(choice_dir), "--shots",
                       str(shots), "--batch-size", "3", "--report", str(report_file)], capsys)
    assert report["overall"] == {"accuracy": 3 / 10, "correct": 3, "total": 10}
    assert report["subjects"]["algebra"]["accuracy"] == 2 / 5 and report["subjects"]["biology"]["accuracy"] == 1 / 5
    assert json.loads(report_file.read_text()) == report


def test_always_c_on_shared_sample(always_c_ckpt, shared_dir, capsys):
    sample = shared_dir / "samples" / "eval_choice.csv"
    answers = [row["answer"] for row in csv.DictReader(open(sample, encoding="utf-8"))]
    report = run_json(["eval", "choice", "--ckpt", str(always_c_ckpt), "--data", str(sample)], capsys)
    assert report["overall"]["accuracy"] == answers.count("C") / len(answers)


def test_cmmlu_header_and_batching_do_not_change_predictions(random_ckpt, tmp_path, capsys):
    """CMMLU's header (`,Question,...,Answer`) reads the same; batch size 1 and 7 give the same answers."""
    write_subject(tmp_path / "a.csv", "ABCDABCDAB")
    write_subject(tmp_path / "b.csv", "ABCDABCDAB", header=("", "Question", "A", "B", "C", "D", "Answer"))
    one = run_json(["eval", "choice", "--ckpt", str(random_ckpt), "--data", str(tmp_path / "a.csv"),
                    "--batch-size", "1"], capsys)
    many = run_json(["eval", "choice", "--ckpt", str(random_ckpt), "--data", str(tmp_path / "b.csv"),
                     "--batch-size", "7"], capsys)
    assert one["overall"] == many["overall"]


def test_choice_bad_csv_errors(always_c_ckpt, tmp_path, capsys):
    write_subject(tmp_path / "no_answer.csv", "AB", header=("id", "question", "A", "B", "C", "D", "solution"))
    assert main(["eval", "choice", "--ckpt", str(always_c_ckpt), "--data", str(tmp_path / "no_answer.csv")]) == 2
    err = capsys.readouterr().err
    assert "no_answer.csv" in err and "missing column(s) answer" in err
    write_subject(tmp_path / "bad.csv", "ABE")
    assert main(["eval", "choice", "--ckpt", str(always_c_ckpt), "--data", str(tmp_path / "bad.csv")]) == 2
    err = capsys.readouterr().err
    assert "bad.csv:4" in err and "'E'" in err


def test_choice_same_subject_twice_is_an_error(always_c_ckpt, tmp_path, capsys):
    write_subject(tmp_path / "law_dev.csv", "AB")
    write_subject(tmp_path / "law_val.csv", "CD")
    assert main(["eval", "choice", "--ckpt", str(always_c_ckpt), "--data", str(tmp_path)]) == 2
    assert "'law' again" in capsys.readouterr().err


def test_uniform_model_perplexity_is_vocab_size(uniform_ckpt, tokenizer_dir, tmp_path, capsys):
    docs = ["The quick brown fox jumps over the lazy dog. " * 30, "你好，世界！这是一个测试。", "short"]
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n\n" for t in docs), encoding="utf-8")
    report = run_json(["eval", "ppl", "--ckpt", str(uniform_ckpt), "--data", str(data), "--seq-len", "64",
                       "--batch-size", "4"], capsys)
    v = 6400
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    n_tokens = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    assert report["tokens"] == n_tokens and report["bytes"] == n_bytes and report["documents"] == 3
    assert report["nll_per_token"] == pytest.approx(math.log(v), rel=1e-6)
    assert report["perplexity"] == pytest.approx(v, rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(n_tokens * math.log2(v) / n_bytes, rel=1e-6)


def test_ppl_windows_and_text_file(random_ckpt, tmp_path, capsys):
    """A plain text file is one document; the window size changes context, never which tokens count."""
    (tmp_path / "a.txt").write_text("Once upon a time, there was a tiny model. " * 20, encoding="utf-8")
    short = run_json(["eval", "ppl", "--ckpt", str(random_ckpt), "--data", str(tmp_path / "a.txt"),
                      "--seq-len", "16"], capsys)
    long = run_json(["eval", "ppl", "--ckpt", str(random_ckpt), "--data", str(tmp_path / "a.txt"),
                     "--seq-len", "512"], capsys)
    assert short["tokens"] == long["tokens"] > 16 and short["documents"] == 1
    assert short["perplexity"] != long["perplexity"]


def test_ppl_bad_jsonl_names_line(random_ckpt, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    assert main(["eval", "ppl", "--ckpt", str(random_ckpt), "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


LM_EVAL_DOCS = [  # answer letters: 2 of 5 are C; generation targets: 3 of 5 are what always-C writes
    {"question": "1+1=?", "answer": "C", "gen": "CCCC"},
    {"question": "2+2=?", "answer": "A", "gen": "CCCC"},
    {"question": "天空是什么颜色？", "answer": "C", "gen": "blue"},
    {"question": "3+3=?", "answer": "D", "gen": "CCCC"},
    {"question": "4+4=?", "answer": "B", "gen": "8"},
]
TEXT = "Once upon a time there was a tiny language model. 从前有一个很小的语言模型。"


@pytest.fixture(scope="module")
def lm_tasks(tmp_path_factory):
    """Three local lm-eval tasks (multiple_choice, generate_until, loglikelihood_rolling) on jsonl files."""
    d = tmp_path_factory.mktemp("lm_tasks")
    (d / "docs.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in LM_EVAL_DOCS), "utf-8")
    (d / "text.jsonl").write_text(json.dumps({"text": TEXT}, ensure_ascii=False) + "\n", "utf-8")
    common = "dataset_path: json\ntest_split: test\n"
    data = lambda f: f"dataset_kwargs:\n  data_files:\n    test: {d / f}\n"
    (d / "choice.yaml").write_text(
        "task: mm_tiny_choice\n" + common + data("docs.jsonl") + "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\\n答案：\"\ndoc_to_choice: [\"A\", \"B\", \"C\", \"D\"]\n"
        "doc_to_target: \"{{['A', 'B', 'C', 'D'].index(answer)}}\"\ntarget_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n", "utf-8")
    (d / "gen.yaml").write_text(
        "task: mm_tiny_gen\n" + common + data("docs.jsonl") + "output_type: generate_until\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_target: \"{{gen}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n", "utf-8")
    (d / "rolling.yaml").write_text(
        "task: mm_tiny_ppl\n" + common + data("text.jsonl") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: bits_per_byte\n", "utf-8")
    return d


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_lm_eval_choice_and_generate(always_c_ckpt, lm_tasks, offline, capsys):
    pytest.importorskip("lm_eval")
    report = run_json(["eval", "lm-eval", "--ckpt", str(always_c_ckpt), "--tasks", "mm_tiny_choice,mm_tiny_gen",
                       "--include-path", str(lm_tasks), "--bootstrap-iters", "0", "--batch-size", "2"], capsys)
    assert report["results"]["mm_tiny_choice"]["acc,none"] == pytest.approx(2 / 5)
    assert report["results"]["mm_tiny_gen"]["exact_match,none"] == pytest.approx(3 / 5)


def test_lm_eval_with_chat_template(always_c_ckpt, lm_tasks, offline, capsys):
    """The chat-template path renders prompts (no doubled bos) and scores the same as the plain one here."""
    pytest.importorskip("lm_eval")
    from minimind.eval.lm_eval import MiniMindLM

    lm = MiniMindLM(ckpt=always_c_ckpt)
    text = lm.apply_chat_template([{"role": "user", "content": "1+1=?"}])
    assert "1+1=?" in text and lm._encode_context(text).count(lm.prefix[0]) == lm._encode(text).count(lm.prefix[0])
    report = run_json(["eval", "lm-eval", "--ckpt", str(always_c_ckpt), "--tasks", "mm_tiny_choice",
                       "--include-path", str(lm_tasks), "--bootstrap-iters", "0", "--apply-chat-template"], capsys)
    assert report["results"]["mm_tiny_choice"]["acc,none"] == pytest.approx(2 / 5)


def test_lm_eval_rolling_matches_eval_ppl(uniform_ckpt, lm_tasks, tmp_path, offline, capsys):
    pytest.importorskip("lm_eval")
    report = run_json(["eval", "lm-eval", "--ckpt", str(uniform_ckpt), "--tasks", "mm_tiny_ppl",
                       "--include-path", str(lm_tasks), "--bootstrap-iters", "0"], capsys)
    ppl = run_json(["eval", "ppl", "--ckpt", str(uniform_ckpt), "--data", str(lm_tasks / "text.jsonl")], capsys)
    assert report["results"]["mm_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(ppl["bits_per_byte"], rel=1e-6)


def test_lm_eval_unknown_task_is_usage_error(always_c_ckpt, lm_tasks, offline, capsys):
    pytest.importorskip("lm_eval")
    assert main(["eval", "lm-eval", "--ckpt", str(always_c_ckpt), "--tasks", "no_such_task",
                 "--include-path", str(lm_tasks)]) == 2
    assert "no_such_task" in capsys.readouterr().err
