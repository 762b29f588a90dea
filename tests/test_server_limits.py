"""The server's request limits and logprobs under abuse (issue 26), over real HTTP on 127.0.0.1: every count
limit is a 400 naming the limit and its param; `logprobs: 20` gives 20 entries on every token even where many
tokens decode to the same text (byte-level BPE pieces of a UTF-8 character), with their true bytes; and
`minimind eval --device cuda` without CUDA is a usage error naming --device."""

import contextlib
import io
import os
import subprocess
import sys

import httpx
import openai
import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from infer.engine import Engine
from infer.protocol import MAX_PROMPTS, MAX_SEQUENCES, MAX_STOPS
from infer.sampling import MAX_TOP_LOGPROBS
from infer.server import ServerThread, create_app
from infer.tokens import token_table
from minimind.cli import build_parser, main
from minimind.data.tokenizer import load_tokenizer
from tests.conftest import ROOT
from tests.test_server import MSGS, wide_checkpoint

# a prompt the tokenizer splits into byte pieces: the emoji and the rare ideographs are not in its vocabulary
PROMPT = "Hello 🙂 鑫 world, 刘杰住在哪个地方"


@pytest.fixture(scope="module")
def wide_ckpt(tokenizer_dir, tmp_path_factory):
    return wide_checkpoint(tmp_path_factory.mktemp("wide") / "run" / "step-3", tokenizer_dir)


@pytest.fixture(scope="module")
def url(wide_ckpt):
    """One server for the module: no test here changes it."""
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=8, max_len=128)
    with ServerThread(create_app(engine, model_name="tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def true_bytes(wide_ckpt) -> list[bytes]:
    """Each id's bytes, from transformers' own GPT-2 byte map (not infer.tokens's)."""
    tok = load_tokenizer(wide_ckpt)
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values()}
    return [t.encode() if t in special else bytes(byte_of[c] for c in t)
            for t in tok.convert_ids_to_tokens(list(range(len(tok))))]


def _post(url, path, body) -> httpx.Response:
    return httpx.post(url + path, json={"model": "tiny", **body}, timeout=60)


def _error(url, path, body) -> dict:
    resp = _post(url, path, body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Value error" not in err["message"], err
    return err


# ---- request limits ----

LIMITS = [  # (name, path, body, param, words the message must hold)
    ("stop 1,000 strings", "/v1/chat/completions", {"messages": MSGS, "stop": ["x"] * 1000}, "stop",
     ["1000 strings", f"at most {MAX_STOPS}"]),
    ("stop 17 strings", "/v1/completions", {"prompt": "hi", "stop": ["x"] * 17}, "stop",
     ["17 strings", f"at most {MAX_STOPS}"]),
    ("n 17", "/v1/chat/completions", {"messages": MSGS, "n": 17}, "n", ["16"]),
    ("top_logprobs 21", "/v1/chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": 21},
     "top_logprobs", [str(MAX_TOP_LOGPROBS)]),
    ("logprobs 21", "/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", [str(MAX_TOP_LOGPROBS)]),
    ("65 prompts", "/v1/completions", {"prompt": ["hi"] * 65}, "prompt", ["65 prompts", f"at most {MAX_PROMPTS}"]),
    ("1,000 token-id prompts", "/v1/completions", {"prompt": [[5]] * 1000}, "prompt",
     ["1000 prompts", f"at most {MAX_PROMPTS}"]),
    ("8 prompts x n 9", "/v1/completions", {"prompt": ["hi"] * 8, "n": 9}, "prompt",
     ["8 prompts", "n=9", "72 sequences", f"at most {MAX_SEQUENCES}"]),
]


@pytest.mark.parametrize("name,path,body,param,words", LIMITS, ids=[c[0] for c in LIMITS])
def test_each_limit_is_a_400_naming_it(url, name, path, body, param, words):
    err = _error(url, path, body)
    assert err["param"] == param and err["code"] == "invalid_value", err
    assert all(w in err["message"] for w in words), err["message"]
    assert err["message"].startswith(f"{param}: "), err["message"]


def test_limits_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, stop=["x"] * 1000)
    assert e.value.body["message"] == "stop: 1000 strings; at most 16 per request"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=["hi"] * 5, n=16, max_tokens=1)
    assert e.value.body["param"] == "prompt" and "80 sequences; at most 64" in e.value.body["message"]


def test_at_the_limits_is_served(client):
    """16 stop strings, and 4 prompts x n 16 = 64 sequences; a long token-id prompt is one prompt."""
    r = client.completions.create(model="tiny", prompt=["a", "b", "c", "d"], n=16, max_tokens=1,
                                  stop=[f"s{i}" for i in range(MAX_STOPS)])
    assert sorted(c.index for c in r.choices) == list(range(MAX_SEQUENCES))
    r = client.completions.create(model="tiny", prompt=[5] * 100, n=16, max_tokens=1)
    assert len(r.choices) == 16


UNIONS = [  # a field that takes several shapes: the error names the field, and what is wrong in the shape sent
    ("stop a number", "/v1/chat/completions", {"messages": MSGS, "stop": 5}, "stop"),
    ("stop with a number", "/v1/chat/completions", {"messages": MSGS, "stop": ["a", 5]}, "stop.1"),
    ("content a number", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
     "messages.0.content"),
    ("content part not text", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "messages.0.content.0.type"),
    ("prompt a number", "/v1/completions", {"prompt": 5}, "prompt"),
    ("prompt empty", "/v1/completions", {"prompt": []}, "prompt"),
    ("prompt strings and a number", "/v1/completions", {"prompt": ["a", 5]}, "prompt.1"),
    ("prompt id lists and a string", "/v1/completions", {"prompt": [[1], ["a"]]}, "prompt.1.0"),
    ("stream_options a number", "/v1/completions", {"prompt": "hi", "stream_options": 5}, "stream_options"),
]


@pytest.mark.parametrize("name,path,body,param", UNIONS, ids=[c[0] for c in UNIONS])
def test_union_fields_errors_name_the_field(url, name, path, body, param):
    err = _error(url, path, body)
    assert err["param"] == param and err["message"].startswith(f"{param}: "), err
    if name == "prompt empty":
        assert "at least 1 item" in err["message"], err


# ---- logprobs: one entry per token id ----

def _assert_twenty_distinct(top_logprobs: list[dict]) -> None:
    sizes = [len(d) for d in top_logprobs]
    assert sizes == [MAX_TOP_LOGPROBS] * len(sizes), sizes


def _bytes_of(spelled: str) -> bytes:
    """The bytes a logprobs token string stands for: OpenAI's "bytes:\\xNN..." or UTF-8 text."""
    if spelled.startswith("bytes:"):
        return bytes(int(h, 16) for h in spelled.removeprefix("bytes:").split("\\x")[1:])
    return spelled.encode()


def test_completion_logprobs_20_on_every_token_with_echo(client, wide_ckpt, true_bytes):
    ids = load_tokenizer(wide_ckpt).encode(PROMPT)
    assert any(_invalid(true_bytes[i]) for i in ids), "the prompt must hold partial-character tokens"
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, echo=True, logprobs=20, temperature=0,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.top_logprobs[0] is None and len(lp.tokens) == len(ids) + 8
    _assert_twenty_distinct(lp.top_logprobs[1:])
    assert [_bytes_of(t) for t in lp.tokens[: len(ids)]] == [true_bytes[i] for i in ids]
    assert all(t in d and lp.token_logprobs[i + len(ids)] == max(d.values())  # greedy: the top entry is chosen
               for i, (t, d) in enumerate(zip(lp.tokens[len(ids):], lp.top_logprobs[len(ids):])))
    assert all(set(map(_bytes_of, d)) <= set(true_bytes) for d in lp.top_logprobs[1:])
    # offsets count the text's characters: the emoji's four byte tokens start where it does, and count once
    want = [len(b"".join(true_bytes[t] for t in ids[:i]).decode("utf-8", errors="ignore")) for i in range(len(ids))]
    assert lp.text_offset[: len(ids)] == want
    assert r.choices[0].text.startswith(PROMPT) and lp.text_offset[len(ids)] == len(PROMPT)


def test_completion_logprobs_20_on_every_token_sampled_and_streamed(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=24, logprobs=20, temperature=1.0, seed=3,
              extra_body={"ignore_eos": True})
    lp = client.completions.create(**kw).choices[0].logprobs
    assert len(lp.tokens) == 24
    _assert_twenty_distinct(lp.top_logprobs)
    streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw) if c.choices]
    assert sum(len(s.tokens) for s in streamed) == 24
    _assert_twenty_distinct([d for s in streamed for d in s.top_logprobs])
    assert [t for s in streamed for t in s.tokens] == lp.tokens  # the same seed: the same tokens


def test_chat_top_logprobs_20_with_true_bytes(client, true_bytes):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=24,
                                       temperature=1.0, seed=5, logprobs=True, top_logprobs=20,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 24
    entries = [*content, *(t for e in content for t in e.top_logprobs)]
    assert all(len(e.top_logprobs) == 20 and len({bytes(t.bytes) for t in e.top_logprobs}) == 20 for e in content)
    assert all(bytes(e.bytes) == _bytes_of(e.token) and bytes(e.bytes) in true_bytes for e in entries)
    assert any(_invalid(bytes(e.bytes)) for e in entries), "no partial-character token came up: test nothing"


def _invalid(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_token_table_spells_as_openai_and_keys_are_unique(wide_ckpt, true_bytes):
    tok = load_tokenizer(wide_ckpt)
    table = token_table(tok)
    assert token_table(tok) is table  # built once per tokenizer
    assert list(table.raw) == true_bytes and len(set(table.key)) == len(table.key)
    for i, raw in enumerate(true_bytes):
        want = "bytes:" + "".join(f"\\x{b:02x}" for b in raw) if _invalid(raw) else tok.decode([i])
        assert table.text[i] == want
    assert table.text[tok.convert_tokens_to_ids("<|im_end|>")] == "<|im_end|>"


def test_token_table_keeps_one_key_per_id_when_texts_collide(wide_ckpt, monkeypatch):
    """No stock vocabulary has two ids with the same bytes; a tokenizer with a duplicate added token would."""
    tok = load_tokenizer(wide_ckpt)
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    tokens[10] = tokens[9]
    monkeypatch.setattr(type(tok), "convert_ids_to_tokens", lambda self, ids: tokens)
    table = token_table.__wrapped__(tok)
    assert table.text[10] == table.text[9] == table.key[9] and table.key[10] == "token_id:10"


# ---- eval --device ----

def test_eval_device_cuda_without_cuda_is_a_usage_error(tiny_ckpt, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("hello world\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA here even on a GPU machine
    proc = subprocess.run([sys.executable, "-m", "minimind.cli", "eval", "ppl", "--ckpt", str(tiny_ckpt), "--data",
                           str(data), "--device", "cuda"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "argument --device: cuda: no CUDA device is available" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["choice", "ppl", "lm-eval", "answers"])
def test_every_eval_checks_its_device(tiny_ckpt, tmp_path, monkeypatch, command):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    need = {"choice": ["--data", str(tmp_path)], "ppl": ["--data", str(tmp_path)], "lm-eval": ["--tasks", "x"],
            "answers": ["--data", str(tmp_path)]}[command]
    for device, words in (("cuda", "no CUDA device is available"), ("tpu", "expected cpu, cuda or cuda:N")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
            main(["eval", command, "--ckpt", str(tiny_ckpt), *need, "--device", device])
        assert e.value.code == 2, err.getvalue()
        assert "argument --device: " in err.getvalue() and words in err.getvalue(), err.getvalue()
    args = build_parser().parse_args(["eval", command, "--ckpt", str(tiny_ckpt), *need])
    assert args.device == "auto"
