"""Nothing a command writes replaces one of its inputs or what a user kept (issue 25, item 1).

Each test drives the `minimind` entry point in this process on real files, as the red team did on e630cdd:
an output that is, holds or sits inside an input (the checkpoint, its LoRA base, its tokenizer, the data) is
exit 2 with a message naming the flag and the path, and the input stays byte for byte; an existing output
needs `--force`, and `--force` replaces only what the command writes.
"""

import json
import shutil
from pathlib import Path

import pytest

from minimind.checkpoint import atomic_dir, load_checkpoint, save_checkpoint, write_adapter
from minimind.cli import main
from minimind.config import ModelConfig
from minimind.lora import apply_lora
from minimind.model import MiniMindForCausalLM


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def _snapshot(root: Path) -> dict:
    """Every file under root (or root itself) -> its bytes."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path) -> Path:
    """A copy of the tiny checkpoint (with its tokenizer), so a test that fails on old code harms only its own."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": f"the number {i} comes after {i - 1}."}) + "\n" for i in range(1, 6)))
    return path


@pytest.fixture
def questions(tmp_path) -> Path:
    path = tmp_path / "questions.jsonl"
    rows = [{"conversations": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)}
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def choice_csv(tmp_path) -> Path:
    path = tmp_path / "algebra_val.csv"
    path.write_text("id,question,A,B,C,D,answer\n0,1+1=?,1,2,3,4,B\n1,2+2=?,4,3,2,1,A\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------- eval --report
def _eval(kind: str, ckpt: Path, data: Path, report: Path, *extra) -> list[str]:
    flags = {"ppl": ["--data", str(data), "--seq-len", "16"], "choice": ["--data", str(data)],
             "answers": ["--data", str(data), "--max-new-tokens", "2", "--device", "cpu"]}[kind]
    return ["eval", kind, "--ckpt", str(ckpt), *flags, "--report", str(report), *extra]


@pytest.mark.parametrize("kind", ["ppl", "answers", "choice"])
@pytest.mark.parametrize("target", ["weights", "data", "config via ..", "tokenizer"])
def test_eval_report_never_replaces_an_input(kind, target, ckpt, text, questions, choice_csv, capsys):
    data = {"ppl": text, "answers": questions, "choice": choice_csv}[kind]
    report = {"weights": ckpt / "model.safetensors", "data": data, "tokenizer": ckpt / "tokenizer.json",
              "config via ..": ckpt / ".." / "ckpt" / "config.json"}[target]
    before = {**_snapshot(ckpt), **_snapshot(data)}
    assert main(_eval(kind, ckpt, data, report, "--force")) == 2  # not even with --force
    err = _err(capsys)
    assert f"--report {report}" in err and err.count("\n") == 1, err
    assert {**_snapshot(ckpt), **_snapshot(data)} == before


def test_eval_report_never_replaces_a_run_dirs_checkpoint(ckpt, text, capsys):
    run = ckpt.parent / "run"
    run.mkdir()
    ckpt.rename(run / "step-4")
    before = _snapshot(run)
    assert main(_eval("ppl", run, text, run / "step-4" / "model.safetensors")) == 2
    assert "--report" in _err(capsys) and _snapshot(run) == before


def test_eval_report_through_a_symlink_to_the_data_is_refused(ckpt, questions, tmp_path, capsys):
    link = tmp_path / "report.json"
    link.symlink_to(questions)
    before = _snapshot(questions)
    assert main(_eval("answers", ckpt, questions, link, "--force")) == 2
    assert f"--report {link}" in _err(capsys) and _snapshot(questions) == before


@pytest.fixture
def lora_ckpt(tokenizer_dir, tmp_path) -> Path:
    """A LoRA checkpoint whose base (with the tokenizer) is elsewhere: eval reads both."""
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", kernels="torch"))
    base = save_checkpoint(tmp_path / "base", model, tokenizer_dir=tokenizer_dir)
    apply_lora(model, rank=2, alpha=4.0, targets=("q_proj",))
    return atomic_dir(tmp_path / "adapter", lambda tmp: write_adapter(tmp, model, base, ("q_proj",), rank=2, alpha=4.0,
                                                                      dropout=0.0))


def test_eval_report_never_replaces_a_lora_base(lora_ckpt, text, tmp_path, capsys):
    base = tmp_path / "base"
    before = _snapshot(base)
    for victim in (base / "model.safetensors", base / "tokenizer.json"):
        assert main(_eval("ppl", lora_ckpt, text, victim, "--force")) == 2
        err = _err(capsys)
        assert f"--report {victim}" in err and "base checkpoint of --ckpt" in err, err
    assert _snapshot(base) == before


def test_eval_report_replaces_an_existing_file_only_with_force(ckpt, text, tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text("my notes\n")
    assert main(_eval("ppl", ckpt, text, report)) == 2
    err = _err(capsys)
    assert f"--report {report}" in err and "--force" in err
    assert report.read_text() == "my notes\n"
    assert main(_eval("ppl", ckpt, text, report, "--force")) == 0
    assert json.loads(report.read_text())["documents"] == 5


def test_eval_report_that_is_a_directory_is_named(ckpt, text, tmp_path, capsys):
    (tmp_path / "reports").mkdir()
    assert main(_eval("ppl", ckpt, text, tmp_path / "reports")) == 2
    assert f"--report {tmp_path / 'reports'}: is a directory" in _err(capsys)


def test_lm_eval_report_never_replaces_the_checkpoint(ckpt, capsys):
    pytest.importorskip("lm_eval")
    before = _snapshot(ckpt)
    assert main(["eval", "lm-eval", "--ckpt", str(ckpt), "--tasks", "none", "--report",
                 str(ckpt / "model.safetensors"), "--force"]) == 2
    assert f"--report {ckpt / 'model.safetensors'}" in _err(capsys) and _snapshot(ckpt) == before


# --------------------------------------------------------------------- import
@pytest.fixture
def hf_dir(ckpt, tmp_path) -> Path:
    from minimind.interop.export import export_hf

    return export_hf(ckpt, tmp_path / "hf")


@pytest.mark.parametrize("where", ["itself", "inside", "tokenizer"])
def test_import_never_replaces_its_input_even_with_force(hf_dir, tokenizer_dir, where, capsys):
    out = {"itself": hf_dir, "inside": hf_dir / "ours", "tokenizer": tokenizer_dir}[where]
    before = {**_snapshot(hf_dir), **_snapshot(tokenizer_dir)}
    assert main(["import", "--from", "hf", str(hf_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--force"]) == 2
    err = _err(capsys)
    assert f"--out {out}" in err and err.count("\n") == 1, err
    assert {**_snapshot(hf_dir), **_snapshot(tokenizer_dir)} == before


def test_import_force_replaces_its_checkpoint_but_keeps_a_users_files(hf_dir, tmp_path, capsys):
    out = tmp_path / "imported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors").write_bytes(b"an older import")
    assert main(["import", "--from", "hf", str(hf_dir), "--out", str(out)]) == 2
    assert "--force" in _err(capsys) and (out / "model.safetensors").read_bytes() == b"an older import"
    assert main(["import", "--from", "hf", str(hf_dir), "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    load_checkpoint(out)  # the import itself is whole


# --------------------------------------------------------------------- export
def test_export_force_keeps_files_export_did_not_write(ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    (out / "README.md").write_text("my model card")
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"stale")
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--force"]) == 0
    assert (out / "README.md").read_text() == "my model card" and (out / "eval" / "scores.json").read_text() == "{}"
    assert (out / "model.safetensors").read_bytes() != b"stale"


def test_export_out_equal_to_the_tokenizer_of_a_lora_base_is_refused(lora_ckpt, tmp_path, capsys):
    before = _snapshot(tmp_path / "base")
    assert main(["export", "--ckpt", str(lora_ckpt), "--out", str(tmp_path / "base"), "--force"]) == 2
    assert "base checkpoint of --ckpt" in _err(capsys) and _snapshot(tmp_path / "base") == before


# --------------------------------------------------------------------- prepare
def _prepare(synth_dir, tokenizer_dir, out, *extra, input=None) -> list[str]:
    return ["prepare", "--stage", "sft", "--input", str(input or synth_dir / "sft.jsonl"), "--tokenizer",
            str(tokenizer_dir), "--out", str(out), "--workers", "1", "--max-seq-len", "64", *extra]


def test_prepare_replaces_prepared_data_only_with_force(synth_dir, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(_prepare(synth_dir, tokenizer_dir, out)) == 0
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    half = tmp_path / "half.jsonl"
    half.write_text("".join((synth_dir / "sft.jsonl").read_text().splitlines(keepends=True)[:20]))
    assert main(_prepare(synth_dir, tokenizer_dir, out, input=half)) == 2
    err = _err(capsys)
    assert f"--out {out}" in err and "--force" in err
    assert _snapshot(out) == before
    assert main(_prepare(synth_dir, tokenizer_dir, out, "--force", input=half)) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == str(half.resolve()) and meta["counts"]["lines"] == 20
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["inside the input file", "inside the tokenizer"])
def test_prepare_out_inside_an_input_is_named(synth_dir, tokenizer_dir, tmp_path, where, capsys):
    data = tmp_path / "sft.jsonl"
    shutil.copy(synth_dir / "sft.jsonl", data)
    out = data / "sub" if where == "inside the input file" else tokenizer_dir / "prepared"
    before = {**_snapshot(data), **_snapshot(tokenizer_dir)}
    assert main(_prepare(synth_dir, tokenizer_dir, out, "--force", input=data)) == 2
    err = _err(capsys)
    assert f"--out {out}: is inside" in err, err
    assert {**_snapshot(data), **_snapshot(tokenizer_dir)} == before and not out.exists()


# --------------------------------------------------------------------- the helper itself
def test_check_output_compares_resolved_paths(tmp_path):
    from minimind.outputs import OutputError, check_output

    data = tmp_path / "d" / "x.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    (tmp_path / "link").symlink_to(tmp_path / "d")
    for out in (tmp_path / "link" / "x.jsonl", tmp_path / "d" / ".." / "d" / "x.jsonl"):
        with pytest.raises(OutputError, match=f"--report {out}: is --data {data}"):
            check_output(out, flag="--report", inputs=[("--data", data)], force=True)
    with pytest.raises(OutputError, match="contains --data"):
        check_output(tmp_path / "link", flag="--out", inputs=[("--data", data)], force=True, directory=True)
    check_output(tmp_path / "new.json", flag="--report", inputs=[("--data", data)])  # apart and new: fine


# --------------------------------------------------------------------- tokenizer and train
def test_tokenizer_out_holding_its_input_is_refused_even_with_force(synth_dir, tmp_path, capsys):
    data = tmp_path / "corpus"
    data.mkdir()
    shutil.copy(synth_dir / "sft.jsonl", data / "tokenizer.json")  # a name the tokenizer writes
    before = _snapshot(data)
    assert main(["tokenizer", "--input", str(data / "tokenizer.json"), "--vocab-size", "300", "--out", str(data),
                 "--force"]) == 2
    assert f"--out {data}: contains --input" in _err(capsys) and _snapshot(data) == before


def test_train_out_inside_the_init_checkpoint_is_refused(ckpt, synth_dir, capsys):
    from tests.test_train import train_inproc

    before = _snapshot(ckpt)
    rc, err = train_inproc("--stage", "sft", "--init", ckpt, "--data", synth_dir / "sft.jsonl", "--max-steps", 1,
                           "--batch-size", 2, "--seq-len", 32, "--device", "cpu", "--out", ckpt / "sft")
    assert rc == 2 and f"--out {ckpt / 'sft'}: is inside --init {ckpt}" in err, err[-2000:]
    assert _snapshot(ckpt) == before and not (ckpt / "sft").exists() and not (ckpt / ".minimind-cache").exists()
