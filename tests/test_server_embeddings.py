"""POST /v1/embeddings through the official `openai` client against the real server: OpenAI's four input
forms, float and base64 encodings, usage, one unit vector per input computed by the engine's prefill,
equal whether batched with other inputs or alone, equal to the pooling written out here, and
OpenAI-shaped 400s for empty inputs, inputs past the context and a wrong `dimensions`."""

import base64
import struct

import httpx
import numpy as np
import openai
import pytest
import torch

from infer.engine import Engine
from infer.sampling import SamplingParams
from infer.server import ServerThread, create_app
from minimind.checkpoint import load_checkpoint
from minimind.data.tokenizer import load_tokenizer
from tests.test_server import wide_checkpoint

TEXTS = ["The capital of Ada's town is north of the river.", "3 plus 4 is 7.", "你好,世界", "3 plus 4 is 7."]


@pytest.fixture(scope="module")
def ckpt(tokenizer_dir, tmp_path_factory):
    return wide_checkpoint(tmp_path_factory.mktemp("embed") / "run" / "step-3", tokenizer_dir)


@pytest.fixture(scope="module")
def server(ckpt):
    engine = Engine.from_checkpoint(ckpt, max_batch=8, max_len=64)
    with ServerThread(create_app(engine, model_name="tiny-test")) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)])


def reference(ckpt, ids: list[int]) -> np.ndarray:
    """The pooling as documented, by hand: the final hidden states (after the last norm) averaged with
    weights 1, 2, ..., n by position, scaled to length 1."""
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), return_hidden=True).hidden[0].double()  # (n, D)
    weights = torch.arange(1, len(ids) + 1, dtype=torch.float64)
    pooled = (weights[:, None] * hidden).sum(0)
    return (pooled / pooled.norm()).numpy()


def test_batched_equals_alone_equals_the_pooling_by_hand(client, ckpt):
    tok = load_tokenizer(ckpt)
    batched = client.embeddings.create(model="tiny-test", input=TEXTS, encoding_format="float")
    assert [d.index for d in batched.data] == [0, 1, 2, 3] and batched.object == "list"
    together = vectors(batched)
    alone = np.stack([vectors(client.embeddings.create(model="tiny-test", input=t, encoding_format="float"))[0]
                      for t in TEXTS])
    assert together.shape == (4, 128)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together[1], together[3], atol=1e-6)  # equal texts, equal vectors
    assert abs(together[0] @ together[1]) < 0.999  # and different texts, different ones
    for text, got in zip(TEXTS, together):
        np.testing.assert_allclose(got, reference(ckpt, tok.encode(text)), atol=1e-5)
    tokens = sum(len(tok.encode(t)) for t in TEXTS)
    assert batched.usage.prompt_tokens == tokens and batched.usage.total_tokens == tokens


def test_base64_and_token_id_inputs_give_the_same_vectors(client, server, ckpt):
    tok = load_tokenizer(ckpt)
    floats = vectors(client.embeddings.create(model="tiny-test", input=TEXTS[:2], encoding_format="float"))
    # the client's default asks for base64 and decodes it itself
    decoded = vectors(client.embeddings.create(model="tiny-test", input=TEXTS[:2]))
    np.testing.assert_allclose(decoded, floats, atol=1e-6)
    raw = httpx.post(server[0] + "/v1/embeddings", json={"model": "tiny-test", "input": TEXTS[0],
                                                          "encoding_format": "base64"}).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert np.allclose(struct.unpack(f"<{len(packed) // 4}f", packed), floats[0], atol=1e-6)
    ids = [tok.encode(t) for t in TEXTS[:2]]
    by_ids = vectors(client.embeddings.create(model="tiny-test", input=ids, encoding_format="float"))
    np.testing.assert_allclose(by_ids, floats, atol=1e-5)
    one = vectors(client.embeddings.create(model="tiny-test", input=ids[0], encoding_format="float"))
    np.testing.assert_allclose(one[0], floats[0], atol=1e-5)


@pytest.mark.parametrize("kwargs, param, code", [
    (dict(input=""), "input", "invalid_value"),
    (dict(input=["fine", ""]), "input", "invalid_value"),
    (dict(input=[]), "input", "invalid_value"),
    (dict(input="word " * 200), None, "context_length_exceeded"),
    (dict(input=[[5] * 65]), None, "context_length_exceeded"),
    (dict(input="hi", dimensions=64), "dimensions", "invalid_value"),
    (dict(input=[[99999]]), None, "invalid_value"),
])
def test_bad_inputs_are_openai_shaped_400s(client, server, kwargs, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny-test", encoding_format="float", **kwargs)
    error = e.value.body
    assert e.value.status_code == 400 and error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    assert httpx.get(server[0] + "/health").status_code == 200  # and the server is still up


def test_embeddings_share_the_engine_with_generation(server):
    """An embedding request admitted in the same step as generating rows: the generation is unchanged
    (greedy, against running alone) and the vector equals its own alone."""
    _, engine = server
    tok = engine.tokenizer
    prompt = tok.encode("3 plus 4 is")
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    embed = SamplingParams(max_new_tokens=0, embed=True)
    alone_text = engine.generate([prompt], greedy)[0].token_ids
    alone_vec = engine.generate([tok.encode(TEXTS[0])], embed)[0].embedding
    mixed = engine.generate([prompt, tok.encode(TEXTS[0])], [greedy, embed])
    assert mixed[0].token_ids == alone_text and mixed[1].token_ids == []
    np.testing.assert_allclose(mixed[1].embedding, alone_vec, atol=1e-5)


def test_embed_needs_max_new_tokens_zero():
    with pytest.raises(ValueError, match="embed"):
        SamplingParams(max_new_tokens=4, embed=True)
