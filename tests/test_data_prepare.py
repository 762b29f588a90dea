"""`prepare`: tokens equal the chat template, loss weights exactly on assistant spans, bad input errors, atomicity.

Checked on ../shared/samples/ and synth output, with our tokenizer and with MiniMind's published one.
"""

import json

import numpy as np
import pytest

from minimind.cli import main
from minimind.data import prepare as prepare_module
from minimind.data.loader import DataError, open_prepared
from minimind.data.prepare import PrepareError, prepare
from minimind.data.tokenizer import load_tokenizer


@pytest.fixture(params=["ours", "minimind"])
def tok_dir(request, tokenizer_dir, shared_dir):
    return tokenizer_dir if request.param == "ours" else shared_dir / "minimind_tokenizer"


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _docs(data):
    return [np.asarray(data.tokens[data.offsets[d]:data.offsets[d + 1]]) for d in range(data.num_docs)]


def _codes(data, d):
    return np.asarray(data.codes[data.offsets[d]:data.offsets[d + 1]])


def _template_ids(tok, chat, **kw):
    return list(tok.apply_chat_template(chat, tokenize=True, return_dict=True, **kw)["input_ids"])


def _prep(tmp_path, stage, src, tok_dir, name="out", **kw):
    kw.setdefault("workers", 1)
    return open_prepared(prepare(stage, src, tok_dir, tmp_path / name, progress=False, **kw))


def _write(tmp_path, lines, name="in.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join(x if isinstance(x, bytes) else (json.dumps(x, ensure_ascii=False) + "\n").encode()
                              for x in lines))
    return path


@pytest.mark.parametrize("source", ["samples", "synth"])
@pytest.mark.parametrize("stage", ["sft", "reason"])
def test_tokens_equal_chat_template_and_weights_are_assistant_spans(tmp_path, tok_dir, shared_dir, synth_dir,
                                                                    source, stage):
    src = (shared_dir / "samples" if source == "samples" else synth_dir) / f"{stage}.jsonl"
    rows = _rows(src)[:200]
    src = _write(tmp_path, rows)
    data, tok = _prep(tmp_path, stage, src, tok_dir), load_tokenizer(tok_dir)
    assert data.num_docs == len(rows) and data.meta["counts"]["skipped_no_assistant"] == 0
    for d, row in enumerate(rows):
        chat = row["conversations"]
        ids = _docs(data)[d]
        assert ids.tolist() == _template_ids(tok, chat)
        codes = _codes(data, d)
        assistant = [m for m in chat if m["role"] == "assistant"]
        rendered = "".join(tok.apply_chat_template([{"role": "user", "content": "x"}, m], tokenize=False)
                           .split("<|im_start|>assistant\n", 1)[1].rstrip("\n") for m in assistant)
        assert tok.decode(ids[codes > 0]) == rendered  # content (+ rendered reasoning) and <|im_end|>, nothing else
        assert tok.decode(ids[codes > 0]).count("<|im_end|>") == len(assistant)
        if stage == "reason":
            tagged = tok.decode(ids[codes == 2])
            for tag in ("<think>", "</think>", "<answer>", "</answer>"):
                assert rendered.count(tag) == tagged.count(tag)
            assert tagged.replace("\n", "").replace("<think>", "").replace("</think>", "").replace(
                "<answer>", "").replace("</answer>", "") == ""  # only tag tokens (a split tag's pieces, newlines)
    assert data.meta["weight_values"] == [0.0, 1.0, 10.0 if stage == "reason" else 1.0]


def test_pretrain_documents_are_minimind2s_layout(tmp_path, tok_dir, shared_dir):
    """The default document format is MiniMind2's, <|im_start|> text <|im_end|>; --doc-format eos is ours
    before, text <|endoftext|>."""
    rows = _rows(shared_dir / "samples" / "pretrain.jsonl")
    data, tok = _prep(tmp_path, "pretrain", shared_dir / "samples" / "pretrain.jsonl", tok_dir), load_tokenizer(tok_dir)
    assert data.meta["token_dtype"] == "uint16" and data.codes is None and data.meta["doc_format"] == "minimind"
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert (data.meta["doc_start_id"], data.meta["eos_id"]) == (start, end)
    for ids, row in zip(_docs(data), rows):
        assert ids[0] == start and ids[-1] == end
        assert tok.decode(ids[1:-1]) == row["text"]
    eos = open_prepared(prepare("pretrain", shared_dir / "samples" / "pretrain.jsonl", tok_dir, tmp_path / "eos",
                                workers=1, progress=False, doc_format="eos"))
    assert eos.meta["doc_start_id"] is None and eos.meta["eos_id"] == tok.convert_tokens_to_ids("<|endoftext|>")
    for ids, row in zip(_docs(eos), rows):
        assert ids[-1] == eos.meta["eos_id"] and tok.decode(ids[:-1]) == row["text"]


def test_dpo_pairs_share_prompt_and_weight_only_final_response(tmp_path, tok_dir, shared_dir, synth_dir):
    rows = _rows(shared_dir / "samples" / "dpo.jsonl") + _rows(synth_dir / "dpo.jsonl")[:100]
    data, tok = _prep(tmp_path, "dpo", _write(tmp_path, rows), tok_dir), load_tokenizer(tok_dir)
    docs = _docs(data)
    assert data.num_docs == 2 * len(rows)
    for i, row in enumerate(rows):
        for k, side in enumerate(("chosen", "rejected")):
            d = 2 * i + k
            assert docs[d].tolist() == _template_ids(tok, row[side])
            p = data.prompt_lens[d]
            assert not _codes(data, d)[:p].any() and _codes(data, d)[p] == 1
            assert tok.decode(docs[d][_codes(data, d) > 0]) == row[side][-1]["content"] + "<|im_end|>"
        assert data.prompt_lens[2 * i] == data.prompt_lens[2 * i + 1]
        p = data.prompt_lens[2 * i]
        assert docs[2 * i][:p].tolist() == docs[2 * i + 1][:p].tolist()


def test_grpo_prompts_and_answers(tmp_path, tok_dir, shared_dir):
    rows = _rows(shared_dir / "samples" / "rlaif.jsonl") + [
        {"conversations": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"conversations": [{"role": "user", "content": "Say hi."}]},
    ]
    data, tok = _prep(tmp_path, "grpo", _write(tmp_path, rows), tok_dir), load_tokenizer(tok_dir)
    assert data.answers == ["42", "42", "7", "4", None]
    for ids, row in zip(_docs(data), rows):
        prompt = [m for m in row["conversations"] if m["role"] != "assistant"]
        assert ids.tolist() == _template_ids(tok, prompt, add_generation_prompt=True)


def test_workers_and_blocks_give_identical_output(tmp_path, tokenizer_dir, synth_dir, monkeypatch):
    monkeypatch.setattr(prepare_module, "BLOCK_BYTES", 8192)  # many blocks: order and line numbers across them
    one = prepare("sft", synth_dir / "sft.jsonl", tokenizer_dir, tmp_path / "one", workers=1, progress=False)
    two = prepare("sft", synth_dir / "sft.jsonl", tokenizer_dir, tmp_path / "two", workers=2, progress=False)
    for name in ("tokens.bin", "offsets.bin", "weights.bin", "prompt_lens.bin"):
        assert (one / name).read_bytes() == (two / name).read_bytes()
    assert open_prepared(two).num_docs == len(_rows(synth_dir / "sft.jsonl"))


GOOD = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_CASES = [
    ("sft", [GOOD, b'{"conversations": [\n'], ":2: invalid JSON"),
    ("sft", [GOOD, GOOD, {"messages": []}], ':3: missing field "conversations"'),
    ("sft", [{"conversations": [{"role": "bot", "content": "x"}]}], ":1: conversations[0].role: 'bot' is not one of"),
    ("sft", [{"conversations": [{"role": "user", "content": "  "}]}], ":1: conversations[0].content is empty"),
    ("sft", [{"conversations": [{"role": "user"}]}], ':1: conversations[0]: missing field "content"'),
    ("sft", [GOOD, b'{"conversations": "caf\xe9"}\n'], ":2: not valid UTF-8 (byte 0xe9"),
    ("sft", [b"[1, 2]\n"], ":1: expected a JSON object"),
    ("pretrain", [{"text": "ok"}, b'{"text": "a \\ud800 b"}\n'], ":2: a string holds a lone surrogate (\\ud800)"),
    ("sft", [b'{"conversations": [{"role": "user", "content": "x\\uDC00"}]}\n'], ":1: a string holds a lone surrogate"),
    ("pretrain", [{"text": "ok"}, {"txt": "no"}], ':2: missing field "text"'),
    ("pretrain", [{"text": ""}], ':1: empty "text"'),
    ("dpo", [{"chosen": GOOD["conversations"], "rejected": [{"role": "user", "content": "other"},
                                                             {"role": "assistant", "content": "no"}]}],
     ":1: \"chosen\" and \"rejected\" must share the prompt"),
    ("dpo", [{"chosen": GOOD["conversations"]}], ':1: missing field "rejected"'),
    ("grpo", [{"conversations": [{"role": "system", "content": "s"}]}], ":1: \"conversations\" must end with a user"),
    ("sft", [b"\n", b"   \n"], ": empty file"),
    ("sft", [], ": empty file"),
]


@pytest.mark.parametrize("stage,lines,message", BAD_CASES)
def test_bad_input_names_file_and_line_and_leaves_nothing(tmp_path, tokenizer_dir, stage, lines, message):
    src = _write(tmp_path, lines)
    with pytest.raises(PrepareError) as err:
        prepare(stage, src, tokenizer_dir, tmp_path / "out", workers=1, progress=False)
    assert str(err.value).startswith(f"{src}{message}"), str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no out dir, no temp dir


def test_error_line_number_across_blocks_with_workers(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(prepare_module, "BLOCK_BYTES", 1000)
    src = _write(tmp_path, [GOOD] * 499 + [b"{oops\n"] + [GOOD] * 100)
    with pytest.raises(PrepareError, match=rf"^{src}:500: invalid JSON"):
        prepare("sft", src, tokenizer_dir, tmp_path / "out", workers=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_skip_bad_counts(tmp_path, tokenizer_dir):
    src = _write(tmp_path, [GOOD, b"{bad\n", {"conversations": [{"role": "x", "content": "y"}]}, b"\n", GOOD])
    data = _prep(tmp_path, "sft", src, tokenizer_dir, skip_bad=True)
    assert data.num_docs == 2 and data.meta["counts"]["skipped_bad"] == 2 and data.meta["counts"]["lines"] == 4


def test_truncation_at_turn_boundary_and_no_assistant_skipped(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    long_turns = {"conversations": [{"role": "user", "content": "What is 1 + 1?"},
                                    {"role": "assistant", "content": "1 + 1 = 2."},
                                    {"role": "user", "content": "word " * 60},
                                    {"role": "assistant", "content": "ok " * 60}]}
    hopeless = {"conversations": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "x"}]}
    data = _prep(tmp_path, "sft", _write(tmp_path, [long_turns, hopeless, GOOD]), tokenizer_dir, max_seq_len=64)
    assert data.meta["counts"]["truncated"] == 2 and data.meta["counts"]["skipped_no_assistant"] == 1
    first = _docs(data)[0]
    assert first.tolist() == _template_ids(tok, long_turns["conversations"][:2])[:-1]  # cut after <|im_end|>
    assert tok.decode(first[_codes(data, 0) > 0]) == "1 + 1 = 2.<|im_end|>"


def test_tokenizer_mismatch_and_broken_dirs(tmp_path, tokenizer_dir, shared_dir):
    out = prepare("sft", _write(tmp_path, [GOOD]), tokenizer_dir, tmp_path / "p", workers=1, progress=False)
    open_prepared(out, tokenizer=tokenizer_dir)
    with pytest.raises(DataError, match="prepared with a different tokenizer"):
        open_prepared(out, tokenizer=shared_dir / "minimind_tokenizer")
    with pytest.raises(DataError, match="no meta.json"):
        open_prepared(tmp_path)
    tokens = out / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(DataError, match="tokens.bin: .* truncated"):
        open_prepared(out)
    out = prepare("sft", _write(tmp_path, [GOOD]), tokenizer_dir, out, workers=1, progress=False, force=True)
    (out / "weights.bin").unlink()
    with pytest.raises(DataError, match="weights.bin: missing"):
        open_prepared(out)


def test_replaces_prepared_dir_but_not_other_dirs(tmp_path, tokenizer_dir):
    src = _write(tmp_path, [GOOD])
    out = prepare("sft", src, tokenizer_dir, tmp_path / "p", workers=1, progress=False)
    with pytest.raises(PrepareError, match="--force"):
        prepare("sft", _write(tmp_path, [GOOD, GOOD], "two.jsonl"), tokenizer_dir, out, workers=1, progress=False)
    assert open_prepared(out).num_docs == 1
    prepare("sft", _write(tmp_path, [GOOD, GOOD], "two.jsonl"), tokenizer_dir, out, workers=1, progress=False,
            force=True)
    assert open_prepared(out).num_docs == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(PrepareError, match="refusing to overwrite"):
        prepare("sft", src, tokenizer_dir, tmp_path / "mine", workers=1, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_cli(tmp_path, tokenizer_dir, capsys):
    src = _write(tmp_path, [GOOD, b"{bad\n", GOOD])
    args = ["prepare", "--stage", "sft", "--input", str(src), "--tokenizer", str(tokenizer_dir),
            "--out", str(tmp_path / "p"), "--workers", "1"]
    assert main(args) == 2
    assert f"{src}:2: invalid JSON" in capsys.readouterr().err
    assert main(args + ["--skip-bad"]) == 0
    assert "skipped bad: 1" in capsys.readouterr().err
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["num_docs"] == 2


def test_cli_tag_weight(tmp_path, tokenizer_dir, shared_dir):
    out = tmp_path / "r"
    assert main(["prepare", "--stage", "reason", "--input", str(shared_dir / "samples" / "reason.jsonl"),
                 "--tokenizer", str(tokenizer_dir), "--out", str(out), "--tag-weight", "3"]) == 0
    data = open_prepared(out)
    assert data.meta["weight_values"] == [0.0, 1.0, 3.0] and (np.asarray(data.codes) == 2).any()
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--stage", "reason", "--input", str(tmp_path / "missing.jsonl"),
              "--tokenizer", str(tokenizer_dir), "--out", str(out)])
    assert exit_.value.code == 2


def test_blocks_stream_whole_lines_with_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "BLOCK_BYTES", 100)
    lines = [json.dumps({"text": "x" * (i % 37)}) + "\n" for i in range(300)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(lines) + '{"text": "no newline at the end"}')
    blocks = list(prepare_module._blocks(src))
    assert b"".join(b for b, _ in blocks) == src.read_bytes()
    longest = max(len(line) for line in lines)
    for block, first in blocks:
        assert len(block) <= 100 + longest  # a block is never much more than BLOCK_BYTES: the file is streamed
        assert block.endswith(b"\n") or block.endswith(b"}")
        assert block.split(b"\n")[0] == (lines[first - 1].rstrip("\n").encode() if first <= 300 else block)


def test_cli_shows_progress(tmp_path, tokenizer_dir, capsys):
    src = _write(tmp_path, [GOOD] * 3)
    assert main(["prepare", "--stage", "sft", "--input", str(src), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "p"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "prepare sft: 100%" in err and "3 documents" in err
