"""``report.html``: one self-contained page next to a selection's outputs.

It shows the run (method, model, budget, strategy), the pool's score histogram by source,
the composition of the selection against the pool's, the best and the last few selected
examples, and the manifest's duplicate and contamination counts. The plots are matplotlib
(Agg) PNGs embedded as base64, so the page opens anywhere, offline, as one file.

:func:`write_select_report` is called after a run's other outputs are written; a failure
to draw is logged as a warning and leaves them as they are.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finesift.store.files import atomic_path

REPORT = "report.html"
SHOWN_EXAMPLES = 5
TEXT_CHARS = 400
SHOWN_CONTAMINATION = 20

_log = logging.getLogger("finesift.report")

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.4em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}
th:first-child,td:first-child,th.text{text-align:left}
td.text{text-align:left;white-space:pre-wrap;max-width:640px;
font-family:ui-monospace,monospace;font-size:0.88em}
th{background:#f3f3f3} figure{margin:1em 0} img{max-width:100%}
.note{color:#555;font-size:0.92em} .warn{color:#a40000}
"""

# counts the embedded plots that rendered: the headless-browser tests read data-plots-loaded
PLOTS_JS = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.plot'), ok = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) { ok += 1; } });
  document.body.setAttribute('data-plots-loaded', String(ok));
  var el = document.getElementById('plots-status');
  if (el) { el.textContent = ok + ' of ' + imgs.length + ' plots rendered'; }
});
"""


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _label(source: str) -> str:
    return Path(source).name or source


def plot_histogram(scores: np.ndarray, sources: Sequence[str], names: list[str],
                   cutoff: float | None) -> str:
    """The pool's scores, stacked by source; a dashed line at the lowest selected score."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 3.4))
    src = np.asarray(sources, dtype=object)
    data = [scores[src == n] for n in names]
    lo, hi = float(scores.min()), float(scores.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    ax.hist(data, bins=bins, stacked=True, label=[_label(n) for n in names])
    if cutoff is not None:
        ax.axvline(cutoff, color="black", linestyle="--", linewidth=1,
                   label="lowest selected score")
    ax.set_xlabel("score (higher = more useful)")
    ax.set_ylabel("pool examples")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_composition(names: list[str], pool: Counter, chosen: Counter) -> str:
    """Each source's share of the pool and of the selection (%)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(names) + 2.5), 3.2))
    x = np.arange(len(names))
    n_pool, n_sel = max(1, sum(pool.values())), max(1, sum(chosen.values()))
    ax.bar(x - 0.2, [100 * pool[n] / n_pool for n in names], 0.4, label="pool")
    ax.bar(x + 0.2, [100 * chosen[n] / n_sel for n in names], 0.4, label="selection")
    ax.set_xticks(x, [_label(n) for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("% of examples")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    return _png(fig)


def _table(header: list[str], rows: list[list[str]], text_col: int | None = None) -> str:
    head = "".join(f'<th class="text">{html.escape(h)}</th>' if j == text_col
                   else f"<th>{html.escape(h)}</th>" for j, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(
            f'<td class="text">{html.escape(c)}</td>' if j == text_col
            else f"<td>{html.escape(c)}</td>" for j, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _short(text: str, width: int = TEXT_CHARS) -> str:
    text = " ".join(str(text).split())
    return text[:width] + (" ..." if len(text) > width else "")


def _facts(manifest: dict[str, Any], n_pool: int, n_selected: int) -> list[tuple[str, str]]:
    model = manifest.get("model")
    model_name = model.get("name") if isinstance(model, dict) else model
    budget = manifest.get("budget") or {}
    options = manifest.get("method_options")
    weights = manifest.get("source_weights")
    return [
        ("method", str(manifest.get("method"))),
        ("method options", json.dumps(options, default=str) if options else "(defaults)"),
        ("model", str(model_name)),
        ("task", str(manifest.get("task"))),
        ("strategy", str(manifest.get("strategy"))
         + (f" (source weights {json.dumps(weights)})" if weights else "")),
        ("budget", f"{budget.get('requested')} = {budget.get('count')} examples"),
        ("selected", f"{n_selected} of {n_pool} pool examples"),
        ("seed", str(manifest.get("seed"))),
        ("wall time", f"{manifest.get('wall_seconds')} s"),
        ("created", str(manifest.get("created"))),
    ]


def _screening(manifest: dict[str, Any]) -> list[str]:
    """The dedup and contamination section."""
    esc = html.escape
    out = ['<h2 id="dedup">Duplicates and contamination</h2>']
    dedup = manifest.get("dedup")
    if dedup:
        verb = "dropped before scoring" if dedup.get("enabled") else "kept (run with --dedup to drop them)"
        out.append(
            f'<p id="dedup-counts">Pool duplicates (Jaccard of character '
            f'{esc(str(dedup.get("shingle_chars")))}-grams &ge; {esc(str(dedup.get("threshold")))}'
            f', exact ones always): <b>{dedup.get("duplicates", 0)}</b> in '
            f'<b>{dedup.get("groups", 0)}</b> group(s) ({dedup.get("exact_duplicates", 0)} '
            f'exact, {dedup.get("near_duplicates", 0)} near), {esc(verb)}; '
            f'<b>{dedup.get("dropped", 0)}</b> dropped.</p>')
        pairs = dedup.get("example_pairs") or []
        if pairs:
            out.append(_table(["kept", "duplicate", "Jaccard"],
                              [[str(p["kept"]), str(p["duplicate"]), f"{p['jaccard']:.3f}"]
                               for p in pairs]))
    else:
        out.append('<p id="dedup-counts">No duplicate check was recorded for this run.</p>')
    cont = manifest.get("contamination")
    if cont:
        pairs = cont.get("pairs") or {}
        cls = ' class="warn"' if pairs else ""
        out.append(
            f'<p id="contamination-counts"{cls}>Target examples also in the pool: '
            f'<b>{cont.get("contaminated", 0)}</b> of {cont.get("target_examples", 0)} '
            f'(matching {cont.get("pool_examples", 0)} pool example(s)).</p>')
        if pairs:
            rows = [[str(t), ", ".join(map(str, ps))]
                    for t, ps in list(pairs.items())[:SHOWN_CONTAMINATION]]
            out.append(_table(["target id", "pool ids"], rows))
            if len(pairs) > SHOWN_CONTAMINATION:
                out.append(f'<p class="note">and {len(pairs) - SHOWN_CONTAMINATION} more '
                           "(manifest.json, contamination)</p>")
    return out


def render(columns: dict[str, Any], manifest: dict[str, Any], selected: Sequence[Any]) -> str:
    """The page for a run's score table, manifest and selected records."""
    from finesift.data.records import record_text

    esc = html.escape
    scores = np.asarray(columns["score"], dtype=np.float64)
    sources = [str(s) for s in columns["source"]]
    ids = [str(i) for i in columns["id"]]
    rank = np.asarray(columns["selection_rank"], dtype=np.int64)
    names = sorted(set(sources))
    pool_counts = Counter(sources)
    chosen = np.flatnonzero(rank >= 0)
    chosen = chosen[np.argsort(rank[chosen], kind="stable")]
    sel_counts = Counter(sources[i] for i in chosen)
    score_of = dict(zip(ids, scores.tolist(), strict=True))

    body = [f"<h1>finesift selection: {esc(str(manifest.get('method')))}</h1>", "<ul>"]
    body += [f"<li><b>{esc(k)}</b>: {esc(v)}</li>"
             for k, v in _facts(manifest, len(scores), len(selected))]
    body += ["</ul>", '<p class="note" id="plots-status"></p>']

    plots: list[tuple[str, str]] = []
    if len(scores):
        cutoff = float(scores[chosen].min()) if len(chosen) else None
        plots.append(("Scores of the pool, by source",
                      plot_histogram(scores, sources, names, cutoff)))
        plots.append(("Composition: share of the pool and of the selection, by source",
                      plot_composition(names, pool_counts, sel_counts)))
    for title, png in plots:
        body.append(f"<figure><figcaption><h2>{esc(title)}</h2></figcaption>"
                    f'<img class="plot" alt="{esc(title)}" src="data:image/png;base64,{png}">'
                    "</figure>")

    n_sel = max(1, len(chosen))
    comp = [[_label(n), n, str(pool_counts[n]), f"{100 * pool_counts[n] / max(1, len(scores)):.1f}",
             str(sel_counts[n]), f"{100 * sel_counts[n] / n_sel:.1f}"] for n in names]
    body += ['<h2 id="composition">Composition by source</h2>',
             _table(["source", "path", "pool", "% of pool", "selected", "% of selection"],
                    comp)]

    def rows(records: Sequence[Any], start: int) -> list[list[str]]:
        out = []
        for j, r in enumerate(records):
            s = score_of.get(str(r.id))
            out.append([str(start + j + 1), "-" if s is None else f"{s:+.5f}", str(r.id),
                        _label(r.source), _short(record_text(r))])
        return out

    header = ["rank", "score", "id", "source", "text"]
    top = list(selected[:SHOWN_EXAMPLES])
    rest = max(SHOWN_EXAMPLES, len(selected) - SHOWN_EXAMPLES)
    bottom = list(selected[rest:])
    body += [f'<h2 id="top">The best {len(top)} selected</h2>',
             _table(header, rows(top, 0), text_col=4)]
    if bottom:
        body += [f'<h2 id="bottom">The last {len(bottom)} selected</h2>',
                 _table(header, rows(bottom, rest), text_col=4)]
    body += _screening(manifest)
    title = f"finesift selection: {manifest.get('method')}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><link rel=\"icon\" href=\"data:,\">"
            f"<style>{_CSS}</style></head><body>{''.join(body)}"
            f"<script>{PLOTS_JS}</script></body></html>\n")


def write_select_report(out_dir: Path, columns: dict[str, Any], manifest: dict[str, Any],
                        selected: Sequence[Any]) -> Path | None:
    """Write ``out_dir/report.html``; returns its path, or None when it could not be made
    (logged as a warning: a report is a view of the outputs, never a reason to lose them).
    A report left by an earlier run in the folder is removed first."""
    path = Path(out_dir) / REPORT
    try:
        if path.is_file():
            path.unlink()
        page = render(columns, manifest, selected)
        with atomic_path(path) as tmp:
            tmp.write_text(page, encoding="utf-8")
    except Exception as exc:  # noqa: BLE001  (any failure to draw must spare the run)
        _log.warning("warning: could not write %s: %s: %s (the run's other outputs are "
                     "written)", path, type(exc).__name__, exc)
        return None
    _log.debug("wrote %s (%.0f KiB)", path, path.stat().st_size / 1024)
    return path


__all__ = ["REPORT", "render", "write_select_report"]
