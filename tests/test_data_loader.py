"""Loaders: batch layouts, packing isolation at model level, deterministic order, exact resume, rank sharding."""

import json

import numpy as np
import pytest
import torch

from minimind.config import ModelConfig
from minimind.data.loader import DataError, PairBatch, PromptBatch, make_loader, open_prepared, pack
from minimind.data.prepare import prepare
from minimind.model import MiniMindForCausalLM


def _prep(tmp_path_factory, synth_dir, tokenizer_dir, stage, file):
    out = tmp_path_factory.mktemp(f"prep-{stage}") / stage
    return prepare(stage, synth_dir / file, tokenizer_dir, out, workers=1, progress=False)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, synth_dir, tokenizer_dir):
    return _prep(tmp_path_factory, synth_dir, tokenizer_dir, "sft", "sft.jsonl")


@pytest.fixture(scope="module")
def small_sft_dir(tmp_path_factory, tokenizer_dir):
    """60 short chats, each with a distinct number, so a row's documents can be identified."""
    src = tmp_path_factory.mktemp("small") / "sft.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for i in range(60):
            chat = [{"role": "user", "content": f"Say {i}" + " ok" * (i % 7)}, {"role": "assistant", "content": f"{i}"}]
            f.write(json.dumps({"conversations": chat}) + "\n")
    return prepare("sft", src, tokenizer_dir, src.parent / "prep", workers=1, progress=False)


def _doc_ids(data):
    return [data.tokens[data.offsets[d]:data.offsets[d + 1]].tolist() for d in range(data.num_docs)]


def _segments(batch):
    """Each row split into its documents (position_ids restart at 0), padding dropped; as token lists."""
    out = []
    for ids, pos in zip(batch.input_ids.tolist(), batch.position_ids.tolist()):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            if ids[a] != 0:  # padding is a run of <|endoftext|>
                out.append(ids[a:b])
    return out


def _same(a, b):
    if isinstance(a, PromptBatch):
        return a == b
    if isinstance(a, PairBatch):
        return _same(a.chosen, b.chosen) and _same(a.rejected, b.rejected)
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


def test_packed_rows_hold_whole_documents_with_shifted_targets(sft_dir):
    data = open_prepared(sft_dir)
    docs = {tuple(d) for d in _doc_ids(data)}
    batch = next(make_loader(sft_dir, stage="sft", batch_size=4, seq_len=256))
    assert batch.input_ids.dtype == batch.targets.dtype == batch.position_ids.dtype == torch.int64
    assert batch.weights.dtype == torch.float32 and batch.input_ids.shape == (4, 256)
    segs = _segments(batch)
    assert len(segs) > 8 and all(tuple(s) in docs for s in segs)  # several conversations per row, each whole
    ids, tgt, w, pos = batch.input_ids, batch.targets, batch.weights, batch.position_ids
    same_doc = pos[:, 1:] == pos[:, :-1] + 1
    assert torch.equal(tgt[:, :-1][w[:, :-1] > 0], ids[:, 1:][w[:, :-1] > 0])  # next token of the same document
    assert not (w[:, :-1] > 0)[~same_doc].any()  # never a target across a document boundary
    assert torch.equal(w == 0, tgt == -100)
    assert set(w.unique().tolist()) == {0.0, 1.0}


def test_padded_layout_is_one_sample_per_row(sft_dir):
    data = open_prepared(sft_dir)
    docs = {tuple(d) for d in _doc_ids(data)}
    batch = next(make_loader(sft_dir, stage="sft", batch_size=4, seq_len=256, packed=False))
    assert batch.position_ids is None
    for row, tgt in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        n = next((i for i, t in enumerate(row) if t == 0), len(row))
        assert tuple(row[:n]) in docs and set(row[n:]) <= {0} and set(tgt[n - 1:]) == {-100}


def test_packing_never_attends_across_documents(sft_dir):
    """Logits of a packed row equal the logits of each of its documents run alone (tiny model)."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", kernels="torch")).eval()
    batch = next(make_loader(sft_dir, stage="sft", batch_size=2, seq_len=192))
    with torch.no_grad():
        packed = model(batch.input_ids, position_ids=batch.position_ids).logits  # (B, T, V)
        n = 0
        for r in range(2):
            pos = batch.position_ids[r].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:]):
                alone = model(batch.input_ids[r:r + 1, a:b]).logits[0]
                torch.testing.assert_close(packed[r, a:b], alone, rtol=1e-5, atol=1e-5)
                n += 1
    assert n >= 4


def test_pretrain_windows_are_contiguous(tmp_path_factory, synth_dir, tokenizer_dir):
    out = _prep(tmp_path_factory, synth_dir, tokenizer_dir, "pretrain", "pretrain.jsonl")
    data = open_prepared(out)
    loader = make_loader(out, stage="pretrain", batch_size=3, seq_len=64)
    assert loader.rows_per_epoch == (data.meta["num_tokens"] - 1) // 64
    batch = next(loader)
    assert batch.position_ids is None
    assert torch.equal(batch.weights, (batch.targets != data.meta["doc_start_id"]).float())  # no next-document start
    stream = np.asarray(data.tokens).astype(np.int64)
    for x, y in zip(batch.input_ids.numpy(), batch.targets.numpy()):
        start = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(stream, 64)[::64] == x, axis=1))
        assert len(start) >= 1
        i = start[0] * 64
        assert (y == stream[i + 1:i + 65]).all()
    assert (stream == data.meta["eos_id"]).sum() == data.num_docs  # each document ends with the end token


def test_reason_tag_weights(tmp_path_factory, synth_dir, tokenizer_dir):
    out = _prep(tmp_path_factory, synth_dir, tokenizer_dir, "reason", "reason.jsonl")
    batch = next(make_loader(out, stage="reason", batch_size=2, seq_len=256))
    tags = set(range(3, 7))  # <think> </think> <answer> </answer> in our tokenizer
    tagged = batch.weights == 10.0
    assert tagged.any() and set(batch.targets[tagged].tolist()) <= tags
    assert not (batch.weights == 1.0)[torch.isin(batch.targets, torch.tensor(sorted(tags)))].any()


def test_dpo_and_grpo_batches(tmp_path_factory, synth_dir, tokenizer_dir):
    dpo = _prep(tmp_path_factory, synth_dir, tokenizer_dir, "dpo", "dpo.jsonl")
    pair = next(make_loader(dpo, stage="dpo", batch_size=3, seq_len=128))
    assert isinstance(pair, PairBatch) and pair.chosen.position_ids is None
    for c, r, wc, wr in zip(pair.chosen.input_ids, pair.rejected.input_ids, pair.chosen.weights, pair.rejected.weights):
        pc, pr = int((wc > 0).nonzero()[0]), int((wr > 0).nonzero()[0])
        assert pc == pr and torch.equal(c[:pc + 1], r[:pr + 1])  # shared prompt; weights start on the response
    grpo = _prep(tmp_path_factory, synth_dir, tokenizer_dir, "grpo", "rlaif.jsonl")
    prompts = next(make_loader(grpo, stage="grpo", batch_size=4, seq_len=128))
    assert isinstance(prompts, PromptBatch) and len(prompts.prompt_ids) == len(prompts.answers) == 4
    assert all(isinstance(a, str) and a for a in prompts.answers)
    with pytest.raises(DataError, match="cannot use"):
        make_loader(grpo, stage="sft", batch_size=2, seq_len=64)


def test_deterministic_and_epochs_reshuffled(small_sft_dir):
    a = make_loader(small_sft_dir, stage="sft", batch_size=2, seq_len=64, seed=5, packed=False)
    b = make_loader(small_sft_dir, stage="sft", batch_size=2, seq_len=64, seed=5, packed=False)
    c = make_loader(small_sft_dir, stage="sft", batch_size=2, seq_len=64, seed=6, packed=False)
    xs, ys, zs = ([next(x) for _ in range(60)] for x in (a, b, c))
    assert all(_same(x, y) for x, y in zip(xs, ys))
    assert not all(_same(x, z) for x, z in zip(xs, zs))
    assert a.epoch == 2.0 and len(a) == 30
    first, second = (torch.cat([x.input_ids for x in xs[k:k + 30]]) for k in (0, 30))
    assert not torch.equal(first, second)  # epoch 1 has another order ...
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, second.tolist()))  # ... of the same rows


@pytest.mark.parametrize("packed", [True, False])
def test_resume_yields_exactly_the_next_batches(small_sft_dir, packed):
    kw = dict(stage="sft", batch_size=3, seq_len=48, seed=1, packed=packed)
    straight = make_loader(small_sft_dir, **kw)
    expected = [next(straight) for _ in range(40)]  # several epochs, batches straddling epoch ends
    for k in (0, 7, 19):
        first = make_loader(small_sft_dir, **kw)
        for _ in range(k):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make_loader(small_sft_dir, **kw)
        resumed.load_state_dict(state)
        assert resumed.epoch == first.epoch
        assert all(_same(next(resumed), want) for want in expected[k:k + 12])
    with pytest.raises(DataError, match="seed"):
        make_loader(small_sft_dir, **{**kw, "seed": 2}).load_state_dict(state)


def test_ranks_share_global_batches_and_resume_across_world_sizes(small_sft_dir, tokenizer_dir):
    kw = dict(stage="sft", seq_len=48, seed=3, packed=True)
    one = make_loader(small_sft_dir, batch_size=4, **kw)
    ranks = [make_loader(small_sft_dir, batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    rows_per_epoch = one.rows_per_epoch
    seen = []
    for _ in range(rows_per_epoch // 4 + 2):
        whole, halves = next(one), [next(r) for r in ranks]
        assert torch.equal(whole.input_ids, torch.cat([h.input_ids for h in halves]))
        assert torch.equal(whole.position_ids, torch.cat([h.position_ids for h in halves]))
        seen.extend(_segments(halves[0]) + _segments(halves[1]))
    data = open_prepared(small_sft_dir)
    epoch_docs = sorted(map(tuple, _segments_of_rows(one, rows_per_epoch)))
    assert epoch_docs == sorted(map(tuple, _doc_ids(data)))  # every document exactly once per epoch
    state = ranks[1].state_dict()
    assert state == ranks[0].state_dict()
    single = make_loader(small_sft_dir, batch_size=4, **kw)
    single.load_state_dict(state)
    assert _same(next(single), next(one))  # a run resumed with another world size continues in place


def _segments_of_rows(loader, n):
    """The documents of the first n rows of the loader's epoch 0 (a fresh loader with its settings)."""
    fresh = make_loader(loader.data, stage=loader.stage, batch_size=1, seq_len=loader.seq_len, seed=loader.seed)
    return [s for _ in range(n) for s in _segments(next(fresh))]


def test_pack_fills_rows_and_keeps_every_document():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=3000).tolist()
    rows = pack(lengths, rng.permutation(3000), capacity=512)
    docs = np.concatenate(rows)
    assert sorted(docs.tolist()) == list(range(3000))
    assert all(sum(lengths[d] for d in r) <= 512 for r in rows)
    assert sum(lengths) / (len(rows) * 512) > 0.97


def test_bad_arguments(small_sft_dir, tmp_path):
    with pytest.raises(DataError, match="rank"):
        make_loader(small_sft_dir, stage="sft", batch_size=2, seq_len=32, rank=2, world_size=2)
    with pytest.raises(DataError, match="not prepared data"):
        make_loader(tmp_path, stage="sft", batch_size=2, seq_len=32)


def _token_losses(model, batch, r: int, a: int, b: int, alone: bool):
    """Weighted next-token losses of row r's tokens a..b-1: in the row as batched, or run alone."""
    ids = batch.input_ids[r:r + 1, a:b]
    pos = None if alone or batch.position_ids is None else batch.position_ids[r:r + 1]
    logits = model(ids if alone else batch.input_ids[r:r + 1], position_ids=pos).logits[0]
    logits = logits if alone else logits[a:b]
    nll = torch.nn.functional.cross_entropy(logits, batch.targets[r, a:b].clamp_min(0), reduction="none")
    return nll * batch.weights[r, a:b]


def test_document_positions_restart_after_each_separator():
    from minimind.data.loader import document_positions

    ids = np.array([[5, 0, 7, 8, 0, 0, 9], [0, 1, 2, 3, 4, 5, 6]])
    assert document_positions(ids, 0).tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("doc_mask", [True, False])
def test_document_masked_pretrain_gives_each_document_its_unpacked_loss(tmp_path_factory, synth_dir, tokenizer_dir,
                                                                        doc_mask):
    """Packing with document masks: the loss of every document in a pretrain window equals its loss run
    alone, token for token. Without the mask (`doc_mask=False`) the later documents see the earlier
    ones, and the losses differ: the check can fail."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", kernels="torch")).eval()
    out = _prep(tmp_path_factory, synth_dir, tokenizer_dir, "pretrain", "pretrain.jsonl")
    batch = next(make_loader(out, stage="pretrain", batch_size=2, seq_len=128, doc_mask=doc_mask))
    sep = open_prepared(out).meta["eos_id"]
    same = differ = 0
    with torch.no_grad():
        for r in range(2):
            ids = batch.input_ids[r].tolist()
            starts = [0] + [i + 1 for i, t in enumerate(ids[:-1]) if t == sep] + [len(ids)]
            for a, b in zip(starts[1:], starts[2:]):  # the documents that begin inside the window
                packed, alone = _token_losses(model, batch, r, a, b, False), _token_losses(model, batch, r, a, b, True)
                if torch.allclose(packed, alone, rtol=1e-5, atol=1e-5):
                    same += 1
                else:
                    differ += 1
    if doc_mask:
        assert same >= 2 and differ == 0
    else:
        assert differ >= 2


def test_packed_chat_gives_each_document_its_padded_loss(small_sft_dir):
    """The loss a conversation gets in a packed row equals its loss in MiniMind's padded layout (one
    conversation a row), target for target and weight for weight."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", kernels="torch")).eval()
    padded_loader = make_loader(small_sft_dir, stage="sft", batch_size=60, seq_len=64, packed=False)
    padded = next(padded_loader)
    docs = {tuple(d) for d in _doc_ids(open_prepared(small_sft_dir))}
    by_ids = {}
    with torch.no_grad():
        for r in range(60):
            row = padded.input_ids[r].tolist()
            n = next(len(d) for d in docs if tuple(row[:len(d)]) == d)
            by_ids[tuple(row[:n])] = _token_losses(model, padded, r, 0, n, True)
        packed = next(make_loader(small_sft_dir, stage="sft", batch_size=2, seq_len=64))
        n_docs = 0
        for r in range(2):
            pos = packed.position_ids[r].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:]):
                key = tuple(packed.input_ids[r, a:b].tolist())
                if key in by_ids:  # (the row's tail padding is no document)
                    torch.testing.assert_close(_token_losses(model, packed, r, a, b, False), by_ids[key],
                                               rtol=1e-5, atol=1e-5)
                    n_docs += 1
    assert n_docs >= 4


@pytest.fixture(scope="module")
def minimind_format_dir(tmp_path_factory, synth_dir, tokenizer_dir):
    out = tmp_path_factory.mktemp("prep-mm") / "pretrain"
    return prepare("pretrain", synth_dir / "pretrain.jsonl", tokenizer_dir, out, workers=1, progress=False,
                   doc_format="minimind")


def test_minimind_format_documents_and_padded_rows(minimind_format_dir, tokenizer_dir):
    """`--doc-format minimind`: <|im_start|> text <|im_end|> per document (MiniMind2's PretrainDataset);
    `packed=False` gives one document a row, its first T + 1 tokens, weight 1 on its targets only."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    data = open_prepared(minimind_format_dir)
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert data.meta["doc_start_id"] == start and data.meta["eos_id"] == end and data.meta["doc_format"] == "minimind"
    docs = _doc_ids(data)
    assert all(d[0] == start and d[-1] == end and start not in d[1:] for d in docs)
    loader = make_loader(minimind_format_dir, stage="pretrain", batch_size=4, seq_len=32, packed=False)
    assert loader.rows_per_epoch == data.num_docs
    rows = loader._plan(0)[:4]  # the documents of the first batch, in order
    batch = next(loader)
    assert batch.position_ids is None
    for r, d in enumerate(rows.tolist()):
        n = int(batch.weights[r].sum())
        doc = docs[d][:33]
        assert n == len(doc) - 1
        assert batch.input_ids[r, :n].tolist() == doc[:-1] and batch.targets[r, :n].tolist() == doc[1:]
        assert (batch.targets[r, n:] == -100).all() and (batch.weights[r, n:] == 0).all()


def test_minimind_format_packed_with_doc_masks_gives_each_document_its_padded_loss(minimind_format_dir):
    """Windows over the stream with document masks: every document that starts and ends inside a window
    gets the same weighted losses as in MiniMind2's padded row, because positions restart at each
    <|im_start|> and the target after <|im_end|> (the next document's start) has weight 0. Without the
    masks the later documents see the earlier ones and the losses differ: the check can fail."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", kernels="torch")).eval()
    data = open_prepared(minimind_format_dir)
    start, end = data.meta["doc_start_id"], data.meta["eos_id"]
    for doc_mask in (True, False):
        batch = next(make_loader(minimind_format_dir, stage="pretrain", batch_size=2, seq_len=128, doc_mask=doc_mask))
        assert torch.equal(batch.weights == 0, batch.targets == start)
        same = differ = 0
        with torch.no_grad():
            for r in range(2):
                ids = batch.input_ids[r].tolist()
                starts = [i for i, t in enumerate(ids) if t == start]
                for a in starts:
                    if end not in ids[a:]:
                        continue
                    b = ids.index(end, a) + 1  # the document a..b-1, its last target is the next start
                    padded = make_loader(minimind_format_dir, stage="pretrain", batch_size=1, seq_len=b - a,
                                         packed=False)
                    alone = _token_losses(model, padded.document_batch([_doc_index(data, ids[a:b])]), 0, 0, b - a - 1,
                                          True)
                    packed = _token_losses(model, batch, r, a, b - 1, False)
                    ok = torch.allclose(packed, alone, rtol=1e-5, atol=1e-5) and batch.weights[r, b - 1] == 0
                    same, differ = same + ok, differ + (not ok)
        if doc_mask:
            assert same >= 2 and differ == 0
        else:
            assert differ >= 1


def _doc_index(data, ids: list[int]) -> int:
    return next(d for d in range(data.num_docs) if data.tokens[data.offsets[d]:data.offsets[d + 1]].tolist() == ids)
