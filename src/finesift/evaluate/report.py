"""Benchmark reports: ``report.md`` and a self-contained ``report.html``.

Both hold the table "% test log-loss improvement over random, mean +- std over seeds"
per method x budget, the test losses (and F1 / exact match where measured), the cost
of each method and the fine-tuning hyperparameters. The HTML page adds plots (matplotlib,
Agg backend) embedded as base64 PNG, so it is one file that opens anywhere offline:
test loss vs budget per method, the composition of each selected subset by pool source,
score histograms and the cost per method.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from finesift.methods.base import report_columns
from finesift.store import atomic_path
from finesift.store.select_report import PLOTS_JS


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _fmt(mean: float, std: float, n: int, digits: int = 2, sign: bool = False) -> str:
    if n == 0 or not np.isfinite(mean):
        return "-"
    spec = f"{'+' if sign else ''}.{digits}f"
    return f"{mean:{spec}} ± {std:.{digits}f}" + (f" (n={n})" if n else "")


def metric_table(rows: list[dict[str, Any]], key: str, methods: list[str], budgets: list[str],
                 *, digits: int = 2, sign: bool = False) -> list[list[str]]:
    """Rows ``[method, cell per budget]``: mean ± std over seeds of ``key``."""
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r.get("status") == "ok" and r.get(key) is not None:
            cells[(r["method"], r["budget"])].append(float(r[key]))
    return [[m] + [_fmt(*_mean_std(cells[(m, b)]), digits=digits, sign=sign) for b in budgets]
            for m in methods]


def per_selection_columns() -> tuple[str, ...]:
    """The methods' declared report columns that count work per selection (not per run):
    every one but those counting chosen examples, which the head-to-head table shows."""
    return tuple(k for k in report_columns() if not k.startswith("n_selected"))


def cost_table(rows: list[dict[str, Any]], methods: list[str]) -> list[list[str]]:
    """Per method: mean selection (scoring) time and peak memory, fine-tune and eval time,
    the mean number of examples fine-tuned on, and the per-selection figures the methods
    declare (:func:`per_selection_columns`: HARP's train-evaluate runs)."""
    out = []
    for m in methods:
        mine = [r for r in rows if r.get("method") == m and r.get("status") == "ok"]
        # one scoring per selection folder (per seed; per budget and seed for HARP)
        per_seed = {(r["seed"], r.get("selection_dir")): r for r in mine}.values()

        def avg(key: str, rs: Any) -> str:
            vals = [float(r[key]) for r in rs if r.get(key) is not None]
            return f"{np.mean(vals):.1f}" if vals else "-"

        # a run that reused an identical subset's figures fine-tuned nothing itself
        ran = [r for r in mine if not r.get("reused_from")]
        n_reused = len(mine) - len(ran)
        out.append([m, avg("select_seconds", per_seed), avg("select_peak_rss_mb", per_seed),
                    avg("finetune_seconds", ran), avg("finetune_peak_rss_mb", ran),
                    avg("eval_seconds", ran), avg("n_train", mine),
                    *(avg(key, per_seed) for key in per_selection_columns()),
                    f"{len(mine)} ({n_reused} reused)" if n_reused else str(len(mine))])
    return out


def _measured_time(rows: list[dict[str, Any]], tuning: dict[str, Any] | None) -> str:
    """Wall and CPU time summed over the stages of the finished runs: each selection once
    (it serves several budgets), every fine-tune and evaluation, and the tuning grid."""
    ok = [r for r in rows if r.get("status") == "ok"]
    sels = {(r.get("method"), r.get("seed"), r.get("selection_dir")): r for r in ok}.values()

    def total(key: str, rs: Any) -> float:
        return float(sum(float(r.get(key) or 0.0) for r in rs))

    wall = total("select_seconds", sels) + total("finetune_seconds", ok) + total("eval_seconds", ok)
    cpu = (total("select_cpu_seconds", sels) + total("finetune_cpu_seconds", ok)
           + total("eval_cpu_seconds", ok))
    tune = sum(float(p.get("seconds") or 0.0) for p in (tuning or {}).get("points", []))
    text = f"{(wall + tune) / 60:.1f} min wall"
    if cpu:
        text += f", {cpu / 60:.1f} min CPU (runs only)"
    return text + (f" (tuning {tune / 60:.1f} min)" if tune else "") + \
        "; model loading and the untouched model's evaluation not counted"


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


# --------------------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_loss_vs_budget(rows: list[dict[str, Any]], methods: list[str], budgets: list[str]) -> str:
    """Test loss (mean ± std over seeds) against the budget count, one line per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for m in methods:
        xs, ys, es = [], [], []
        for b in budgets:
            got = [r for r in rows if r.get("method") == m and r.get("budget") == b
                   and r.get("status") == "ok"]
            if got:
                mean, std, _ = _mean_std([r["test_loss"] for r in got])
                xs.append(got[0]["budget_count"])
                ys.append(mean)
                es.append(std)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
    base = [r["base_test_loss"] for r in rows if r.get("base_test_loss") is not None]
    if base:
        ax.axhline(float(np.mean(base)), color="grey", ls="--", lw=1, label="untouched model")
    ax.set_xlabel("budget (selected examples)")
    ax.set_ylabel("test log-loss")
    ax.set_title("Test loss vs budget")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_composition(rows: list[dict[str, Any]], methods: list[str], budgets: list[str],
                     sources: list[str]) -> str:
    """Share of each pool source in the selected subsets (mean over seeds), per budget."""
    plt = _plt()
    n = len(budgets)
    fig, axes = plt.subplots(1, n, figsize=(max(4.0, 3.2 * n), 3.6), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, b in zip(axes[0], budgets, strict=True):
        bottom = np.zeros(len(methods))
        for si, src in enumerate(sources):
            share = []
            for m in methods:
                got = [r for r in rows if r.get("method") == m and r.get("budget") == b
                       and r.get("status") == "ok"]
                vals = [100.0 * r.get(f"n_from_{src}", 0) / max(1, r.get("n_train") or 1)
                        for r in got]
                share.append(float(np.mean(vals)) if vals else 0.0)
            ax.bar(methods, share, bottom=bottom, color=colors(si % 10), label=src)
            bottom += np.asarray(share)
        ax.set_title(f"budget {b}")
        ax.set_ylim(0, 100)
        ax.tick_params(axis="x", rotation=30)
    axes[0][0].set_ylabel("% of the selected subset")
    axes[0][-1].legend(fontsize=8, title="pool source", loc="upper left", bbox_to_anchor=(1.02, 1))
    return _png(fig)


def plot_score_histograms(scores: dict[str, dict[str, np.ndarray]], sources: list[str]) -> str:
    """One panel per method: histogram of its pool scores, stacked by pool source."""
    plt = _plt()
    methods = list(scores)
    fig, axes = plt.subplots(1, len(methods), figsize=(max(4.0, 3.4 * len(methods)), 3.2),
                             squeeze=False)
    for ax, m in zip(axes[0], methods, strict=True):
        by_src = scores[m]
        data = [by_src.get(s, np.array([])) for s in sources]
        allv = np.concatenate([d for d in data if len(d)]) if any(len(d) for d in data) else None
        if allv is not None:
            lo, hi = float(allv.min()), float(allv.max())
            bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
            ax.hist(data, bins=bins, stacked=True, label=sources)
        ax.set_title(m)
        ax.set_xlabel("score")
    axes[0][0].set_ylabel("pool examples")
    axes[0][-1].legend(fontsize=8)
    return _png(fig)


def plot_costs(rows: list[dict[str, Any]], methods: list[str]) -> str:
    """Mean wall time per method: scoring the pool, fine-tuning, evaluating."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    parts = [("select_seconds", "select (score pool)"), ("finetune_seconds", "fine-tune"),
             ("eval_seconds", "evaluate")]
    bottom = np.zeros(len(methods))
    for key, label in parts:
        vals = []
        for m in methods:
            got = [float(r[key]) for r in rows if r.get("method") == m and r.get(key) is not None]
            vals.append(float(np.mean(got)) if got else 0.0)
        ax.bar(methods, vals, bottom=bottom, label=label)
        bottom += np.asarray(vals)
    ax.set_ylabel("seconds per run (mean)")
    ax.set_title("Cost per method")
    ax.legend(fontsize=8)
    return _png(fig)


def _load_scores(out: Path, rows: list[dict[str, Any]], source_of: dict[str, str]
                 ) -> dict[str, dict[str, np.ndarray]]:
    """Each method's scores for its first finished seed, split by pool source."""
    import pyarrow.parquet as pq

    picked: dict[str, str] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("selection_dir") and r["method"] not in picked:
            picked[r["method"]] = r["selection_dir"]
    result: dict[str, dict[str, np.ndarray]] = {}
    for m, d in picked.items():
        path = out / d / "scores.parquet"
        if not path.exists():
            continue
        table = pq.read_table(path, columns=["source", "score"]).to_pydict()
        groups: dict[str, list[float]] = defaultdict(list)
        for src, s in zip(table["source"], table["score"], strict=True):
            groups[source_of.get(src, Path(src).stem)].append(float(s))
        result[m] = {k: np.asarray(v) for k, v in groups.items()}
    return result


# --------------------------------------------------------------------------- report

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.4em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3} figure{margin:1em 0} img{max-width:100%}
code{background:#f5f5f5;padding:1px 3px} .note{color:#555;font-size:0.92em}
"""



def write_report(out: Path, cfg: Any, rows: list[dict[str, Any]], *, budgets: list,
                 seeds: list[int], finetune: Any, model: str | None, quick: bool, data: Any,
                 seconds: float, tuning: dict[str, Any] | None = None,
                 base: dict[str, Any] | None = None, md_copy: Path | None = None,
                 methods: list[dict[str, Any]] | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` to ``out`` (and ``report.md`` to
    ``md_copy`` too, the suite's committed results folder); returns their paths.
    ``methods``: the methods as run (``label``, ``name``, ``options``, ``seeds``; default:
    the config's, on every seed)."""
    from finesift.evaluate.leaderboard import head_to_head_rows, stats_note, summarize, verdict

    run_methods = methods or [{"label": m.label, "name": m.name, "options": m.options,
                               "seeds": list(seeds),
                               **({"prefilter": m.prefilter} if m.prefilter is not None
                                  else {})} for m in cfg.methods]
    methods = [m["label"] for m in run_methods]
    budget_keys = [str(b) for b in budgets]
    sources = [s.name for s in cfg.pool]
    header = ["method"] + [f"budget {b}" for b in budget_keys]
    has_random = any(r.get("method") == "random" and r.get("status") == "ok" for r in rows)
    improve = metric_table(rows, "improvement_over_random_pct", methods, budget_keys, sign=True)
    loss = metric_table(rows, "test_loss", methods, budget_keys, digits=4)
    f1 = metric_table(rows, "test_f1", methods, budget_keys, digits=3)
    em = metric_table(rows, "test_em", methods, budget_keys, digits=3)
    costs = cost_table(rows, methods)
    summaries = summarize(rows, run_methods, budgets=budget_keys, flags=cfg.flags,
                          skipped=cfg.skipped)
    line = verdict(rows, summaries)
    h2h_header, h2h_rows = head_to_head_rows(summaries, budget_keys, cfg.flags,
                                             any(r.get("test_f1") is not None for r in rows))
    h2h_note = stats_note()
    skipped_rows = [[label, reason] for label, reason in cfg.skipped.items()
                    if label not in methods]
    worse = [r for r in rows if r.get("status") == "ok" and r.get("worse_than_untouched")]
    worse_note = ("No fine-tuned model came out worse than the untouched model." if not worse
                  else "**Worse than the untouched model** (test loss above "
                  f"{(base or {}).get('all', {}).get('base_test_loss') or '-'}): " + ", ".join(
                      f"{r['method']} budget {r['budget']} seed {r['seed']} "
                      f"({r['test_loss']:.4f})" for r in worse))
    effective = {
        "budgets": [str(b) for b in budgets], "seeds": list(seeds),
        "methods": {m["label"]: {"method": m["name"], "options": m.get("options", {}),
                                 "seeds": m["seeds"],
                                 **({"prefilter": m["prefilter"]} if m.get("prefilter")
                                    is not None else {})} for m in run_methods},
        "strategy": cfg.strategy, "model": str(model), "max_length": cfg.max_length,
        "finetune": finetune.hyperparameters(), "quick": quick,
    }
    cost_header = ["method", "select s", "select peak MiB", "fine-tune s", "fine-tune peak MiB",
                   "eval s", "examples fine-tuned",
                   *(report_columns()[key] for key in per_selection_columns()),
                   "runs"]
    cost_note = ("Fine-tune and eval times average the runs that fine-tuned. A run whose "
                 "subset (the same examples in the same order) and seed equal an earlier "
                 "run's trains the same model, so it takes over that run's figures instead "
                 "(counted as reused under runs).")
    hyper = finetune.hyperparameters()
    hyper_rows = [[k, str(v)] for k, v in hyper.items()]
    tune_header: list[str] = []
    tune_rows: list[list[str]] = []
    tune_note = ("Not tuned: the config's `finetune` values as given (add a `tune` grid to "
                 "tune them for random selection).")
    if tuning:
        keys = sorted(tuning["grid"])
        tune_header = [*keys, "val loss", "val F1", "seconds", "chosen"]
        for p in tuning["points"]:
            val_f1 = p.get("val_f1")
            tune_rows.append([str(p["params"][k]) for k in keys] + [
                f"{p['val_loss']:.4f}", "-" if val_f1 is None else f"{val_f1:.3f}",
                str(p["seconds"]),
                "yes" if p["params"] == tuning["chosen"] else ""])
        tune_note = (f"Tuned once for random selection: each grid point fine-tuned on "
                     f"{tuning['subset_size']} uniformly random pool examples (seed "
                     f"{tuning['seed']}) and measured on the val set (never the test set); the "
                     "lowest val log-loss was kept for every method.")
    base = [r["base_test_loss"] for r in rows if r.get("base_test_loss") is not None]
    n_ok = sum(r.get("status") == "ok" for r in rows)
    n_failed = sum(r.get("status") != "ok" for r in rows)
    has_f1 = any(r.get("test_f1") is not None for r in rows)
    has_em = any(r.get("test_em") is not None for r in rows)
    comp_rows = []
    for m in methods:
        for b in budget_keys:
            got = [r for r in rows if r.get("method") == m and r.get("budget") == b
                   and r.get("status") == "ok"]
            if got:
                cells = [f"{np.mean([r.get(f'n_from_{s}', 0) for r in got]):.1f}"
                         for s in sources]
                comp_rows.append([m, b] + cells)

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    facts = [
        ("config", f"{cfg.path}" + (" (--quick: tiny random model, tiny data)" if quick else "")),
        ("task", cfg.task), ("model", str(model)), ("strategy", cfg.strategy),
        ("pool", ", ".join(f"{s.name}: {sum(1 for r in data.pool if data.source_of.get(r.source) == s.name)}"
                           for s in cfg.pool)),
        ("val / test", f"{len(data.val)} / {len(data.test)} records"),
        ("seeds", ", ".join(map(str, seeds))),
        ("runs", f"{n_ok} finished, {n_failed} failed"),
        ("measured time of the finished runs", _measured_time(rows, tuning)),
        ("wall time of this invocation",
         f"{seconds:.0f} s (finished runs from earlier invocations are not redone)"),
        ("untouched model test loss", f"{np.mean(base):.4f}" if base else "-"),
        ("machines the runs were measured on (seconds compare only within one)",
         "; ".join(sorted({str(r["machine"]) for r in rows if r.get("machine")})) or "-"),
        ("written", when),
    ]
    imp_note = ("100 x (L_random - L_method) / L_random, paired by budget and seed; "
                "positive = lower test loss than random selection.")
    if not has_random:
        imp_note = "no `random` method in this config, so no improvement over random."

    # ---- markdown
    md = [f"# finesift benchmark: {cfg.name}", "", line.replace("**", ""), ""]
    md += [f"- **{k}**: {v}" for k, v in facts]
    md += ["", "## Head to head against random (paired bootstrap)", "", h2h_note, "",
           _md_table(h2h_header, h2h_rows), "", worse_note, ""]
    if skipped_rows:
        md += ["Left out of this suite:", "", _md_table(["method", "reason"], skipped_rows), ""]
    md += ["## % test log-loss improvement over random, mean ± std over seeds", "",
           imp_note, "", _md_table(header, improve), "",
           "## Test log-loss, mean ± std over seeds", "", _md_table(header, loss), ""]
    if has_f1:
        md += ["## Entity F1 (seqeval), mean ± std", "", _md_table(header, f1), ""]
    if has_em:
        md += ["## Exact match of the final answer, mean ± std", "", _md_table(header, em), ""]
    md += ["## Composition of the selected subsets (mean count per pool source)", "",
           _md_table(["method", "budget", *sources], comp_rows), "",
           "## Cost per method (mean per run; selection = scoring the pool once per seed, once per budget and seed for HARP)", "",
           _md_table(cost_header, costs), "", cost_note, "",
           "## Fine-tuning hyperparameters (the same for every method)", "",
           _md_table(["hyperparameter", "value"], hyper_rows), "", tune_note, "",
           *([_md_table(tune_header, tune_rows), ""] if tune_rows else []),
           "## Configuration as run", "", "```json",
           json.dumps(effective, indent=2, default=str), "```", "",
           "Plots: see report.html.", ""]
    md_path = out / "report.md"
    for folder in [out] + ([md_copy] if md_copy is not None else []):
        with atomic_path(folder / "report.md") as tmp:
            tmp.write_text("\n".join(md), encoding="utf-8")

    # ---- html
    plots: list[tuple[str, str]] = []
    if any(r.get("status") == "ok" for r in rows):
        plots.append(("Test loss vs budget", plot_loss_vs_budget(rows, methods, budget_keys)))
        plots.append(("Composition of the selected subsets by pool source",
                      plot_composition(rows, methods, budget_keys, sources)))
        scores = _load_scores(out, rows, data.source_of)
        if scores:
            plots.append(("Score histograms (first seed), by pool source",
                          plot_score_histograms(scores, sources)))
        plots.append(("Cost per method", plot_costs(rows, methods)))
    esc = html.escape
    body = [f"<h1>finesift benchmark: {esc(cfg.name)}</h1>",
            f'<p class="verdict" id="verdict">{esc(line.replace("**", ""))}</p>', "<ul>"]
    body += [f"<li><b>{esc(k)}</b>: {esc(str(v))}</li>" for k, v in facts]
    body += ["</ul>", '<p class="note" id="plots-status"></p>',
             "<h2>Head to head against random (paired bootstrap)</h2>",
             f'<p class="note">{esc(h2h_note)}</p>', _html_table(h2h_header, h2h_rows),
             f"<p>{esc(worse_note.replace('**', ''))}</p>",
             *([_html_table(["method", "reason"], skipped_rows)] if skipped_rows else []),
             "<h2>% test log-loss improvement over random, mean ± std over seeds</h2>",
             f'<p class="note">{esc(imp_note)}</p>', _html_table(header, improve),
             "<h2>Test log-loss, mean ± std over seeds</h2>", _html_table(header, loss)]
    if has_f1:
        body += ["<h2>Entity F1 (seqeval), mean ± std</h2>", _html_table(header, f1)]
    if has_em:
        body += ["<h2>Exact match of the final answer, mean ± std</h2>", _html_table(header, em)]
    for title, png in plots:
        body.append(f"<figure><figcaption><h2>{esc(title)}</h2></figcaption>"
                    f'<img class="plot" alt="{esc(title)}" src="data:image/png;base64,{png}">'
                    "</figure>")
    body += ["<h2>Composition of the selected subsets (mean count per pool source)</h2>",
             _html_table(["method", "budget", *sources], comp_rows),
             "<h2>Cost per method (mean per run; selection = scoring the pool once per seed, once per budget and seed for HARP)</h2>",
             _html_table(cost_header, costs), f"<p>{esc(cost_note)}</p>",
             "<h2>Fine-tuning hyperparameters (the same for every method)</h2>",
             _html_table(["hyperparameter", "value"], hyper_rows),
             f"<p>{esc(tune_note)}</p>",
             *([_html_table(tune_header, tune_rows)] if tune_rows else []),
             "<h2>Configuration as run</h2>",
             f"<pre>{esc(json.dumps(effective, indent=2, default=str))}</pre>",
             "<h2>Configuration file</h2>",
             f"<pre>{esc(json.dumps(cfg.raw, indent=2, default=str))}</pre>"]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>finesift benchmark: {esc(cfg.name)}</title>"
            '<link rel="icon" href="data:,">'
            f"<style>{_CSS}</style></head><body>{''.join(body)}"
            f"<script>{PLOTS_JS}</script></body></html>\n")
    html_path = out / "report.html"
    with atomic_path(html_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return md_path, html_path
