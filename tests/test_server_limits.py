"""The server's request limits under abuse (issue 26), over real HTTP on 127.0.0.1: every count limit is a
400 naming the limit and its param, and a field that takes several shapes names what is wrong in the one sent."""

import httpx
import openai
import pytest

from infer.engine import Engine
from infer.protocol import MAX_PROMPTS, MAX_SEQUENCES, MAX_STOPS
from infer.sampling import MAX_TOP_LOGPROBS
from infer.server import ServerThread, create_app
from tests.test_server import MSGS, wide_checkpoint


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
