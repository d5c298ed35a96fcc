"""Head-to-head tables: every method of a suite against random, with paired bootstrap
intervals, and the leaderboard of every suite in ``benchmarks/RESULTS.md``.

Everything here is computed from result files alone: a suite's ``results.jsonl`` (one
row per finished run, with its per-example test losses) and ``suite.json`` (its methods
in order, their seeds, and the methods left out with the reason), so the leaderboard is
rebuilt on any machine from what a suite has committed (``finesift bench --report-only``).

Per method and suite:

* the % test log-loss improvement over random, pooled over budgets and seeds, with the
  95% interval of a paired bootstrap over runs and test examples
  (:mod:`finesift.evaluate.stats`), and paired wins out of pairs;
* the selection's cost (wall, CPU seconds, peak memory: one scoring of the pool, the
  mean over seeds) as a multiple of one ``random`` run's fine-tune and evaluation;
* where the suite flags record fields (``flags: [corrupted]``), the flagged share of the
  selection; for NER the entity F1; the runs whose model came out worse than untouched.

The verdict names the best method and says whether its lead over the runner-up and over
the best text-only baseline (``dsir``, ``embed``) is outside the interval.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finesift.evaluate.stats import (
    DEFAULT_RESAMPLES,
    METHOD_NOTE,
    bootstrap_improvement,
    bootstrap_lead,
)

REFERENCE = "random"
TEXT_ONLY = ("dsir", "embed")  # method names that look at the text only, never the model
BEGIN, END = "<!-- leaderboard:begin -->", "<!-- leaderboard:end -->"


@dataclass
class MethodSummary:
    """One method's head-to-head figures in one suite (``None`` where not measurable)."""

    label: str
    name: str
    n_runs: int = 0
    seeds: list[int] = field(default_factory=list)
    planned_seeds: list[int] = field(default_factory=list)
    improvement: dict[str, Any] | None = None
    by_budget: dict[str, dict[str, Any]] = field(default_factory=dict)
    test_loss: float | None = None
    test_f1: float | None = None
    flag_shares: dict[str, float] = field(default_factory=dict)
    worse_than_untouched: int = 0
    cost: dict[str, float] = field(default_factory=dict)
    multiples: dict[str, float] = field(default_factory=dict)
    auto_picks: dict[str, int] = field(default_factory=dict)
    prefilter: str | dict[str, Any] | None = None  # a cascade row: "embed:20%"
    options: dict[str, Any] = field(default_factory=dict)  # the method's options as run
    cpu_partial: bool = False  # part of the selection's CPU time was not recorded
    note: str = ""


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def _losses(row: dict[str, Any]) -> np.ndarray | None:
    got = row.get("test_losses")
    if not got:
        return None
    return np.asarray([np.nan if x is None else x for x in got], dtype=np.float64)


def _paired(rows: Sequence[dict[str, Any]], label: str, ref_label: str = REFERENCE,
            budget: str | None = None) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """(budget, seed) -> (reference losses, method losses) where both runs finished."""
    by = {(r["method"], r["budget"], r["seed"]): _losses(r) for r in _ok(rows)}
    out = {}
    for (m, b, s), met in by.items():
        if m != label or met is None or (budget is not None and b != budget):
            continue
        ref = by.get((ref_label, b, s))
        if ref is not None and ref.shape == met.shape:
            out[(b, s)] = (ref, met)
    return out


def _estimate(pairs: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]],
              n_resamples: int) -> dict[str, Any] | None:
    if not pairs:
        return None
    keys = sorted(pairs)
    ref = np.stack([pairs[k][0] for k in keys])
    met = np.stack([pairs[k][1] for k in keys])
    return bootstrap_improvement(ref, met, n_resamples=n_resamples)


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def summarize(rows: Sequence[dict[str, Any]], methods: Sequence[dict[str, Any]], *,
              budgets: Sequence[str], flags: Sequence[str] = (),
              skipped: dict[str, str] | None = None,
              n_resamples: int = DEFAULT_RESAMPLES) -> list[MethodSummary]:
    """Head-to-head figures of every method (``{"label", "name", "seeds"}`` dicts, in
    order) from a suite's run rows; methods in ``skipped`` get the reason as their note."""
    ok = _ok(rows)
    ref_runs = [r for r in ok if r["method"] == REFERENCE and not r.get("reused_from")]
    ref_wall = _mean([(r.get("finetune_seconds") or 0) + (r.get("eval_seconds") or 0)
                      for r in ref_runs])
    ref_cpu = _mean([(r.get("finetune_cpu_seconds") or 0) + (r.get("eval_cpu_seconds") or 0)
                     for r in ref_runs])
    ref_peak = _mean([max(r.get("finetune_peak_rss_mb") or 0, r.get("eval_peak_rss_mb") or 0)
                      for r in ref_runs])
    out = []
    for m in methods:
        s = MethodSummary(label=m["label"], name=m["name"],
                          planned_seeds=list(m.get("seeds") or []),
                          prefilter=m.get("prefilter"), options=dict(m.get("options") or {}))
        mine = [r for r in ok if r["method"] == s.label]
        s.n_runs = len(mine)
        s.seeds = sorted({int(r["seed"]) for r in mine})
        if skipped and s.label in skipped:
            s.note = skipped[s.label]
        if not mine:
            s.note = s.note or "not run yet"
            out.append(s)
            continue
        if s.label != REFERENCE:
            s.improvement = _estimate(_paired(rows, s.label), n_resamples)
            for b in budgets:
                est = _estimate(_paired(rows, s.label, budget=b), n_resamples)
                if est is not None:
                    s.by_budget[b] = est
        s.test_loss = _mean([r.get("test_loss") for r in mine])
        s.test_f1 = _mean([r.get("test_f1") for r in mine])
        for flag in flags:
            share = _mean([r.get(f"share_{flag}") for r in mine])
            if share is not None:
                s.flag_shares[flag] = share
        s.worse_than_untouched = sum(bool(r.get("worse_than_untouched")) for r in mine)
        picks = {(r["seed"], r.get("selection_dir")): r.get("auto_winner") for r in mine
                 if r.get("auto_winner")}
        if picks:  # --method auto: the candidate its trials chose, per selection
            counts: dict[str, int] = {}
            for w in picks.values():
                counts[w] = counts.get(w, 0) + 1
            s.auto_picks = counts
            s.note = (s.note + "; " if s.note else "") + "picked " + ", ".join(
                f"{w} ({n} of {len(picks)})" for w, n in sorted(counts.items(),
                                                                 key=lambda kv: -kv[1]))
        # one scoring per selection folder (per seed; per budget and seed for HARP)
        sels = list({(r["seed"], r.get("selection_dir")): r for r in mine}.values())
        s.cost = {k: v for k, v in (
            ("select_seconds", _mean([r.get("select_seconds") for r in sels])),
            ("select_cpu_seconds", _mean([r.get("select_cpu_seconds") for r in sels])),
            ("select_peak_rss_mb", _mean([r.get("select_peak_rss_mb") for r in sels])),
        ) if v is not None}
        s.cpu_partial = any(r.get("select_cpu_partial") for r in sels)
        for key, ref in (("wall", ref_wall), ("cpu", ref_cpu), ("peak", ref_peak)):
            mine_v = s.cost.get({"wall": "select_seconds", "cpu": "select_cpu_seconds",
                                 "peak": "select_peak_rss_mb"}[key])
            if mine_v is not None and ref:
                s.multiples[key] = mine_v / ref
        most = max((x.get("seeds") or [] for x in methods), key=len, default=[])
        if s.planned_seeds and len(s.planned_seeds) < len(most):
            s.note = (s.note + "; " if s.note else "") + (
                f"fewer seeds: {','.join(map(str, s.planned_seeds))} of "
                f"{','.join(map(str, most))}")
        out.append(s)
    return out


def _common_units(rows: Sequence[dict[str, Any]], labels: Sequence[str]
                  ) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """The reference's and each method's losses on the units where all of them ran."""
    pairs = [_paired(rows, lab) for lab in labels]
    keys = sorted(set.intersection(*(set(p) for p in pairs))) if pairs else []
    if not keys:
        return None
    ref = np.stack([pairs[0][k][0] for k in keys])
    return ref, [np.stack([p[k][1] for k in keys]) for p in pairs]


def verdict(rows: Sequence[dict[str, Any]], summaries: Sequence[MethodSummary], *,
            n_resamples: int = DEFAULT_RESAMPLES) -> str:
    """One line: the best method, its improvement, and whether its lead over the
    runner-up and over the best text-only baseline is outside the 95% interval."""
    # auto is ranked apart: its selection is one of its candidates' (often the very rows
    # of another line), so it is reported with its pick, not as a method of its own
    ranked = sorted((s for s in summaries if s.improvement is not None and not s.auto_picks),
                    key=lambda s: -s.improvement["mean"])
    if not ranked:
        return "No verdict yet: no method has finished runs paired with random's."
    best = ranked[0]
    imp = best.improvement
    where = "above" if imp["low"] > 0 else ("below" if imp["high"] < 0 else "inside the noise of")
    kind = " (a text-only baseline)" if best.name in TEXT_ONLY else ""
    text = (f"Best: **{best.label}**{kind}, {imp['mean']:+.1f}% test log-loss against random "
            f"[{imp['low']:+.1f}, {imp['high']:+.1f}], {where} random "
            f"({imp['wins']}/{imp['pairs']} pairs won)")
    if imp["mean"] <= 0:
        text = (f"No method beats random: the best, **{best.label}**{kind}, is at "
                f"{imp['mean']:+.1f}% [{imp['low']:+.1f}, {imp['high']:+.1f}]")

    def lead(other: MethodSummary, what: str) -> str:
        got = _common_units(rows, [best.label, other.label])
        if got is None:
            return f"; no runs in common with {what} {other.label}"
        ref, (a, b) = got
        est = bootstrap_lead(ref, a, b, n_resamples=n_resamples)
        state = "outside the interval" if est["separated"] else "inside the noise"
        return (f"; its lead over {what} {other.label} is {est['mean']:+.1f} points "
                f"[{est['low']:+.1f}, {est['high']:+.1f}], {state}")

    if len(ranked) > 1:
        text += lead(ranked[1], "the runner-up")
    text_only = [s for s in ranked[1:] if s.name in TEXT_ONLY]
    if best.name in TEXT_ONLY:
        pass
    elif text_only and text_only[0] is not ranked[1]:
        text += lead(text_only[0], "the best text-only baseline")
    elif text_only:
        text += " (the runner-up is the best text-only baseline)"
    else:
        text += "; no text-only baseline has finished runs"
    return text + "." + auto_agreement(rows, ranked, summaries)


def _same_options(name: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two option dicts of method ``name`` resolve to the same run (defaults
    filled in, so ``{}`` equals the defaults spelt out)."""
    from finesift.errors import FinesiftError
    from finesift.methods.base import resolved_identity

    try:
        ida, idb = resolved_identity(name, a), resolved_identity(name, b)
    except (FinesiftError, TypeError, ValueError):  # options an older finesift accepted
        return a == b
    return a == b if ida is None else ida == idb


def auto_agreement(rows: Sequence[dict[str, Any]], ranked: Sequence[MethodSummary],
                   summaries: Sequence[MethodSummary]) -> str:
    """Whether ``--method auto``'s pick is the method this leaderboard ranks first among
    the candidates auto could pick (its trials run on folds of the val set; the
    leaderboard measures on the test set), or "" when auto has no finished runs.

    A candidate is the leaderboard row of its method with the options auto gave it
    (``tov.mode=basic`` matches a ``tov`` row with ``mode: basic``); where no row has
    them, every plain row of the method stands for it and the line says so. A cascade row
    (a prefilter) or a row on a proxy is never the candidate auto tried. ``random`` (in
    ``summaries``, with no improvement over itself) ranks at 0%: where every other
    candidate does worse than random, random is the best candidate."""
    from finesift.evaluate.auto import AutoOptions

    floor = [s for s in summaries if s.label == REFERENCE and s.n_runs]
    ranked = sorted([*ranked, *floor],  # stable: a method at exactly 0% stays above random
                    key=lambda s: -(s.improvement["mean"] if s.improvement else 0.0))

    out = []
    for s in summaries:
        if not s.auto_picks:
            continue
        mine = [r for r in _ok(rows) if r.get("method") == s.label]
        given = json.loads(mine[0].get("method_options") or "{}") if mine else {}
        cands = list(dict.fromkeys(
            [c.strip() for c in str(given.get("candidates", AutoOptions.candidates))
             .split(",") if c.strip()] + ["random"]))
        sub: dict[str, dict[str, Any]] = {c: {} for c in cands}
        for key, value in given.items():
            method, dot, opt = str(key).partition(".")
            if dot and method in sub:
                sub[method][opt] = value
        among, loose = [], []
        for c in cands:
            plain = [m for m in ranked if m.name == c and not m.auto_picks
                     and m.prefilter is None and not m.options.get("proxy")]
            exact = [m for m in plain if _same_options(c, m.options, sub[c])]
            if not exact and plain:
                loose.append(c)
            among += exact or plain
        among = [m for m in ranked if any(m is a for a in among)]  # in leaderboard order
        if not among:
            continue
        best = among[0]
        picks = ", ".join(f"{w} ({n} of {sum(s.auto_picks.values())})"
                          for w, n in sorted(s.auto_picks.items(), key=lambda kv: -kv[1]))
        top = max(s.auto_picks.items(), key=lambda kv: kv[1])[0]
        state = ("agrees" if top == best.name else
                 f"disagrees: the best candidate here is {best.name} ({best.label})")
        tried = ", ".join(c if c not in loose and not sub[c] else
                          f"{c} as {', '.join(m.label for m in among if m.name == c)}"
                          for c in cands)
        note = (f" (no row runs {', '.join(loose)} with auto's options: every plain row of it "
                "stands in)" if loose else "")
        gain = ""
        if s.improvement is not None:
            e = s.improvement
            gain = f" ({e['mean']:+.1f}% [{e['low']:+.1f}, {e['high']:+.1f}] against random)"
        out.append(f" **{s.label}**{gain} picked {picks}; of its candidates "
                   f"({tried}), the leaderboard's ranking {state}.{note}")
    return "".join(out)


# --------------------------------------------------------------------------- cells


def fmt_improvement(s: MethodSummary) -> str:
    if s.improvement is None:
        return "reference" if s.label == REFERENCE and s.n_runs else "-"
    e = s.improvement
    return f"{e['mean']:+.1f} [{e['low']:+.1f}, {e['high']:+.1f}] {e['wins']}/{e['pairs']}"


def fmt_multiples(s: MethodSummary) -> str:
    if not s.multiples:
        return "-"
    # ">=": part of the selection ran in an earlier process that recorded no CPU time
    return " / ".join(("-" if k not in s.multiples else
                       f"{'>=' if k == 'cpu' and s.cpu_partial else ''}{s.multiples[k]:.2g}x")
                      for k in ("wall", "cpu", "peak"))


def head_to_head_rows(summaries: Sequence[MethodSummary], budgets: Sequence[str],
                      flags: Sequence[str], has_f1: bool) -> tuple[list[str], list[list[str]]]:
    """The suite report's head-to-head table: header and rows."""
    header = ["method", "% over random [95% CI] wins/pairs",
              *[f"budget {b}" for b in budgets], "test loss",
              *(["entity F1"] if has_f1 else []), *[f"{f} share" for f in flags],
              "selection cost x random run (wall / CPU / peak)", "runs", "worse than untouched",
              "note"]
    body = []
    for s in summaries:
        per_b = []
        for b in budgets:
            e = s.by_budget.get(b)
            per_b.append("-" if e is None else
                         f"{e['mean']:+.1f} [{e['low']:+.1f}, {e['high']:+.1f}]")
        body.append([
            s.label, fmt_improvement(s), *per_b,
            "-" if s.test_loss is None else f"{s.test_loss:.4f}",
            *(["-" if s.test_f1 is None else f"{s.test_f1:.3f}"] if has_f1 else []),
            *[("-" if f not in s.flag_shares else f"{100 * s.flag_shares[f]:.0f}%")
              for f in flags],
            fmt_multiples(s), f"{s.n_runs} (seeds {','.join(map(str, s.seeds))})" if s.n_runs
            else "0", str(s.worse_than_untouched) if s.n_runs else "-", s.note,
        ])
    return header, body


def stats_note(n_resamples: int = DEFAULT_RESAMPLES) -> str:
    return ("Improvement = 100 x (L_random - L_method) / L_random, pooled over budgets and "
            "seeds (positive = lower test log-loss than random selection); interval: "
            + METHOD_NOTE.format(n=n_resamples) + "; wins/pairs = runs at the same budget "
            "and seed where the method's mean test loss is lower than random's. Selection "
            "cost: one scoring of the pool (mean over seeds) as a multiple of one random "
            "run's fine-tune plus evaluation.")


# --------------------------------------------------------------------------- files


def load_finished(path: Path) -> dict[str, dict[str, Any]]:
    """The last recorded row of each run in ``results.jsonl`` (a torn last line is ignored)."""
    rows: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "key" in row:
            rows[row["key"]] = row
    return rows


@dataclass
class SuiteResults:
    """A suite's committed result files, read back."""

    name: str
    folder: Path
    meta: dict[str, Any]
    rows: list[dict[str, Any]]


def read_suite(folder: Path) -> SuiteResults | None:
    """``folder``'s ``suite.json`` and the last row of each run in ``results.jsonl``
    (only the runs of the methods it lists, with their current options); ``None`` when
    the folder holds no suite record."""
    meta_path = folder / "suite.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    keys = {m["key"]: m["label"] for m in meta.get("methods", [])}
    rows = []
    for key, row in load_finished(folder / "results.jsonl").items():
        label = keys.get(key.split("|", 1)[0])
        if label is not None:
            rows.append({**row, "method": label})
    return SuiteResults(meta.get("name", folder.name), folder, meta, rows)


def suite_summaries(suite: SuiteResults, n_resamples: int = DEFAULT_RESAMPLES
                    ) -> list[MethodSummary]:
    m = suite.meta
    return summarize(suite.rows, m.get("methods", []), budgets=m.get("budgets", []),
                     flags=m.get("flags", []), skipped=m.get("skipped"),
                     n_resamples=n_resamples)


def leaderboard_markdown(suites: Sequence[SuiteResults],
                         n_resamples: int = DEFAULT_RESAMPLES) -> str:
    """The cross-suite leaderboard: improvement with intervals, and selection cost."""
    summaries = {s.name: suite_summaries(s, n_resamples) for s in suites}
    order: list[str] = []
    for s in suites:
        for m in s.meta.get("methods", []):
            if m["label"] not in order:
                order.append(m["label"])
        for label in s.meta.get("skipped", {}):
            if label not in order:
                order.append(label)
    names = [s.name for s in suites]
    cell: dict[tuple[str, str], MethodSummary] = {
        (suite, m.label): m for suite, ms in summaries.items() for m in ms}

    notes: dict[str, int] = {}  # a skipped cell's reason -> its note number under the table

    def imp_cell(suite: SuiteResults, label: str) -> str:
        m = cell.get((suite.name, label))
        reason = suite.meta.get("skipped", {}).get(label)
        if reason and (m is None or not m.n_runs):
            return f"not run (note {notes.setdefault(reason, len(notes) + 1)})"
        if m is None:
            return "not in suite"
        if not m.n_runs:
            return m.note
        text = fmt_improvement(m)
        extras = [f"{100 * v:.0f}% {k}" for k, v in m.flag_shares.items()]
        if m.test_f1 is not None:
            extras.append(f"F1 {m.test_f1:.2f}")
        if m.planned_seeds and len(m.seeds) < len(suite.meta.get("seeds", [])):
            extras.append(f"seeds {','.join(map(str, m.seeds))}")
        if m.worse_than_untouched:
            extras.append(f"{m.worse_than_untouched} worse than untouched")
        return text + (f" ({'; '.join(extras)})" if extras else "")

    def cost_cell(suite: SuiteResults, label: str) -> str:
        m = cell.get((suite.name, label))
        if m is None or not m.n_runs:
            return "-"
        return fmt_multiples(m)

    lines = ["## Leaderboard", "",
             ("Generated by `finesift bench` from the committed result files under "
              "`benchmarks/results/` (rebuild: `finesift bench --report-only --config "
              "benchmarks/<suite>.yaml`); do not edit by hand."), ""]
    for s in suites:
        line = verdict(s.rows, summaries[s.name], n_resamples=n_resamples)
        lines.append(f"- **{s.name}**: " + line)
    lines += ["", "### % test log-loss improvement over random [95% CI], wins/pairs", "",
              "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label in order:
        lines.append(f"| {label} | " + " | ".join(imp_cell(s, label) for s in suites) + " |")
    if notes:
        lines += ["", "Cells not run, and why (the suites' `skipped:` entries):", ""]
        lines += [f"{n}. {reason}" for reason, n in notes.items()]
    lines += ["", ("### Selection cost as a multiple of one random fine-tune + evaluation "
                   "(wall / CPU / peak memory)"), "",
              "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label in order:
        lines.append(f"| {label} | " + " | ".join(cost_cell(s, label) for s in suites) + " |")
    runs = ", ".join(f"{s.name}: {sum(m.n_runs for m in summaries[s.name])} runs, "
                     f"{compute_hours(s.rows):.1f} h" for s in suites)
    lines += ["", stats_note(n_resamples) + f" Finished runs and the wall time they took "
              f"(selection once per selection, fine-tuning and evaluation once per run; "
              f"reused runs count nothing): {runs}.", ""]
    return "\n".join(lines)


def compute_hours(rows: Sequence[dict[str, Any]]) -> float:
    """Wall hours the finished runs of a suite took: each selection's scoring once, each
    run's fine-tuning and evaluation (a run that reused another's figures adds none)."""
    ok = _ok(rows)
    sels = {(r.get("method"), r.get("seed"), r.get("selection_dir")): r.get("select_seconds")
            for r in ok}
    seconds = sum(v for v in sels.values() if isinstance(v, (int, float)))
    for r in ok:
        if "reused_from" not in r:
            seconds += sum(float(r.get(k) or 0.0) for k in ("finetune_seconds", "eval_seconds"))
    return seconds / 3600.0


def write_leaderboard(results_root: Path, md_path: Path,
                      n_resamples: int = DEFAULT_RESAMPLES,
                      pending: Sequence[SuiteResults] = ()) -> str:
    """Rebuild the leaderboard from every suite folder under ``results_root`` (plus a
    column for each ``pending`` suite that has no folder yet, its cells marked) and put it
    between the leaderboard markers of ``md_path`` (right after its title when the markers
    are missing). Returns the generated text."""
    from finesift.store import atomic_path

    suites = [s for f in sorted(p for p in Path(results_root).iterdir() if p.is_dir())
              if (s := read_suite(f)) is not None]
    have = {s.name for s in suites}
    suites += [s for s in pending if s.name not in have]
    text = leaderboard_markdown(suites, n_resamples)
    block = f"{BEGIN}\n{text}\n{END}"
    old = md_path.read_text(encoding="utf-8") if md_path.exists() else "# Results\n"
    if BEGIN in old and END in old:
        new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, old,
                     count=1, flags=re.DOTALL)
    else:
        head, sep, rest = old.partition("\n")
        new = f"{head}\n\n{block}\n{sep}{rest}" if head.startswith("# ") else f"{block}\n\n{old}"
    with atomic_path(md_path) as tmp:
        tmp.write_text(new, encoding="utf-8")
    return text

