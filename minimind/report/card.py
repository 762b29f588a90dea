"""The report card's page: one table with a column per run (what it was, what it cost, what it learned, how
it answers, how often it repeats itself), the loss curves on shared axes, where the time went, and a few
replies; as markdown (report.md), as a page for a browser (report.html) and as text on the terminal.

A row whose figure has a better direction marks the best run in bold and, from the second run on, its
difference from the first run (the baseline), e.g. `2.41 (-0.37)`.
"""

import math
import statistics
from dataclasses import dataclass, field

from minimind.report.runs import Run

SECTIONS = ("What it was", "What it cost", "What it learned", "How it answers", "Repetition")
SPENT = ("model and data", "data preparation", "dtype timing", "compile", "checkpoints", "evaluation", "training")


@dataclass
class Row:
    section: str
    label: str
    values: list  # one per run: a number, a string, or None (not measured)
    better: str | None = None  # "low" or "high": mark the best and the differences
    fmt: str = "{:.3f}"
    unit: str = ""
    cells: list[str] = field(default_factory=list)


def rows(runs: list[Run], measured: list[dict], price_per_hour: float) -> list[Row]:
    out = _was(runs, measured) + _cost(runs, price_per_hour) + _learned(runs, measured)
    out += _answers(measured) + _repetition(measured)
    for row in out:
        row.cells = _cells(row)
    return out


def _was(runs, measured) -> list[Row]:
    s = "What it was"

    def summary(run, *keys):
        value = run.summary or {}
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        return value

    return [
        Row(s, "stage", [r.stage for r in runs]),
        Row(s, "model", [f"{_origin(r)}, {m['params'] / 1e6:.2f}M params" for r, m in zip(runs, measured)]),
        Row(s, "data", [_data(r) for r in runs]),
        Row(s, "tokens seen", [r.tokens_seen for r in runs], fmt="{:,}"),
        Row(s, "optimizer steps", [r.rows[-1]["step"] for r in runs], fmt="{:,}"),
        Row(s, "optimizer", [r.config.get("optim") for r in runs]),
        Row(s, "dtype", [summary(r, "dtype") or r.config.get("dtype_chosen") or r.config.get("dtype") for r in runs]),
        Row(s, "device", [summary(r, "device_name") or r.config.get("device") for r in runs]),
        Row(s, "code", [_code(summary(r, "code")) for r in runs]),
    ]


def _origin(run: Run) -> str:
    """The preset a fresh run built, or the run or checkpoint it started from (--init)."""
    if run.config.get("init"):
        return "from " + _short(run.config["init"])
    return str(run.config.get("model") or "?")


def _data(run: Run) -> str:
    data = (run.summary or {}).get("data") or {}
    name = str(run.config.get("data") or "?").rstrip("/").rsplit("/", 1)[-1]
    fingerprint = data.get("fingerprint")
    return f"{name} ({fingerprint[:10]})" if isinstance(fingerprint, str) else name


def _code(code) -> str | None:
    if not isinstance(code, dict) or not code.get("commit"):
        return None
    return code["commit"][:10] + (" (uncommitted changes)" if code.get("dirty") else "")


def _cost(runs, price_per_hour: float) -> list[Row]:
    s = "What it cost"
    elapsed = [r.elapsed_s for r in runs]
    labels = ["wall-clock" + (" (estimated from tokens/s)" if any(r.estimated_clock for r in runs) else "")]
    out = [Row(s, labels[0], elapsed, "low", "{}"),
           Row(s, "tokens/s", [_tokens_per_s(r) for r in runs], "high", "{:,.0f}"),
           Row(s, "MFU", [_mfu(r) for r in runs], "high", "{:.1%}")]
    for part in SPENT[:-1]:
        values = [((r.summary or {}).get("spent_s") or {}).get(part) for r in runs]
        if any(v for v in values):
            out.append(Row(s, f"  {part}", values, None, "{}"))
    out.append(Row(s, f"cost at ${price_per_hour:g}/h", [None if e is None else e / 3600 * price_per_hour
                                                          for e in elapsed], "low", "${:.4f}"))
    return out


def _tokens_per_s(run: Run) -> float | None:
    value = (run.summary or {}).get("tokens_per_s")
    if value:
        return value
    rates = [r["tokens_per_s"] for r in run.rows if r.get("tokens_per_s")]
    return statistics.median(rates) if rates else None


def _mfu(run: Run) -> float | None:
    value = (run.summary or {}).get("mfu")
    if value:
        return value
    mfus = [r["mfu"] for r in run.rows if isinstance(r.get("mfu"), (int, float))]
    return statistics.mean(mfus) if mfus else None


def _learned(runs, measured) -> list[Row]:
    s = "What it learned"
    same_objective = len({r.stage for r in runs}) == 1  # GRPO's or DPO's loss is not comparable with pretraining's
    out = [Row(s, "last training loss", [r.rows[-1].get("loss") for r in runs], "low" if same_objective else None)]
    logged = [next((row["val_loss"] for row in reversed(r.rows) if "val_loss" in row), None) for r in runs]
    if any(v is not None for v in logged):
        out.append(Row(s, "val loss logged by the run", logged, "low"))
    for file in _files(measured, "heldout"):
        found = [_by_file(m["heldout"], file) for m in measured]
        name = _short(file)
        out.append(Row(s, f"held-out loss, nats/token ({name})", [f and f["nll_per_token"] for f in found], "low"))
        out.append(Row(s, f"held-out bits per byte ({name})", [f and f["bits_per_byte"] for f in found], "low"))
    return out


def _answers(measured) -> list[Row]:
    s = "How it answers"
    out = []
    for file in _files(measured, "answers"):
        found = [_by_file(m["answers"], file) for m in measured]
        out.append(Row(s, f"exact match ({_short(file)})", [f and f["accuracy"] for f in found], "high", "{:.1%}"))
        families = sorted({name for f in found if f for name in f["families"]})
        for name in families:
            values = [f["families"][name]["accuracy"] if f and name in f["families"] else None for f in found]
            out.append(Row(s, f"  {name}", values, "high", "{:.1%}"))
    for file in _files(measured, "choice"):
        found = [_by_file(m["choice"], file) for m in measured]
        out.append(Row(s, f"multiple choice ({_short(file)})", [f and f["accuracy"] for f in found], "high", "{:.1%}"))
    if not out:
        out.append(Row(s, "exact match", [None for _ in measured]))
    return out


def _repetition(measured) -> list[Row]:
    s = "Repetition"
    reps = [m["repetition"] for m in measured]

    def get(mode, key):
        return [r[mode][key] if r else None for r in reps]

    return [Row(s, "replies that loop, greedy", get("greedy", "loop_share"), "low", "{:.0%}"),
            Row(s, "replies that loop, server sampling", get("sampled", "loop_share"), "low", "{:.0%}"),
            Row(s, "distinct-2, greedy", get("greedy", "distinct_2"), "high", "{:.2f}"),
            Row(s, "distinct-2, server sampling", get("sampled", "distinct_2"), "high", "{:.2f}"),
            Row(s, "mean reply tokens, greedy", get("greedy", "mean_tokens"), None, "{:.1f}")]


def _files(measured, key) -> list[str]:
    seen = []
    for m in measured:
        for item in m[key]:
            if item["file"] not in seen:
                seen.append(item["file"])
    return seen


def _by_file(items, file):
    return next((i for i in items if i["file"] == file), None)


def _short(file: str) -> str:
    return str(file).rstrip("/").rsplit("/", 1)[-1]


def _cells(row: Row) -> list[str]:
    """Formatted values; the best in bold and the differences from the first run where `better` is set."""
    numbers = [v for v in row.values if isinstance(v, (int, float)) and math.isfinite(v)]
    best = None
    if row.better and len(numbers) > 1 and len(set(numbers)) > 1:
        best = min(numbers) if row.better == "low" else max(numbers)
    first = row.values[0] if row.values and isinstance(row.values[0], (int, float)) else None
    cells = []
    for i, value in enumerate(row.values):
        if value is None:
            cells.append("—")
            continue
        text = _fmt(row, value)
        if row.better and i > 0 and first is not None and isinstance(value, (int, float)) and value != first:
            text += f" ({_delta(row, value - first)})"
        cells.append(f"**{text}**" if best is not None and value == best else text)
    return cells


def _fmt(row: Row, value) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if row.fmt == "{}":  # seconds
        return duration(value)
    return row.fmt.format(value)


def _delta(row: Row, diff: float) -> str:
    sign = "+" if diff > 0 else "-"
    if row.fmt == "{}":
        return sign + duration(abs(diff))
    if row.fmt.endswith("%}"):
        return f"{diff * 100:+.1f} pt"
    return sign + row.fmt.format(abs(diff))


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


# ------------------------------------------------------------------------------------------- the page
def markdown(runs: list[Run], table: list[Row], measured: list[dict], *, images: list[str], notes: list[str],
             commands: list[str], title: str) -> str:
    lines = [f"# {title}", ""]
    lines += ["Runs: " + ", ".join(f"`{r.path}` ({r.stage}, checkpoint `{r.checkpoint.name}`)" for r in runs), ""]
    header = "| | " + " | ".join(f"`{r.name}`" for r in runs) + " |"
    for section in SECTIONS:
        section_rows = [row for row in table if row.section == section]
        if not section_rows:
            continue
        lines += [f"## {section}", "", header, "|---|" + "---|" * len(runs)]
        lines += [f"| {_md(row.label)} | " + " | ".join(_md(c) for c in row.cells) + " |" for row in section_rows]
        lines.append("")
        if section == "What it learned":
            lines += [f"![{image}]({image})" for image in images if image.startswith("curves")] + [""]
        if section == "What it cost":
            lines += [f"![{image}]({image})" for image in images if image.startswith("time")] + [""]
    lines += ["## Replies (greedy, held-out prompts)", ""]
    for run, m in zip(runs, measured):
        lines += [f"**`{run.name}`**", ""]
        if not m["samples"]:
            lines += ["no held-out prompts for this run", ""]
        for sample in m["samples"]:
            loop = " — *loops*" if sample["loops"] else ""
            lines += [f"- {_md(_one_line(sample['prompt']))} → {_md(_one_line(sample['reply'])) or '(nothing)'}{loop}"]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {_md(n)}" for n in notes] + [""]
    if commands:
        lines += ["## Re-run a figure", "", "```bash"] + commands + ["```", ""]
    lines += ["Held-out loss: `minimind eval ppl` (nats per target token; bits per byte divide by ln 2 and the "
              "text's UTF-8 bytes). Exact match: `minimind eval answers` (greedy, 64 tokens). A reply loops when a "
              "run of 1-16 tokens repeats back to back at least 3 times over at least 12 tokens; distinct-2 is "
              "distinct token bigrams over all bigrams of the replies; \"server sampling\" is `minimind serve`'s "
              "default (temperature 1, top-p 1). Best in bold; (differences) are from the first run.", ""]
    return "\n".join(lines)


def _one_line(text: str, width: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def terminal(runs: list[Run], table: list[Row]) -> str:
    """The table as fixed-width text (no bold marks)."""
    names = [r.name for r in runs]
    label_w = max(len(row.label) for row in table) + 2
    widths = [max(len(n), *(len(row.cells[i].replace("**", "")) for row in table)) + 2 for i, n in enumerate(names)]
    out = [" " * label_w + "".join(n.rjust(w) for n, w in zip(names, widths))]
    section = None
    for row in table:
        if row.section != section:
            section = row.section
            out.append(section)
        out.append(row.label.ljust(label_w) + "".join(c.replace("**", "").rjust(w) for c, w in zip(row.cells, widths)))
    return "\n".join(out)


HTML = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, "Noto Sans CJK SC", sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1f2328; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #d0d7de; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; white-space: pre; }}
tr:nth-child(even) {{ background: #f6f8fa; }}
img {{ max-width: 100%; }} code {{ background: #eff1f3; padding: 1px 4px; border-radius: 4px; }}
pre {{ background: #f6f8fa; padding: 0.8em; overflow-x: auto; }}
</style></head><body>
{body}
</body></html>
"""


def html(markdown_text: str, title: str) -> str:
    from markdown_it import MarkdownIt

    return HTML.format(title=title, body=MarkdownIt("commonmark").enable("table").render(markdown_text))


# ------------------------------------------------------------------------------------------- pictures
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def plot_curves(runs: list[Run], file) -> list[str]:
    """Training loss (lines) and logged held-out loss (dots) of every run, against wall-clock and tokens, on
    shared axes. -> the runs' names as the legend shows them, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = max((r.rows[-1]["elapsed_s"] for r in runs), default=0)
    unit, scale = ("minutes", 1 / 60) if longest > 180 else ("seconds", 1.0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110, sharey=True)
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        rows = [r for r in run.rows if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
        val = [r for r in run.rows if isinstance(r.get("val_loss"), (int, float))]
        for ax, key, k in ((axes[0], "elapsed_s", scale), (axes[1], "tokens", 1.0)):
            ax.plot([r[key] * k for r in rows], [r["loss"] for r in rows], color=color, lw=1.4,
                    label=run.name if ax is axes[1] else None)
            if val:
                ax.plot([r[key] * k for r in val], [r["val_loss"] for r in val], "o", color=color, ms=5, mfc="white",
                        label=f"{run.name}, held-out" if ax is axes[1] else None)
    axes[0].set_xlabel(f"wall-clock, {unit}" + (" (estimated)" if any(r.estimated_clock for r in runs) else ""))
    axes[1].set_xlabel("tokens seen")
    axes[0].set_ylabel("loss, nats/token")
    for ax in axes:
        ax.grid(alpha=0.3)
    legend = axes[1].legend(fontsize=8)
    fig.suptitle("loss against wall-clock and against tokens")
    fig.tight_layout()
    fig.savefig(file, format="png")
    plt.close(fig)
    return [t.get_text() for t in legend.get_texts() if not t.get_text().endswith(", held-out")]


def plot_time(runs: list[Run], file) -> None:
    """Where each run's wall-clock went (summary.json's split; the whole as training where there is none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 0.6 + 0.5 * len(runs)), dpi=110)
    names = [r.name for r in runs]
    left = [0.0] * len(runs)
    for j, part in enumerate(SPENT):
        widths = [_spent(r, part) for r in runs]
        if not any(widths):
            continue
        ax.barh(names, widths, left=left, color=COLORS[j % len(COLORS)], label=part)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.legend(fontsize=8, ncol=4, loc="lower right")
    ax.set_title("where the time went")
    fig.tight_layout()
    fig.savefig(file, format="png")
    plt.close(fig)


def _spent(run: Run, part: str) -> float:
    spent = (run.summary or {}).get("spent_s")
    if spent:
        return float(spent.get(part) or 0.0)
    return float(run.elapsed_s or 0.0) if part == "training" else 0.0
