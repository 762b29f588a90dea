"""`minimind serve` from a checkpoint on a device, asked through the official `openai` client: one chat
completion whole and the same one streamed (greedy, so both must give the same text), then a plain
completion. Part of bench/gpu_stages.sh; exit 0 when all three answered and agree.

    python bench/serve_check.py CKPT DEVICE
"""

import os
import socket
import subprocess
import sys
import time

import httpx
from openai import OpenAI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(ckpt: str, device: str) -> int:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "minimind.cli", "serve", "--ckpt", ckpt, "--device", device,
                               "--port", str(port), "--max-batch", "4"], env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(480):  # two minutes at most: model load, and the first CUDA context
            if server.poll() is not None:
                print(f"the server exited with {server.returncode} before it answered", file=sys.stderr)
                return 1
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        client = OpenAI(base_url=url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": "What is 1 + 1?"}]
        start = time.perf_counter()
        whole = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0)
        took = time.perf_counter() - start
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=messages, max_tokens=32, temperature=0, stream=True) if c.choices)
        plain = client.completions.create(model=model, prompt="1 + 1 =", max_tokens=8, temperature=0)
        text = whole.choices[0].message.content
        print(f"chat: {whole.usage.completion_tokens} tokens in {took:.2f}s: {text!r}")
        print(f"completion: {plain.choices[0].text!r}")
        if text != streamed:
            print(f"streamed text differs from the whole one: {streamed!r}", file=sys.stderr)
            return 1
        return 0 if whole.usage.completion_tokens > 0 and plain.usage.completion_tokens > 0 else 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
