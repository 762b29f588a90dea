"""Data commands refuse to destroy their inputs or earlier outputs, and fail with one named line on bad input.

Each test drives the `minimind` entry point in this process: exit code 2, a message naming the path or
flag, and files left as they were.
"""

import json
import shutil

import pytest
import torch

from minimind.checkpoint import save_checkpoint
from minimind.cli import main, train_main
from minimind.config import ModelConfig
from minimind.data.tokenizer import TokenizerError, bounded_pieces, load_tokenizer
from minimind.model import MiniMindForCausalLM


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --- synth and tokenizer: a non-empty --out needs --force -----------------------------------------------

def test_synth_refuses_a_non_empty_out_without_force(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "pretrain.jsonl").write_text('{"text": "my own data"}\n')
    assert main(["synth", "--out", str(out), "--scale", "0.01"]) == 2
    err = _err(capsys)
    assert str(out) in err and "--force" in err
    assert (out / "pretrain.jsonl").read_text() == '{"text": "my own data"}\n'
    assert main(["synth", "--out", str(out), "--scale", "0.01", "--force"]) == 0
    assert (out / "pretrain.jsonl").read_text() != '{"text": "my own data"}\n'


def test_tokenizer_refuses_to_replace_a_tokenizer_without_force(synth_dir, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, out)
    before = (out / "tokenizer.json").read_bytes()
    args = ["tokenizer", "--input", str(synth_dir / "sft.jsonl"), "--vocab-size", "300", "--out", str(out)]
    assert main(args) == 2
    err = _err(capsys)
    assert str(out) in err and "--force" in err
    assert (out / "tokenizer.json").read_bytes() == before
    assert main([*args, "--force"]) == 0
    assert len(load_tokenizer(out)) == 300


def test_tokenizer_refuses_a_non_empty_out(synth_dir, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["tokenizer", "--input", str(synth_dir / "sft.jsonl"), "--vocab-size", "300", "--out", str(out)]) == 2
    assert "--force" in _err(capsys) and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# --- export: --out never overlaps the checkpoint it reads ----------------------------------------------------

@pytest.fixture
def run_dir(tokenizer_dir, tmp_path):
    """A run directory with one checkpoint (step-30) that has trainer state, as training leaves it."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", kernels="torch"))
    ckpt = save_checkpoint(tmp_path / "run" / "step-30", model, tokenizer_dir=tokenizer_dir)
    (ckpt / "trainer_state").mkdir(exist_ok=True)
    (ckpt / "trainer_state" / "state.json").write_text("{}")
    return tmp_path / "run"


@pytest.mark.parametrize("ckpt_arg, out_arg", [
    ("run/step-30", "run/step-30"),  # the attack: the checkpoint itself, with --force
    ("run/step-30", "run/step-30/../step-30"),
    ("run", "run/step-30"),  # the run dir's newest checkpoint
    ("run/step-30", "run"),  # an ancestor: replacing it deletes the checkpoint
    ("run/step-30", "run/step-30/hf"),  # inside the checkpoint
    ("run", "run/hf"),  # inside the --ckpt run dir
])
def test_export_out_never_overlaps_the_checkpoint(run_dir, ckpt_arg, out_arg, capsys):
    root = run_dir.parent
    files = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert main(["export", "--ckpt", str(root / ckpt_arg), "--out", str(root / out_arg), "--force"]) == 2
    err = _err(capsys)
    assert "--out" in err and str(root / out_arg) in err and err.count("\n") == 1
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == files


def test_export_beside_the_checkpoint_still_works(run_dir, tmp_path):
    assert main(["export", "--ckpt", str(run_dir / "step-30"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert (run_dir / "step-30" / "trainer_state" / "state.json").is_file()


# --- prepare: --out never is or holds the input -----------------------------------------------------------

def test_prepare_out_equal_to_input_is_refused(synth_dir, tokenizer_dir, tmp_path, capsys):
    data = tmp_path / "pretrain.jsonl"
    shutil.copy(synth_dir / "pretrain.jsonl", data)
    before = data.read_bytes()
    assert main(["prepare", "--stage", "pretrain", "--input", str(data), "--tokenizer", str(tokenizer_dir),
                 "--out", str(data), "--workers", "1"]) == 2
    err = _err(capsys)
    assert f"--out {data}" in err and "--input" in err
    assert data.read_bytes() == before


def test_prepare_out_holding_the_input_is_refused(synth_dir, tokenizer_dir, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    tok = str(tokenizer_dir)
    assert main(["prepare", "--stage", "pretrain", "--input", str(synth_dir / "pretrain.jsonl"), "--tokenizer", tok,
                 "--out", str(prepared), "--workers", "1"]) == 0
    data = prepared / "more.jsonl"  # an input kept inside an earlier prepared dir: replacing the dir deletes it
    shutil.copy(synth_dir / "pretrain.jsonl", data)
    assert main(["prepare", "--stage", "pretrain", "--input", str(data), "--tokenizer", tok,
                 "--out", str(prepared), "--workers", "1"]) == 2
    assert "contains --input" in _err(capsys) and data.is_file()


# --- tokenizer: empty input and broken tokenizer files ------------------------------------------------------

@pytest.mark.parametrize("content", ["", "\n\n", '{"id": 1}\n'])
def test_tokenizer_on_empty_input_is_an_error(tmp_path, capsys, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    out = tmp_path / "tok"
    assert main(["tokenizer", "--input", str(empty), "--out", str(out)]) == 2
    assert str(empty) in _err(capsys)
    assert not out.exists()


@pytest.fixture(params=["truncated", "empty object", "not json"])
def broken_tokenizer(request, tokenizer_dir, tmp_path):
    out = tmp_path / "broken"
    shutil.copytree(tokenizer_dir, out)
    good = (tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8")
    text = {"truncated": good[: len(good) // 2], "empty object": "{}", "not json": "hello"}[request.param]
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    return out


def test_load_tokenizer_names_a_broken_tokenizer_json(broken_tokenizer):
    with pytest.raises(TokenizerError, match=rf"^{broken_tokenizer / 'tokenizer.json'}: not a valid tokenizer: "):
        load_tokenizer(broken_tokenizer)


def test_prepare_names_a_broken_tokenizer_json(broken_tokenizer, synth_dir, tmp_path, capsys):
    assert main(["prepare", "--stage", "sft", "--input", str(synth_dir / "sft.jsonl"), "--tokenizer",
                 str(broken_tokenizer), "--out", str(tmp_path / "prepared"), "--workers", "1"]) == 2
    err = _err(capsys)
    assert f"{broken_tokenizer / 'tokenizer.json'}: not a valid tokenizer: " in err and err.count("\n") == 1


def test_train_names_a_broken_tokenizer_json(broken_tokenizer, synth_dir, tmp_path, capsys):
    rc = train_main(["--stage", "pretrain", "--model", "tiny", "--data", str(synth_dir / "pretrain.jsonl"),
                     "--tokenizer", str(broken_tokenizer), "--out", str(tmp_path / "run"), "--max-steps", "1",
                     "--device", "cpu"])
    assert rc == 2
    assert f"{broken_tokenizer / 'tokenizer.json'}: not a valid tokenizer: " in _err(capsys)


# --- tokenizer: a very long line trains in time linear in its length ------------------------------------------

@pytest.mark.parametrize("text", ["", "short", "a" * 5000, "word " * 3000, "a\nb " * 2000 + "x" * 3000])
def test_bounded_pieces_are_short_and_add_up(text):
    pieces = list(bounded_pieces(text, max_len=1000))
    assert "".join(pieces) == text
    assert all(len(p) <= 1000 for p in pieces)
    assert all(p for p in pieces) or pieces == [""]
    if " " in text:  # cut before a space, where the pre-tokenizer starts a word anyway
        assert all(p.startswith((" ", "\n")) for p in pieces[1:] if not p.startswith("x"))


def test_tokenizer_trains_on_one_multi_megabyte_line(tmp_path, capsys):
    # one 3M-character line: hung before pieces were bounded (200k characters took 26 s, 1M over 200 s); now < 1 s
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": "a" * 3_000_000}) + "\n" + json.dumps({"text": "hello world"}) + "\n")
    assert main(["tokenizer", "--input", str(data), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.decode(tok.encode("a" * 5000)) == "a" * 5000
