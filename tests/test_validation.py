"""Issue 25, items 2, 3 and 6: every file a command reads is checked where it is read, numbers that make no
sense are usage errors before anything is built, and eval/chat inputs get named errors. Each case drives
the real command line on a real damaged file (a copy of a tiny checkpoint with its config.json edited,
its tokenizer.json cut short, NaN written into its weights, ...) and expects exit 2 with a one-line
message naming the file, field or flag, and no traceback (in-process: an exception would fail the test;
the stdin cases run a real process and look for "Traceback"). Each fails on e630cdd."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

TINY = ["--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--log-every", "1", "--device", "cpu"]


def cli(*args) -> tuple[int, str, str]:
    """-> (exit code, stdout, stderr) of `minimind ARGS`, run in this process."""
    from minimind.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def usage_error(*args) -> str:
    """Runs `minimind ARGS`, expects exit 2 and a one-line message; -> stderr."""
    rc, _, err = cli(*args)
    # what is not argparse's usage block: the one line that says what is wrong
    said = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert rc == 2, f"minimind {' '.join(map(str, args))} -> {rc}: {err}"
    assert "Traceback" not in err and len(said) == 1, err
    return err


def run_proc(*args, stdin: bytes = b"", env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minimind.cli", *map(str, args)], input=stdin, cwd=ROOT,
                          capture_output=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def data(synth_dir, tokenizer_dir, tmp_path_factory):
    """Small prepared pretrain, lora and grpo data (the shared tokenizer)."""
    from minimind.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    lines = (synth_dir / "pretrain.jsonl").read_text().splitlines()
    (out / "pretrain.jsonl").write_text("\n".join(lines[:200]) + "\n")
    return {"pretrain": prepare("pretrain", out / "pretrain.jsonl", tokenizer_dir, out / "pretrain", max_seq_len=64,
                                progress=False),
            "lora": prepare("lora", synth_dir / "lora_identity.jsonl", tokenizer_dir, out / "lora", max_seq_len=64,
                            progress=False),
            "grpo": prepare("grpo", synth_dir / "rlaif.jsonl", tokenizer_dir, out / "grpo", max_seq_len=64,
                            progress=False)}


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A 2-step pretrain run with checkpoints step-1 and step-2; tests copy it before touching it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert cli("train", "--stage", "pretrain", *TINY, "--data", data["pretrain"], "--out", out, "--max-steps", 2,
               "--save-every", 1, "--keep", 5)[0] == 0
    return out


@pytest.fixture(scope="module")
def lora_run(run, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert cli("train", "--stage", "lora", "--init", run, *TINY[2:], "--data", data["lora"], "--out", out,
               "--max-steps", 2, "--lora-rank", 4)[0] == 0
    return out


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def edit_json(file: Path, **changes) -> None:
    obj = json.loads(file.read_text())
    for key, value in changes.items():
        if value is DELETE:
            obj.pop(key)
        else:
            obj[key] = value
    file.write_text(json.dumps(obj))


DELETE = object()


def nan_weights(file: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(file)
    name = sorted(sd)[0]
    sd[name][0] = float("nan")
    save_file(sd, file, metadata={"format": "minimind"})


# --------------------------------------------------------------------- config.json and --set
BAD_CONFIGS = {
    "string layers": ({"num_hidden_layers": "two"}, "num_hidden_layers"),
    "zero width": ({"hidden_size": 0}, "hidden_size"),
    "no kv heads": ({"num_key_value_heads": 0}, "num_key_value_heads"),
    "bool vocab": ({"vocab_size": True}, "vocab_size"),
}


@pytest.fixture(scope="module", params=list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def bad_config(request, tiny_ckpt, tmp_path_factory):
    changes, field = BAD_CONFIGS[request.param]
    ckpt = copy(tiny_ckpt, tmp_path_factory.mktemp("bad") / "ckpt")
    edit_json(ckpt / "config.json", **changes)
    return ckpt, field


@pytest.mark.parametrize("command", ["info", "export", "eval ppl", "chat", "serve", "train --init"])
def test_a_config_json_of_wrong_types_or_sizes_is_named(bad_config, command, data, tmp_path):
    ckpt, field = bad_config
    text = tmp_path / "t.txt"
    text.write_text("some held-out text\n")
    args = {"info": ["info", "--ckpt", ckpt],
            "export": ["export", "--ckpt", ckpt, "--out", tmp_path / "hf"],
            "eval ppl": ["eval", "ppl", "--ckpt", ckpt, "--data", text],
            "chat": ["chat", "--ckpt", ckpt],
            "serve": ["serve", "--ckpt", ckpt, "--port", free_port()],
            "train --init": ["train", "--stage", "pretrain", "--init", ckpt, "--data", data["pretrain"],
                             "--out", tmp_path / "run", "--max-steps", 1]}[command]
    err = usage_error(*args)
    assert "config.json" in err and field in err


@pytest.mark.parametrize("override", ["hidden_size=0", "num_hidden_layers=-1", "num_attention_heads=0",
                                      "num_key_value_heads=0", "vocab_size=-5", "rms_norm_eps=0"])
def test_info_refuses_sizes_that_make_no_sense(override):
    err = usage_error("info", "--model", "tiny", "--set", override)
    assert override.split("=")[0] in err


@pytest.mark.parametrize("override", ["hidden_size=0", "num_attention_heads=0", "num_key_value_heads=0"])
def test_train_refuses_sizes_that_make_no_sense(override, data, tmp_path):
    err = usage_error("train", "--stage", "pretrain", *TINY, "--set", override, "--data", data["pretrain"],
                      "--out", tmp_path / "run", "--max-steps", 1)
    assert override.split("=")[0] in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# --------------------------------------------------------------------- non-finite weights
@pytest.fixture(scope="module")
def nan_ckpt(tiny_ckpt, tmp_path_factory):
    ckpt = copy(tiny_ckpt, tmp_path_factory.mktemp("nan") / "ckpt")
    nan_weights(ckpt / "model.safetensors")
    return ckpt


@pytest.fixture
def questions(tmp_path):
    file = tmp_path / "q.jsonl"
    file.write_text(json.dumps({"conversations": [{"role": "user", "content": "1+1"}], "answer": "2"}) + "\n")
    return file


@pytest.mark.parametrize("command", ["export", "eval ppl", "eval answers", "chat", "serve"])
def test_a_nan_checkpoint_is_refused_unless_allowed(nan_ckpt, command, questions, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some held-out text\n")
    args = {"export": ["export", "--ckpt", nan_ckpt, "--out", tmp_path / "hf"],
            "eval ppl": ["eval", "ppl", "--ckpt", nan_ckpt, "--data", text],
            "eval answers": ["eval", "answers", "--ckpt", nan_ckpt, "--data", questions],
            "chat": ["chat", "--ckpt", nan_ckpt],
            "serve": ["serve", "--ckpt", nan_ckpt, "--port", free_port()]}[command]
    err = usage_error(*args)
    assert "model.safetensors" in err and "NaN" in err and "--allow-nonfinite" in err
    assert not (tmp_path / "hf").exists()


def test_export_and_eval_ppl_take_a_nan_checkpoint_with_allow_nonfinite(nan_ckpt, tmp_path):
    rc, _, err = cli("export", "--ckpt", nan_ckpt, "--out", tmp_path / "hf", "--allow-nonfinite")
    assert rc == 0 and (tmp_path / "hf" / "config.json").exists(), err
    text = tmp_path / "t.txt"
    text.write_text("some held-out text\n")
    rc, out, err = cli("eval", "ppl", "--ckpt", nan_ckpt, "--data", text, "--allow-nonfinite",
                       "--report", tmp_path / "r.json")
    assert rc == 0, err

    def no_constants(name):
        raise AssertionError(f"the report holds a bare {name}, which is not JSON")

    for doc in (out, (tmp_path / "r.json").read_text()):
        report = json.loads(doc, parse_constant=no_constants)
        assert report["perplexity"] is None and report["nll_per_token"] is None


def test_train_init_from_a_nan_checkpoint_is_named(nan_ckpt, data, tmp_path):
    err = usage_error("train", "--stage", "sft", "--init", nan_ckpt, "--data", data["lora"], "--out", tmp_path / "r",
                      "--max-steps", 1, "--batch-size", "2", "--seq-len", "32")
    assert "model.safetensors" in err and "NaN" in err


def test_resume_from_a_nan_checkpoint_is_named(run, data, tmp_path):
    out = copy(run, tmp_path / "run")
    nan_weights(out / "step-2" / "model.safetensors")
    err = usage_error("train", "--stage", "pretrain", *TINY, "--data", data["pretrain"], "--out", out, "--resume",
                      "--max-steps", 3)
    assert "step-2/model.safetensors" in err and "NaN" in err


def test_the_last_good_checkpoint_named_after_divergence_is_finite(run, tmp_path):
    from minimind.checkpointer import last_good

    out = copy(run, tmp_path / "run")
    nan_weights(out / "step-2" / "model.safetensors")
    said = last_good(out)
    assert said == f"The last good checkpoint is {out / 'step-1'}.", said
    nan_weights(out / "step-1" / "model.safetensors")
    assert "No checkpoint" in last_good(out)


# --------------------------------------------------------------------- tokenizer files
@pytest.fixture(scope="module")
def cut_tokenizer(tiny_ckpt, tmp_path_factory):
    ckpt = copy(tiny_ckpt, tmp_path_factory.mktemp("cut") / "ckpt")
    raw = (ckpt / "tokenizer.json").read_bytes()
    (ckpt / "tokenizer.json").write_bytes(raw[: len(raw) // 2])
    return ckpt


@pytest.mark.parametrize("command", ["eval ppl", "eval answers", "chat", "serve"])
def test_a_truncated_tokenizer_json_is_named(cut_tokenizer, command, questions, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some held-out text\n")
    args = {"eval ppl": ["eval", "ppl", "--ckpt", cut_tokenizer, "--data", text],
            "eval answers": ["eval", "answers", "--ckpt", cut_tokenizer, "--data", questions],
            "chat": ["chat", "--ckpt", cut_tokenizer],
            "serve": ["serve", "--ckpt", cut_tokenizer, "--port", free_port()]}[command]
    assert "tokenizer.json" in usage_error(*args)


# --------------------------------------------------------------------- trainer state, run.json, adapters, meta
@pytest.mark.parametrize("change, field", [({"step": DELETE}, "'step'"), ({"step": "two"}, "'step'"),
                                           ({"tokens_seen": -1}, "'tokens_seen'"), ({"data": [1]}, "'data'"),
                                           ({"world_size": 0}, "'world_size'")])
def test_a_broken_state_json_is_named_on_resume(run, data, change, field, tmp_path):
    out = copy(run, tmp_path / "run")
    edit_json(out / "step-2" / "trainer_state" / "state.json", **change)
    err = usage_error("train", "--stage", "pretrain", *TINY, "--data", data["pretrain"], "--out", out, "--resume",
                      "--max-steps", 3)
    assert "state.json" in err and field in err


def test_a_broken_run_json_is_named_on_resume(run, data, tmp_path):
    out = copy(run, tmp_path / "run")
    edit_json(out / "run.json", overrides="hidden_size=64")
    err = usage_error("train", "--stage", "pretrain", "--data", data["pretrain"], "--out", out, "--resume",
                      "--max-steps", 3)
    assert "run.json" in err and "'overrides'" in err


def test_a_lora_run_resumes_from_its_run_json_without_init(lora_run, data, tmp_path):
    """run.json records --init; a resume rebuilds the model from it (e630cdd: "'model' ... missing")."""
    out = copy(lora_run, tmp_path / "lora")
    rc, _, err = cli("train", "--stage", "lora", "--data", data["lora"], "--out", out, "--resume", "--max-steps", 3,
                     "--batch-size", "2", "--seq-len", "32", "--lora-rank", 4)
    assert rc == 0, err
    assert (out / "step-3" / "adapter.safetensors").exists()


def test_a_truncated_adapter_is_named_on_resume(lora_run, run, data, tmp_path):
    out = copy(lora_run, tmp_path / "lora")
    file = out / "step-2" / "adapter.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    err = usage_error("train", "--stage", "lora", "--init", run, "--data", data["lora"], "--out", out, "--resume",
                      "--max-steps", 3, "--batch-size", "2", "--seq-len", "32", "--lora-rank", 4)
    assert "adapter.safetensors" in err


@pytest.mark.parametrize("change, field", [({"rank": "8"}, "'rank'"), ({"alpha": None}, "'alpha'"),
                                           ({"targets": "q_proj"}, "'targets'"), ({"rank": 100000}, "rank")])
def test_a_broken_adapter_config_is_named_in_export(lora_run, change, field, tmp_path):
    out = copy(lora_run, tmp_path / "lora")
    edit_json(out / "step-2" / "adapter_config.json", **change)
    err = usage_error("export", "--ckpt", out, "--out", tmp_path / "hf")
    assert "adapter_config.json" in err and field in err


@pytest.mark.parametrize("change, field", [({"num_tokens": "many"}, "num_tokens"), ({"files": DELETE}, "files"),
                                           ({"token_dtype": "float64"}, "token_dtype"),
                                           ({"weight_values": [0, 1, float("nan")]}, "weight_values")])
def test_a_broken_meta_json_is_named(data, change, field, tmp_path):
    prepared = copy(data["pretrain"], tmp_path / "prepared")
    edit_json(prepared / "meta.json", **change)
    err = usage_error("train", "--stage", "pretrain", *TINY, "--data", prepared, "--out", tmp_path / "run",
                      "--max-steps", 1)
    assert "meta.json" in err and field in err


# --------------------------------------------------------------------- numbers that make no sense
def test_min_lr_above_lr_is_a_usage_error(data, tmp_path):
    err = usage_error("train", "--stage", "pretrain", *TINY, "--data", data["pretrain"], "--out", tmp_path / "r",
                      "--max-steps", 1, "--min-lr", "0.5", "--lr", "0.001")
    assert "--min-lr" in err and "--lr" in err


@pytest.mark.parametrize("weight", ["-5", "nan", "inf"])
def test_prepare_refuses_a_tag_weight_that_is_negative_or_not_finite(synth_dir, tokenizer_dir, weight, tmp_path):
    err = usage_error("prepare", "--stage", "reason", "--input", synth_dir / "reason.jsonl", "--tokenizer",
                      tokenizer_dir, "--out", tmp_path / "p", "--tag-weight", weight)
    assert "--tag-weight" in err and not (tmp_path / "p").exists()


def test_a_lora_rank_above_the_matrices_is_a_usage_error(run, data, tmp_path):
    err = usage_error("train", "--stage", "lora", "--init", run, *TINY[2:], "--data", data["lora"],
                      "--out", tmp_path / "r", "--max-steps", 1, "--lora-rank", 100000)
    assert "--lora-rank" in err and "100000" in err


def test_muon_on_lora_is_a_usage_error_naming_it(run, data, tmp_path):
    err = usage_error("train", "--stage", "lora", "--init", run, *TINY[2:], "--data", data["lora"],
                      "--out", tmp_path / "r", "--max-steps", 1, "--optim", "muon")
    assert "--optim muon" in err and "empty parameter list" not in err


@pytest.mark.parametrize("flags, named", [(["--group-size", 1], "--group-size"),
                                          (["--max-new-tokens", 100000], "--max-new-tokens")])
def test_grpo_numbers_that_cannot_work_are_usage_errors(run, data, flags, named, tmp_path):
    err = usage_error("train", "--stage", "grpo", "--init", run, "--data", data["grpo"], "--out", tmp_path / "r",
                      "--max-steps", 1, "--batch-size", 2, *flags)
    assert named in err


def test_sft_from_a_lora_checkpoint_trains_the_merged_model(lora_run, data, tmp_path):
    rc, _, err = cli("train", "--stage", "sft", "--init", lora_run, *TINY[2:], "--data", data["lora"],
                     "--out", tmp_path / "sft", "--max-steps", 2)
    assert rc == 0, err
    from minimind.checkpoint import load_checkpoint

    merged, _ = load_checkpoint(lora_run)
    trained, _ = load_checkpoint(tmp_path / "sft")
    assert type(trained.model.layers[0].self_attn.q_proj).__name__ != "LoRALinear"
    assert (tmp_path / "sft" / "step-2" / "config.json").exists()
    assert merged.config.to_dict() == trained.config.to_dict()


def test_a_wrong_device_is_named_as_the_device(tiny_ckpt):
    err = usage_error("chat", "--ckpt", tiny_ckpt, "--device", "tpu")
    assert "--device" in err and "tpu" in err and "corrupt" not in err


def test_auto_dtype_works_on_a_model_with_a_short_context(tiny_ckpt, tmp_path):
    """--dtype auto timed decode steps in a 64-token cache, past a 32-token context (e630cdd: "max_len 64
    exceeds the model's context 32", while float32 worked)."""
    from infer.engine import Engine

    ckpt = copy(tiny_ckpt, tmp_path / "ckpt")
    edit_json(ckpt / "config.json", max_position_embeddings=32)
    engine = Engine.from_checkpoint(ckpt, dtype="auto", max_batch=2)
    assert engine.max_len == 32 and engine.dtype_report.startswith("dtype:")
    out = run_proc("chat", "--ckpt", ckpt, "--max-new-tokens", 4, stdin=b"hi\n")
    assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr.decode()


# --------------------------------------------------------------------- eval and chat inputs
@pytest.mark.parametrize("line, named", [
    ({"conversations": [{"content": "1+1"}], "answer": "2"}, ":2: conversations[0].role"),
    ({"conversations": [{"role": "robot", "content": "1+1"}], "answer": "2"}, ":2: conversations[0].role"),
    ({"conversations": [{"role": "user", "content": "word " * 20000}], "answer": "2"}, ":2: the prompt has"),
])
def test_eval_answers_names_the_line_of_a_bad_question(tiny_ckpt, line, named, tmp_path):
    file = tmp_path / "q.jsonl"
    ok = {"conversations": [{"role": "user", "content": "1+1"}], "answer": "2"}
    file.write_text(json.dumps(ok) + "\n" + json.dumps(line) + "\n")
    err = usage_error("eval", "answers", "--ckpt", tiny_ckpt, "--data", file)
    assert f"{file}{named}" in err


def test_eval_answers_names_max_new_tokens_past_the_context(tiny_ckpt, questions):
    err = usage_error("eval", "answers", "--ckpt", tiny_ckpt, "--data", questions, "--max-new-tokens", 5000)
    assert "--max-new-tokens 5000" in err


@pytest.mark.parametrize("command", ["ppl", "answers"])
@pytest.mark.parametrize("flag", ["--data", "--report"])
def test_eval_names_a_directory_given_as_a_file(tiny_ckpt, command, flag, questions, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some held-out text\n")
    data = questions if command == "answers" else text
    if flag == "--data":
        err = usage_error("eval", command, "--ckpt", tiny_ckpt, "--data", tmp_path)
    else:
        err = usage_error("eval", command, "--ckpt", tiny_ckpt, "--data", data, "--report", tmp_path)
    assert f"{flag} {tmp_path}" in err and "directory" in err


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_chat_names_non_utf8_input(tiny_ckpt, locale):
    import os

    env = {**os.environ, "LC_ALL": locale, "PYTHONUTF8": "0"}
    out = run_proc("chat", "--ckpt", tiny_ckpt, "--dtype", "float32", stdin=b"hello \xff\xfe there\n", env=env)
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 2 and "Traceback" not in err, err
    assert "stdin line 1" in err and "UTF-8" in err


def test_engine_loading_keeps_the_tokenizer_lenient_about_a_missing_chat_template(tiny_ckpt, tmp_path):
    """The engine needs no chat template for completions (a base model's tokenizer may have none)."""
    from infer.engine import Engine

    ckpt = copy(tiny_ckpt, tmp_path / "ckpt")
    edit_json(ckpt / "tokenizer_config.json", chat_template=DELETE)
    assert Engine.from_checkpoint(ckpt, dtype="float32", max_batch=1).max_len > 0
