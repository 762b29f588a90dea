"""The OpenAI-compatible server, driven over real HTTP on 127.0.0.1 by the official `openai` client:
every endpoint, streaming and not, n, stop, seed, max_tokens, usage, logprobs with echo, reasoning
split, each kind of bad request with its status and error shape, the queue bound, 32 concurrent
streams against the same prompts run one at a time, and `minimind serve` shutting down on SIGTERM."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from infer.engine import Engine
from infer.sampling import SamplingParams
from infer.server import ServerThread, create_app
from infer.tokens import token_table
from minimind.checkpoint import load_checkpoint, save_checkpoint
from minimind.config import ModelConfig
from minimind.data.tokenizer import load_tokenizer
from minimind.model import MiniMindForCausalLM
from tests.conftest import ROOT, free_port

SCRIPT = "<think>hm</think>Hi there!"  # what the scripted model answers to any chat


def wide_checkpoint(out, tokenizer_dir):
    """An untrained tiny checkpoint whose greedy output depends on its whole prompt: untied, wide
    embeddings and projections (with the standard init it mostly repeats its last token)."""
    torch.manual_seed(7)
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", ["tie_word_embeddings=false"], kernels="torch"))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 0.3)
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0.0, 0.2)
    return save_checkpoint(out, model, tokenizer_dir=tokenizer_dir)


def scripted_checkpoint(out, tokenizer_dir, reply: str = SCRIPT):
    """A tiny checkpoint that answers every chat with `reply` (greedy or sampled): with the attention
    and MLP outputs zeroed, the logits depend on the current token only, and lm_head maps each token
    of the chain (generation prompt's last token, reply tokens..., end) to the next one."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt_end = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                         add_generation_prompt=True)
    chain = tok.encode(prompt_end)[-1:] + tok.encode(reply) + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain)) == len(chain), "the scripted reply must not repeat a token"
    torch.manual_seed(3)
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", ["tie_word_embeddings=false"], kernels="torch"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.zero_()
        for cur, nxt in zip(chain, chain[1:]):
            model.lm_head.weight[nxt] += 5.0 * emb[cur] / emb[cur].norm()
    return save_checkpoint(out, model, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def wide_ckpt(tokenizer_dir, tmp_path_factory):
    return wide_checkpoint(tmp_path_factory.mktemp("wide") / "run" / "step-3", tokenizer_dir)


@pytest.fixture(scope="module")
def server(wide_ckpt):
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=32, max_len=128)
    with ServerThread(create_app(engine, model_name="tiny-test")) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tok(wide_ckpt):
    return load_tokenizer(wide_ckpt)  # not AutoTokenizer on a checkpoint dir: it parses our config.json


MSGS = [{"role": "user", "content": "Hello, who are you?"}]


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-test"]
    assert client.models.retrieve("tiny-test").id == "tiny-test"
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_chat_non_streaming_usage_and_length(client, tok, wide_ckpt):
    r = client.chat.completions.create(model="tiny-test", messages=MSGS, max_tokens=7, temperature=0)
    assert r.object == "chat.completion" and r.id and r.created and r.model == "tiny-test"
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    prompt = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    reference = Engine.from_checkpoint(wide_ckpt, max_batch=1, max_len=128)
    ids = reference.encode_chat(MSGS)
    want = reference.generate([ids], SamplingParams(max_new_tokens=7, temperature=0))[0]
    assert choice.message.content == want.text and want.finish_reason == "length"


def test_chat_streaming_matches_non_streaming(client):
    r = client.chat.completions.create(model="tiny-test", messages=MSGS, max_tokens=9, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-test", messages=MSGS, max_tokens=9, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_raw_sse_ends_with_done(server):
    body = {"model": "tiny-test", "messages": MSGS, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_n_seed_and_stop(client):
    kw = dict(model="tiny-test", messages=MSGS, max_tokens=12, temperature=1.0)
    a = client.chat.completions.create(n=2, seed=42, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert a.choices[0].message.content != a.choices[1].message.content
    assert a.usage.completion_tokens == 24
    b = client.chat.completions.create(n=2, seed=42, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    c = client.chat.completions.create(seed=1000, **kw)
    assert c.choices[0].message.content not in [x.message.content for x in a.choices]
    full = a.choices[0].message.content
    stop = full[5:8]
    assert stop.strip()
    s = client.chat.completions.create(n=1, seed=42, stop=[stop, "never-there"], **kw)
    assert s.choices[0].finish_reason == "stop" and s.choices[0].message.content == full[: full.index(stop)]
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        n=1, seed=42, stop=stop, stream=True, **kw) if ch.choices)
    assert streamed == s.choices[0].message.content


def test_completions_text_and_token_prompts(client, tok):
    r = client.completions.create(model="tiny-test", prompt="The capital of", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode("The capital of")) and r.usage.completion_tokens == 5
    ids = tok.encode("The capital of")
    r2 = client.completions.create(model="tiny-test", prompt=ids, max_tokens=5, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    batch = client.completions.create(model="tiny-test", prompt=["The capital of", "Once"], max_tokens=5,
                                      temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == r.choices[0].text
    streamed = list(client.completions.create(model="tiny-test", prompt="The capital of", max_tokens=5,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_completion_echo_logprobs_equal_the_model(client, tok, wide_ckpt):
    """What lm-eval's local-completions asks for: echo + logprobs, max_tokens 0 and 1."""
    model, _ = load_checkpoint(wide_ckpt)
    prompt = "Paris is the capital of France"
    ids = tok.encode(prompt)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :, : len(tok)].log_softmax(-1)
    for max_tokens in (0, 1):
        r = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=max_tokens, echo=True,
                                      logprobs=1, temperature=0)
        lp = r.choices[0].logprobs
        assert r.choices[0].text.startswith(prompt)
        assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None
        want = [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
        keys = token_table(tok).key  # a token as OpenAI spells it (bytes:\xNN for a partial character)
        greedy = [keys[int(logp[t - 1].argmax())] for t in range(1, len(ids))]
        assert [next(iter(d)) for d in lp.top_logprobs[1 : len(ids)]] == greedy
        assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
        assert r.usage.completion_tokens == max_tokens


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny-test", messages=MSGS, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in content)  # greedy = top-1


@pytest.fixture(scope="module")
def scripted_server(tokenizer_dir, tmp_path_factory):
    ckpt = scripted_checkpoint(tmp_path_factory.mktemp("scripted") / "scripted", tokenizer_dir)
    engine = Engine.from_checkpoint(ckpt, max_batch=4, max_len=64)
    with ServerThread(create_app(engine, model_name="scripted", api_key="sekret")) as url:
        yield url


def test_reasoning_content_is_split_out(scripted_server):
    c = openai.OpenAI(base_url=scripted_server + "/v1", api_key="sekret", max_retries=0)
    r = c.chat.completions.create(model="scripted", messages=MSGS, max_tokens=20)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"  # the script ends with <|im_end|>
    assert msg.content == "Hi there!" and msg.model_extra["reasoning_content"] == "hm"
    chunks = list(c.chat.completions.create(model="scripted", messages=MSGS, max_tokens=20, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks]
    assert "".join(d.content or "" for d in deltas) == "Hi there!"
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "hm"


def test_api_key(scripted_server):
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        resp = httpx.get(scripted_server + "/v1/models", headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=scripted_server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401
    assert httpx.get(scripted_server + "/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200


BAD = [
    ("missing messages", {"model": "tiny-test"}, 400, "messages"),
    ("empty messages", {"model": "tiny-test", "messages": []}, 400, "messages"),
    ("messages not a list", {"model": "tiny-test", "messages": "hi"}, 400, "messages"),
    ("bad role", {"model": "tiny-test", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("temperature a string", {"model": "tiny-test", "messages": MSGS, "temperature": "hot"}, 400, "temperature"),
    ("max_tokens a string", {"model": "tiny-test", "messages": MSGS, "max_tokens": "10"}, 400, "max_tokens"),
    ("negative max_tokens", {"model": "tiny-test", "messages": MSGS, "max_tokens": -1}, 400, "max_tokens"),
    ("huge max_tokens", {"model": "tiny-test", "messages": MSGS, "max_tokens": 10**9}, 400, None),
    ("n too large", {"model": "tiny-test", "messages": MSGS, "n": 1000}, 400, "n"),
    ("top_p zero", {"model": "tiny-test", "messages": MSGS, "top_p": 0}, 400, "top_p"),
    ("unknown model", {"model": "gpt-9", "messages": MSGS}, 404, "model"),
    ("prompt over the context", {"model": "tiny-test", "messages": [{"role": "user", "content": "word " * 400}]},
     400, None),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests(server, name, body, status, param):
    resp = httpx.post(server[0] + "/v1/chat/completions", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if name in ("huge max_tokens", "prompt over the context"):
        assert err["code"] == "context_length_exceeded" and "context is 128 tokens" in err["message"]


def test_bad_requests_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-test", messages=MSGS, max_tokens=-5)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSGS)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-test", prompt=[10**6], max_tokens=1)
    assert "token ids" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-test", prompt="x " * 200, max_tokens=1)


def test_malformed_json_oversized_body_and_unknown_route(server):
    for payload in (b"{not json", b"", b"[1, 2]"):
        resp = httpx.post(server[0] + "/v1/completions", content=payload,
                          headers={"content-type": "application/json"})
        assert resp.status_code == 400 and "error" in resp.json(), payload
    resp = httpx.post(server[0] + "/v1/completions", content=b"x" * (5 * 1024 * 1024))
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"
    resp = httpx.get(server[0] + "/v1/nothing-here")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    assert httpx.get(server[0] + "/v1/chat/completions").status_code == 405


def test_queue_full_is_429(wide_ckpt):
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=1, max_len=128)
    with ServerThread(create_app(engine, model_name="q", max_queue=1)) as url:
        async def one(c, i):
            try:
                await c.completions.create(model="q", prompt=f"prompt {i}", max_tokens=60)
                return 200
            except openai.RateLimitError as e:
                assert e.body["code"] == "queue_full"
                return 429

        async def main():
            c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            return await asyncio.gather(*(one(c, i) for i in range(4)))

        codes = asyncio.run(main())
    assert 429 in codes and 200 in codes


def test_32_concurrent_streams_equal_one_at_a_time(server, client):
    prompts = [f"Question {i}: what is {i} plus {i * 3}?" for i in range(32)]

    def kw(p):
        return dict(model="tiny-test", messages=[{"role": "user", "content": p}], max_tokens=10, temperature=0)

    alone = [client.chat.completions.create(**kw(p)).choices[0].message.content for p in prompts]
    assert len(set(alone)) > 16  # outputs really depend on the prompt

    async def stream(c, p):
        text, reasons = "", []
        async for ch in await c.chat.completions.create(stream=True, **kw(p)):
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                reasons += [ch.choices[0].finish_reason] if ch.choices[0].finish_reason else []
        return text, reasons

    async def main():
        c = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0,
                               http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64)))
        return await asyncio.gather(*(stream(c, p) for p in prompts))

    together = asyncio.run(main())
    assert [t for t, _ in together] == alone
    assert all(r == ["length"] for _, r in together)
    assert server[1].running == [] and not server[1].waiting


def test_minimind_serve_cli_and_sigterm(wide_ckpt):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "minimind.cli", "serve", "--ckpt", str(wide_ckpt.parent), "--port", str(port),
         "--max-len", "64"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = wait_healthy(port)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["run"]  # DIR/step-N serves as DIR's name
        assert c.completions.create(model="run", prompt="hi", max_tokens=3).usage.completion_tokens == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "minimind serve: stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_missing_checkpoint_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "minimind.cli", "serve", "--ckpt", str(tmp_path / "nope")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "nope" in out.stderr


def wait_healthy(port: int, tries: int = 240) -> str:
    """Polls a starting `minimind serve` until /health answers 200 (a minute at most). -> its URL."""
    url = f"http://127.0.0.1:{port}"
    for _ in range(tries):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.25)
    return url



@pytest.mark.parametrize("text,reasoning,content", [
    ("<think>\nab c\n</think>\nHi <b>", "ab c", "Hi <b>"),
    ("<think>hm</think>Hi there!", "hm", "Hi there!"),
    ("Hello <thinking> world", None, "Hello <thinking> world"),
    ("<thi", None, "<thi"),
])
def test_think_splitter_in_one_piece_and_one_character_at_a_time(text, reasoning, content):
    from infer.think import ThinkSplitter, split_reasoning

    assert split_reasoning(text) == (reasoning, content)
    splitter, parts = ThinkSplitter(), []
    for i, ch in enumerate(text):
        parts.append(splitter.feed(ch, final=i == len(text) - 1))
    assert "".join(r for r, _ in parts) == (reasoning or "")
    assert "".join(c for _, c in parts) == content
