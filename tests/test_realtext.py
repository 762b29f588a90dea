"""bench/realtext.py, issue 18's real-text benchmark: its documents and its scorer. The scorer must give a
model's held-out NLL exactly as our own trainer computes it on the same documents (one a row, MiniMind2's
layout), after export, through stock transformers; and the corpus must cut pages into short documents
without losing text."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import realtext  # noqa: E402
import realtext_corpus  # noqa: E402


def test_sections_are_cut_into_short_documents_without_losing_text():
    para = "word " * 60  # 300 bytes
    section = "HEADING\n" + "\n\n".join([para.strip()] * 5) + "\n\n" + "x" * 1500
    docs = realtext_corpus.chunks(section)
    assert all(len(d.encode()) <= realtext_corpus.DOC_BYTES for d in docs)
    assert "".join(docs).replace("\n", "").replace(" ", "") == section.replace("\n", "").replace(" ", "")
    zh = "中文字符" * 100  # one 1200-byte line: cut by characters, never inside one
    assert "".join(realtext_corpus.chunks(zh)) == zh


def test_man_and_rst_sections():
    page = "NAME\n       cp - copy files\n\nDESCRIPTION\n       Copy SOURCE to DEST.\n\n       More.\n"
    assert realtext_corpus.man_sections(page) == ["NAME\ncp - copy files", "DESCRIPTION\nCopy SOURCE to DEST.\n\nMore."]
    rst = "Title\n=====\n\nIntro.\n\nPart\n----\nBody."
    assert realtext_corpus.rst_sections(rst) == ["Title\n=====\n\nIntro.", "Part\n----\nBody."]


def test_split_is_by_page_name_in_every_language():
    zh, en = "/usr/share/man/zh_CN/man1/cp.1.gz", "/usr/share/man/man1/cp.1.gz"
    assert realtext_corpus.page_name("man", zh) == realtext_corpus.page_name("man", en) == "cp.1.gz"
    names = [f"page{i}.1.gz" for i in range(1000)]
    assert 50 < sum(map(realtext_corpus.is_val, names)) < 150


@pytest.mark.parametrize("fmt", ["minimind", "eos"])
def test_scorer_gives_our_trainers_nll_after_export(tmp_path, tokenizer_dir, fmt):
    """Documents scored alone through transformers (realtext.score_model) = the same documents' summed
    loss in our loader's one-document-a-row batches, run through our model: same tokens, same targets
    (text and the end token, given the start token). A scorer that dropped the end token, or scored the
    start token, would differ by a whole token's NLL."""
    pytest.importorskip("transformers")
    from minimind.checkpoint import save_checkpoint
    from minimind.config import ModelConfig
    from minimind.data.loader import make_loader
    from minimind.data.prepare import prepare
    from minimind.interop.export import export_hf
    from minimind.model import MiniMindForCausalLM

    docs = ["The quick brown fox jumps over the lazy dog.", "你好，世界。这是一个测试。",
            "cp - copy files and directories"]
    src = tmp_path / "val.jsonl"
    src.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    prepared = prepare("pretrain", src, tokenizer_dir, tmp_path / "prep", workers=1, progress=False, doc_format=fmt)
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", kernels="torch")).eval()
    batch = next(make_loader(prepared, stage="pretrain", batch_size=3, seq_len=64, packed=False))
    if fmt == "eos":  # our eos documents have no start token: the scorer gives them the previous one's end
        eot = int(batch.targets[0, int(batch.weights[0].sum()) - 1])  # a document's last target
        ids = torch.cat([torch.full((3, 1), eot), batch.input_ids], 1)
        targets = torch.cat([batch.input_ids[:, :1], batch.targets], 1)
        weights = torch.cat([torch.ones(3, 1), batch.weights], 1)
    else:
        ids, targets, weights = batch.input_ids, batch.targets, batch.weights
    with torch.no_grad():
        logits = model(ids).logits
    ours = (torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
            * weights).sum().item()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer_dir=tokenizer_dir)
    hf = export_hf(ckpt, tmp_path / "hf")
    got = realtext.score_model(hf, docs, fmt)
    assert got["tokens"] == int(weights.sum())
    assert got["nats_per_token"] * got["tokens"] == pytest.approx(ours, rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(ours / math.log(2) / sum(len(d.encode()) for d in docs), rel=1e-4)
