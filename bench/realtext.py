"""Loss per second on real text (issue 18): recipes trained for a fixed wall-clock on a zh+en corpus from
Debian packages (bench/realtext_corpus.py), exported, and scored on held-out documents through stock
transformers, in nats per token (MiniMind2's tokenizer for every recipe) and bits per byte.

Runs go two at a time, each on its own core with one thread (`taskset`, OMP_NUM_THREADS=1): on this
2-core machine that is ~15% more tokens per second in all than one run on both cores, and two runs that
share the machine never see different conditions. Every time below is wall-clock from the command's start,
start-up included, as a user waits for it.

Recipes (RECIPES): `minimind2` is MiniMind2's train_pretrain.py reproduced in our trainer: one document
a row padded to 256, batch 8, AdamW (torch's betas, weight decay 0.01), lr 5e-4 cosine to 5e-5 without
warmup, clip 1.0, `<|im_start|> text <|im_end|>` documents, one epoch. `ours` is `train.py` with its
defaults and `--max-time`. `old` is the defaults of main at 6dd74fc (issue 18's measurement), run from
a git worktree of that commit; `main1207` those of main at be478a9 (before issue 27). Sweep variants are
`ours` plus flags.

    python bench/realtext.py corpus                       # build + prepare (cached)
    python bench/realtext.py run peer:minimind2 ours15:ours@15 old15:old@15
    python bench/realtext.py run lr2e-3:ours@5:--lr=2e-3,--doc-mask   # a run's own flags
    python bench/realtext.py run a:ours@5 b:ours@5 -- --lr 2e-3       # flags after -- go to every run
    python bench/realtext.py score                        # every checkpoint not yet scored
    python bench/realtext.py table [RUN...]               # markdown table + realtext.png
The work directory is runs/realtext (--work).
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "minimind_tokenizer"  # MiniMind2's; --tokenizer to use another
OLD_COMMIT = "6dd74fc"  # main when issue 18 measured the old defaults
SEQ = 256
PEER = ["--no-packing", "--optim", "adamw", "--batch-size", "8", "--lr", "5e-4", "--min-lr", "5e-5",
        "--warmup-steps", "0", "--weight-decay", "0.01", "--adam-betas", "0.9,0.999", "--grad-clip", "1.0",
        "--schedule", "cosine", "--epochs", "1"]
# name -> (document format of its data, code: "new" | "old", flags); "@M" in a run spec adds --max-time M minutes
RECIPES = {
    "minimind2": ("minimind", "new", PEER),
    "ours": ("minimind", "new", []),
    "ours-eos": ("eos", "new", []),
    "old": ("eos", "old", []),
    "main1207": ("minimind", "be478a9", []),  # the defaults before issue 27 (muon, float32 on a CPU)
}
SAVES = 5  # checkpoints per run, for the loss-over-time curve


def _py() -> str:
    return sys.executable


def cmd_corpus(args) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from realtext_corpus import build

    corpus = args.work / "corpus"
    if not (corpus / "corpus.json").is_file():
        print(json.dumps(build(corpus, args.train_docs, args.val_docs, seed=0), indent=1))
    for fmt in ("minimind", "eos"):
        out = args.work / f"data-{fmt}"
        if not (out / "meta.json").is_file():
            subprocess.run([_py(), "-m", "minimind.cli", "prepare", "--stage", "pretrain", "--input",
                            str(corpus / "train.jsonl"), "--tokenizer", str(args.tokenizer), "--out", str(out),
                            "--doc-format", fmt], check=True, cwd=ROOT)


def _old_tree(work: Path, commit: str = OLD_COMMIT) -> Path:
    tree = work / ("old-code" if commit == OLD_COMMIT else f"code-{commit}")
    if not (tree / "train.py").is_file():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], check=True, cwd=ROOT)
    return tree


def _run_command(work: Path, name: str, spec: str, extra: list[str], tokenizer: Path) -> tuple[list[str], Path]:
    recipe, _, minutes = spec.partition("@")
    fmt, code, flags = RECIPES[recipe]
    cwd = ROOT if code == "new" else _old_tree(work, OLD_COMMIT if code == "old" else code)
    data = work / f"data-{fmt}"
    cmd = [_py(), "train.py", "--stage", "pretrain", "--model", "small", "--seq-len", str(SEQ), "--data", str(data),
           "--tokenizer", str(tokenizer), "--out", str(work / "runs" / name), "--device", "cpu", "--log-every", "10",
           "--keep", "100", *flags, *extra]
    if minutes:
        cmd += ["--max-time", str(float(minutes) * 60)]
    # checkpoints along the way: SAVES of them at the expected pace (peer: from its epoch length)
    steps = _expected_steps(work, fmt, flags + extra, float(minutes or 0))
    cmd += ["--save-every", str(max(1, steps // SAVES))]
    return cmd, cwd


def _expected_steps(work: Path, fmt: str, flags: list[str], minutes: float) -> int:
    meta = json.loads((work / f"data-{fmt}" / "meta.json").read_text())
    batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 8
    if "--epochs" in flags:
        return math.ceil(meta["num_docs"] / batch)
    if "--max-steps" in flags:
        return int(flags[flags.index("--max-steps") + 1])
    return max(1, int(minutes * 60 * 330 / (batch * SEQ)))  # ~330 tokens/s on one core (small, fp32)


def cmd_run(args) -> None:
    jobs = []
    for item in args.runs:
        name, _, spec = item.partition(":")
        spec, _, flags = spec.partition(":")
        own = [part for flag in re.split(r",(?=--)", flags) if flag for part in flag.split("=", 1)]  # 0.8,0.95 stays
        if (args.work / "runs" / name).exists():
            print(f"realtext: {name} exists, skipped (delete runs/{name} to redo it)")
            continue
        jobs.append((name, *_run_command(args.work, name, spec or name, own + args.extra, args.tokenizer)))
    (args.work / "runs").mkdir(parents=True, exist_ok=True)
    running: dict[int, tuple] = {}
    free = list(args.cores) if args.cores else list(range(min(2, os.cpu_count() or 1)))
    while jobs or running:
        while jobs and free:
            core = free.pop(0)
            name, cmd, cwd = jobs.pop(0)
            log = open(args.work / "runs" / f"{name}.log", "w")
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(cwd)}
            (args.work / "runs" / f"{name}.cmd").write_text(" ".join(cmd) + "\n")
            start = time.time()
            proc = subprocess.Popen(["taskset", "-c", str(core), *cmd], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    env=env)
            running[proc.pid] = (proc, core, name, start, log)
            print(f"realtext: {name} started on core {core}", flush=True)
        time.sleep(2)
        for pid, (proc, core, name, start, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                (args.work / "runs" / f"{name}.launch").write_text(json.dumps({"start": start, "end": time.time(),
                                                                                "rc": proc.returncode}))
                print(f"realtext: {name} ended (exit {proc.returncode}) after {time.time() - start:.0f}s", flush=True)
                free.append(core)
                del running[pid]


# --- scoring -------------------------------------------------------------------------------------------------

def layout(fmt: str, tok) -> tuple[int, int]:
    """(start, end) token ids around a scored document: the tokens it was trained between."""
    if fmt == "minimind":
        return tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    return eot, eot  # documents follow one another's <|endoftext|>


def score_model(model_dir: Path, docs: list[str], fmt: str, batch: int = 16) -> dict:
    """Every held-out document alone: NLL of its text tokens and its end token, given its start token."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    start, end = layout(fmt, tok)
    seqs = [[start, *tok(d, add_special_tokens=False)["input_ids"], end] for d in docs]
    nll, n_tok = 0.0, 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    with torch.inference_mode():
        for i in range(0, len(order), batch):
            group = [seqs[j] for j in order[i:i + batch]]
            t = max(map(len, group))
            ids = torch.zeros(len(group), t, dtype=torch.long)
            mask = torch.zeros(len(group), t, dtype=torch.long)
            for r, s in enumerate(group):
                ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                   reduction="sum").item()
            n_tok += int((tgt != -100).sum())
    n_bytes = sum(len(d.encode()) for d in docs)
    return {"nats_per_token": nll / n_tok, "bits_per_byte": nll / math.log(2) / n_bytes, "tokens": n_tok,
            "bytes": n_bytes}


def cmd_score(args) -> None:
    from minimind.interop.export import export_hf

    docs = [json.loads(line)["text"] for line in open(args.work / "corpus" / "val.jsonl", encoding="utf-8")]
    results = args.work / "scores.jsonl"
    done = {(r["run"], r["step"]) for r in map(json.loads, results.open())} if results.exists() else set()
    for launch in sorted((args.work / "runs").glob("*.launch")):
        name = launch.stem
        if args.only and name not in args.only:
            continue
        info = json.loads(launch.read_text())
        run = args.work / "runs" / name
        cfg = json.loads((run / "run.json").read_text())
        fmt = json.loads((Path(cfg["data"]) / "meta.json").read_text()).get("doc_format") or "eos"
        steps = sorted((int(p.name[5:]), p) for p in run.glob("step-*") if p.name[5:].isdigit())
        for step, ckpt in steps:
            if (name, step) in done or (args.final_only and step != steps[-1][0]):
                continue
            hf = args.work / "export" / f"{name}-{step}"
            export_hf(ckpt, hf, force=True)
            row = {"run": name, "step": step, "elapsed_s": round(ckpt.stat().st_mtime - info["start"], 1),
                   "final": step == steps[-1][0], "format": fmt, **score_model(hf, docs, fmt)}
            shutil.rmtree(hf)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"realtext: {name} step {step} at {row['elapsed_s']:.0f}s: {row['nats_per_token']:.3f} nats/token, "
                  f"{row['bits_per_byte']:.4f} bits/byte", flush=True)
            if not args.keep_ckpts and step != steps[-1][0]:
                shutil.rmtree(ckpt / "trainer_state", ignore_errors=True)


def cmd_table(args) -> None:
    rows = [json.loads(line) for line in open(args.work / "scores.jsonl")]
    rows = [r for r in rows if not args.only or r["run"] in args.only]
    finals = [r for r in rows if r["final"]]
    print("| run | recipe | wall-clock (s) | steps | held-out nats/token | bits/byte |")
    print("|---|---|---|---|---|---|")
    for r in sorted(finals, key=lambda r: r["nats_per_token"]):
        cmd = (args.work / "runs" / f"{r['run']}.cmd").read_text().split()
        print(f"| {r['run']} | {_flags(cmd)} | {r['elapsed_s']:.0f} | {r['step']} | {r['nats_per_token']:.3f} | "
              f"{r['bits_per_byte']:.4f} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted({r["run"] for r in rows}):
        pts = sorted((r["elapsed_s"] / 60, r["bits_per_byte"]) for r in rows if r["run"] == name)
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("wall-clock (minutes, one core per run)")
    ax.set_ylabel("held-out bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.work / "realtext.png", dpi=120)
    print(f"\nplot: {args.work / 'realtext.png'}")


def _flags(cmd: list[str]) -> str:
    keep, skip = [], {"--stage", "--model", "--seq-len", "--data", "--tokenizer", "--out", "--device", "--log-every",
                      "--keep", "--save-every"}
    i = 2
    while i < len(cmd):
        if cmd[i] in skip:
            i += 2
            continue
        keep.append(cmd[i])
        i += 1
    return " ".join(keep) or "defaults"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("corpus", "run", "score", "table"))
    p.add_argument("runs", nargs="*", help="run: NAME:RECIPE[@MINUTES][:--FLAG=VALUE,...]; score, table: these only")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "realtext")
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    p.add_argument("--train-docs", type=int, default=2400)
    p.add_argument("--val-docs", type=int, default=200)
    p.add_argument("--keep-ckpts", action="store_true")
    p.add_argument("--cores", type=lambda v: [int(c) for c in v.split(",")], metavar="0,1",
                   help="run: the cores to run on, one run each (default: the first two)")
    p.add_argument("--final-only", action="store_true", help="score: each run's last checkpoint only")
    args = p.parse_intermixed_args(argv)
    args.extra, args.only = extra, (args.runs if args.command in ("score", "table") else None)
    if not (args.tokenizer / "tokenizer.json").is_file():
        print(f"realtext: skipped: no tokenizer at {args.tokenizer} (MiniMind2's is in ../shared/; --tokenizer DIR)")
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    {"corpus": cmd_corpus, "run": cmd_run, "score": cmd_score, "table": cmd_table}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
