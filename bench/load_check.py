"""A load test of `minimind serve`: CLIENTS clients, each sending one request after another for SECONDS
seconds, a mix of what users send (a streamed chat, a whole chat, a completion of two prompts with
n=2, a health check), through the official `openai` client. Prints one JSON line: requests done,
errors (any exception or non-2xx answer, by kind), output tokens/s, and latency percentiles.

    python bench/load_check.py CKPT [--clients 64] [--seconds 30] [--repo DIR]

`--repo` serves from another checkout (its own `minimind/` and `infer/`), to compare two versions
of the server with one client, taking turns.
"""

import argparse
import asyncio
import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Tell me about the weather today."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one(client: openai.AsyncOpenAI, http: httpx.AsyncClient, url: str, kind: int) -> int:
    """One request of the mix -> output tokens."""
    if kind == 0:
        stream = await client.chat.completions.create(model="load", messages=MESSAGES, max_tokens=32, stream=True,
                                                      stream_options={"include_usage": True})
        tokens = 0
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens
    if kind == 1:
        r = await client.chat.completions.create(model="load", messages=MESSAGES, max_tokens=32)
        return r.usage.completion_tokens
    if kind == 2:
        r = await client.completions.create(model="load", prompt=["Once upon a time", "The capital of"], n=2,
                                            max_tokens=16)
        return r.usage.completion_tokens
    resp = await http.get(url + "/health")
    resp.raise_for_status()
    return 0


async def _client_loop(i: int, url: str, until: float, stats: dict) -> None:
    http = httpx.AsyncClient(timeout=120)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, http_client=http)
    kind = i % 4
    while time.perf_counter() < until:
        t = time.perf_counter()
        try:
            stats["tokens"] += await _one(client, http, url, kind)
            stats["latency"].append(time.perf_counter() - t)
        except Exception as e:
            stats["errors"][type(e).__name__] += 1
        stats["requests"] += 1
        kind = (kind + 1) % 4
    await http.aclose()


async def _load(url: str, clients: int, seconds: float) -> dict:
    stats = {"requests": 0, "tokens": 0, "latency": [], "errors": collections.Counter()}
    start = time.perf_counter()
    await asyncio.gather(*(_client_loop(i, url, start + seconds, stats) for i in range(clients)))
    wall = time.perf_counter() - start
    lat = sorted(stats["latency"]) or [float("nan")]
    return {"clients": clients, "seconds": round(wall, 1), "requests": stats["requests"],
            "errors": sum(stats["errors"].values()), "error_kinds": dict(stats["errors"]),
            "output_tokens_per_s": round(stats["tokens"] / wall, 1),
            "latency_p50_s": round(statistics.median(lat), 3),
            "latency_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--repo", type=Path, default=ROOT)
    args = p.parse_args()
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "minimind.cli", "serve", "--ckpt", args.ckpt, "--port", str(port),
                               "--model-name", "load", "--dtype", "float32", "--max-len", "256"],
                              cwd=args.repo, env={**os.environ, "PYTHONPATH": str(args.repo)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        result = asyncio.run(_load(url, args.clients, args.seconds))
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(json.dumps({"repo": str(args.repo), **result}), flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
