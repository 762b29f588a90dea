"""`make demo`: the whole pipeline on built-in synthetic data: 6-11 minutes on 2 CPU cores (BENCHMARKS.md).

synth corpus -> BPE tokenizer -> prepared data -> pretrain -> SFT -> three chat replies from the SFT
model, with each run's loss curve (loss.png) and the command that serves the result.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

DEMO_MODEL = ["--model", "tiny", "--set", "hidden_size=256", "--set", "num_hidden_layers=4",
              "--set", "num_attention_heads=4", "--set", "num_key_value_heads=2"]
QUESTIONS = ("What is 7 + 5?", "你好，请介绍一下你自己。", "Reverse the word: apple")


def _step(title: str):
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def _train(args: list[str]) -> None:
    from minimind.cli import train_main

    rc = train_main([str(a) for a in args])
    if rc != 0:
        raise SystemExit(f"demo: train.py {' '.join(map(str, args))} failed with exit code {rc}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minimind.demo")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--scale", type=float, default=0.5, help="synthetic corpus size")
    p.add_argument("--pretrain-epochs", type=float, default=2.0)
    p.add_argument("--sft-epochs", type=float, default=1.0)
    args = p.parse_args(argv)
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    t_all = time.perf_counter()

    from minimind.data.prepare import prepare
    from minimind.data.synth import write_corpus
    from minimind.data.tokenizer import train_tokenizer

    t = _step("1/6 synthetic corpus (minimind synth)")
    files = write_corpus(out / "data", seed=0, scale=args.scale)
    print(f"wrote {len(files)} files to {out / 'data'} in {time.perf_counter() - t:.1f}s")

    t = _step("2/6 tokenizer (minimind tokenizer)")
    tok = train_tokenizer([files["pretrain"], files["sft"]], vocab_size=6400, out=out / "tokenizer")
    print(f"tokenizer in {tok} ({time.perf_counter() - t:.1f}s)")

    t = _step("3/6 prepare (minimind prepare)")
    pre = prepare("pretrain", files["pretrain"], tok, out / "prepared" / "pretrain")
    sft = prepare("sft", files["sft"], tok, out / "prepared" / "sft", max_seq_len=256)
    print(f"prepared in {time.perf_counter() - t:.1f}s")

    common = ["--seq-len", "256", "--batch-size", "16", "--log-every", "20", "--save-every", "1000"]
    t = _step("4/6 pretrain")
    _train(["--stage", "pretrain", *DEMO_MODEL, "--data", pre, "--out", out / "pretrain", "--epochs",
            args.pretrain_epochs, "--lr", "2e-3", "--warmup-steps", "20", *common])
    print(f"pretrain in {time.perf_counter() - t:.0f}s")

    t = _step("5/6 SFT")
    _train(["--stage", "sft", "--init", out / "pretrain", "--data", sft, "--out", out / "sft", "--epochs",
            args.sft_epochs, "--lr", "1e-3", "--warmup-steps", "10", *common])
    print(f"SFT in {time.perf_counter() - t:.0f}s")

    _step("6/6 chat with the SFT model (greedy)")
    _chat(out / "sft")
    print(f"\nloss curves: {out / 'pretrain' / 'loss.png'}  {out / 'sft' / 'loss.png'}")
    print(f"serve it:    minimind serve --ckpt {out / 'sft'} --port 8000")
    print(f"chat:        minimind chat --ckpt {out / 'sft'}")
    print(f"demo done in {time.perf_counter() - t_all:.0f}s")
    return 0


def _chat(ckpt: Path) -> None:
    from infer.engine import Engine, SamplingParams

    engine = Engine.from_checkpoint(ckpt)
    prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=48, temperature=0.0))
    for q, o in zip(QUESTIONS, outs):
        print(f"user:      {q}\nassistant: {o.text.strip()}\n")


if __name__ == "__main__":
    sys.exit(main())
