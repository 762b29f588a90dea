"""A zh+en corpus of real text from Debian packages, split by page: the held-out set for issue 18's benchmark.

Sources (each skipped, with its reason, when not installed; `apt-get install manpages-zh manpages
manpages-dev python3-doc` brings all four):
  manpages-zh       Chinese manual pages          rendered with groff (-k: UTF-8 input)
  manpages(-dev)    English manual pages          rendered with groff
  python3.X-doc     the Python docs' reST sources  read as text

A page is cut into documents at its section headings, and long sections at paragraphs, so that no
document is over DOC_BYTES bytes of UTF-8 (most are a few hundred: the short-document regime of the
issue's corpus); at most PER_PAGE documents of a page are taken. Train and held-out are split by page
*name*: `cp.1` in Chinese and in English land on the same side, so a translation of a held-out page is
never trained on.

    python bench/realtext_corpus.py --out runs/realtext/corpus [--train-docs 8000] [--val-docs 300]
"""

import argparse
import gzip
import json
import random
import re
import shutil
import subprocess
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DOC_BYTES = 480  # <= ~200 tokens of MiniMind2's tokenizer: nearly every document fits one 256-token row
MIN_BYTES = 60
VAL_SHARE = 10  # one page name in VAL_SHARE is held out
PER_PAGE = 4  # documents taken from one page at most (a random few): many pages, not a few long ones
MAN_PACKAGES = {"manpages-zh": "zh", "manpages": "en", "manpages-dev": "en"}


def _dpkg_files(package: str) -> list[str]:
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [f for f in out.splitlines() if re.search(r"/man/(\w+/)?man\d/[^/]+\.gz$", f)]


def sources() -> tuple[list[tuple[str, str, str]], list[str]]:
    """(lang, kind, path) of every page found, and a reason for each source that is missing."""
    pages, missing = [], []
    if shutil.which("groff") is None:
        missing.append("groff is not installed: no manual pages")
    else:
        for package, lang in MAN_PACKAGES.items():
            files = _dpkg_files(package)
            pages += [(lang, "man", f) for f in files if Path(f).is_file()]
            if not files:
                missing.append(f"{package} is not installed")
    docs = sorted(Path("/usr/share/doc").glob("python3.*-doc/html/_sources"))
    if docs:
        pages += [("en", "rst", str(p)) for p in sorted(docs[-1].rglob("*.rst.txt"))]
    else:
        missing.append("python3-doc is not installed")
    return pages, missing


def page_name(kind: str, path: str) -> str:
    """The split key: a manual page's file name (same in every language), a doc's path under _sources."""
    return Path(path).name if kind == "man" else path.split("/_sources/", 1)[1]


def is_val(name: str) -> bool:
    return zlib.crc32(name.encode()) % VAL_SHARE == 0


def render_man(path: str) -> str:
    with gzip.open(path, "rb") as f:
        roff = f.read()
    out = subprocess.run(["groff", "-k", "-Tutf8", "-mandoc", "-P-cbou", "-rLL=100000n", "-rHY=0"],
                         input=roff, capture_output=True, timeout=60).stdout.decode("utf-8", "replace")
    lines = out.splitlines()
    # drop the running header and footer (first and last non-blank lines)
    body = [i for i, line in enumerate(lines) if line.strip()]
    return "\n".join(lines[body[0] + 1:body[-1]]) if len(body) > 2 else ""


def man_sections(text: str) -> list[str]:
    """Sections of a rendered page: a heading at column 0, then its indented body (dedented)."""
    sections, cur = [], []
    for line in text.splitlines():
        if line and not line[0].isspace():
            if cur:
                sections.append(cur)
            cur = [line.strip()]
        elif cur:
            cur.append(line[7:] if line.startswith(" " * 7) else line.strip())
    if cur:
        sections.append(cur)
    return ["\n".join(s).strip() for s in sections]


RST_UNDERLINE = re.compile(r"^([=\-~^\"'*#+`])\1{2,}\s*$")


def rst_sections(text: str) -> list[str]:
    lines = text.splitlines()
    starts = [0] + [i - 1 for i in range(1, len(lines)) if RST_UNDERLINE.match(lines[i]) and lines[i - 1].strip()]
    starts = sorted(set(starts))
    return ["\n".join(lines[a:b]).strip() for a, b in zip(starts, starts[1:] + [len(lines)])]


def chunks(section: str) -> list[str]:
    """A section cut at blank lines into documents of at most DOC_BYTES bytes (a longer paragraph is cut
    at line ends, then at characters)."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", section) if p.strip()]
    docs, cur = [], ""
    for para in paras:
        for piece in _split_long(para):
            joined = f"{cur}\n\n{piece}" if cur else piece
            if len(joined.encode()) <= DOC_BYTES:
                cur = joined
            else:
                docs.append(cur)
                cur = piece
    if cur:
        docs.append(cur)
    return [d for d in docs if len(d.encode()) >= MIN_BYTES]


def _split_long(para: str) -> list[str]:
    if len(para.encode()) <= DOC_BYTES:
        return [para]
    out, cur = [], ""
    for line in para.splitlines():
        while len(line.encode()) > DOC_BYTES:  # one very long line: cut by characters
            cut = len(line.encode()[:DOC_BYTES].decode("utf-8", "ignore"))
            out.append(line[:cut])
            line = line[cut:]
        if len((cur + "\n" + line).encode()) > DOC_BYTES and cur:
            out.append(cur)
            cur = line
        else:
            cur = f"{cur}\n{line}" if cur else line
    if cur:
        out.append(cur)
    return out


def page_docs(item: tuple[str, str, str]) -> tuple[str, str, list[str]]:
    lang, kind, path = item
    try:
        if kind == "man":
            sections = man_sections(render_man(path))
        else:
            sections = rst_sections(Path(path).read_text("utf-8", "replace"))
    except (OSError, subprocess.SubprocessError, EOFError, gzip.BadGzipFile):
        return lang, page_name(kind, path), []
    return lang, page_name(kind, path), [d for s in sections for d in chunks(s)]


def build(out: Path, train_docs: int, val_docs: int, seed: int = 0, zh_share: float = 0.4,
          workers: int = 2) -> dict:
    """Writes out/train.jsonl, out/val.jsonl ({"text": ...}) and out/corpus.json; returns the stats.

    Pages are rendered in a seeded random order until both languages have their share of documents
    (zh_share of each split in Chinese where there is enough), then documents are shuffled.
    """
    pages, missing = sources()
    if not pages:
        raise SystemExit("realtext corpus: no source installed (" + "; ".join(missing) + ")")
    rng = random.Random(seed)
    rng.shuffle(pages)
    want = {("zh", False): int(train_docs * zh_share), ("en", False): train_docs - int(train_docs * zh_share),
            ("zh", True): int(val_docs * zh_share), ("en", True): val_docs - int(val_docs * zh_share)}
    got = {k: [] for k in want}
    done_pages = 0
    with ProcessPoolExecutor(workers) as pool:
        for lang, name, docs in pool.map(page_docs, pages, chunksize=8):
            done_pages += 1
            bucket = got[(lang, is_val(name))]
            bucket.extend(rng.sample(docs, min(PER_PAGE, len(docs))))
            if done_pages % 200 == 0:
                print(f"realtext corpus: {done_pages}/{len(pages)} pages, "
                      + ", ".join(f"{k[0]}{'/val' if k[1] else ''} {len(v)}" for k, v in got.items()), flush=True)
            if all(len(got[k]) >= n for k, n in want.items()):
                break
    out.mkdir(parents=True, exist_ok=True)
    stats = {"pages_read": done_pages, "missing_sources": missing, "seed": seed, "doc_bytes_max": DOC_BYTES}
    for split, val in (("train", False), ("val", True)):
        docs = []
        for lang in ("zh", "en"):
            pool_docs = got[(lang, val)]
            rng.shuffle(pool_docs)
            docs += [(lang, d) for d in pool_docs[:want[(lang, val)]]]
        rng.shuffle(docs)
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _, d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        stats[split] = {"docs": len(docs), "zh_docs": sum(1 for lang, _ in docs if lang == "zh"),
                        "bytes": sum(len(d.encode()) for _, d in docs)}
    (out / "corpus.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-docs", type=int, default=8000)
    p.add_argument("--val-docs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(build(args.out, args.train_docs, args.val_docs, args.seed), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
