"""Gradient influence cost: less, less on IProX proxies, tracin and tov side by side.

One process, one pool, one model (SmolLM2-135M by default): every method scores the same
encoded pool against the same target with its own work folder. For each method the
script prints wall and CPU seconds per stage, the peak RSS while it ran (sampled from
/proc every 20 ms; the model and data already loaded count too), the bytes left in its
work folder, the proxy's parameter count, and for each proxy run the overlap of its
top-10% / top-5% with full ``less`` and the Spearman correlation of the scores.

The pool is the bundled demo data (GSM8K problems + ShareGPT first turns, as
``finesift data build demo``), cut to the ``--pool-size`` shortest encoded examples (half
from each source) and the ``--n-target`` shortest GSM8K targets. The defaults are small
(40 pool examples, 4 targets, one warm-up checkpoint, proj_dim 512, an 8-example probe set,
one alignment epoch) because on a 2-core CPU one forward + backward pass of SmolLM2 over a
128-token example takes seconds; at this size the proxy's construction costs about as much
as the gradients it saves, which only pays off on larger pools.

Noise ceiling: ``--reference-seeds S ...`` runs full ``less`` again with the run's seed
replaced by S (only the methods' seed: the pool, target and model are the same). In
``less`` the seed draws the warm-up subset (``warmup_fraction`` of the pool, at least
``min_warmup``), initialises the LoRA adapter, orders the warm-up batches and draws
LoRA's dropout masks, and seeds the random projection. ``--reference-mode same-warmup``
keeps the warm-up subset of the run's own seed (so only the adapter's initialisation,
dropout, batch order and projection change, as between ``less`` and a proxy run, which
draws the same warm-up subset), ``both`` runs both kinds. Every run is then compared
with full ``less`` and with each reference run (top-10% / top-5% overlap, Spearman), so
proxy-against-less sits next to less-against-less. The scores of every run are kept in
``scores.npz``.

Alignment: ``--align-epochs 0 2`` builds a proxy per value and RHO (0: IPSVD only),
``--splits ipsvd adapted`` one per split of the factors (``IProxOptions.split``);
``--align-eval`` records the alignment objective (1 - cos, tau^2 KL, per block and per
layer kind) on the probe set right after IPSVD and after the alignment
(``proxy_align_before`` / ``proxy_align_after`` of
:func:`finesift.models.proxy.build_proxy`).

Usage::

    FINESIFT_CACHE=/tmp/fscache python benchmarks/influence_cost.py --out /tmp/influence
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class PeakRSS:
    """Peak resident memory of this process while the ``with`` block runs."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def top_overlap(a: np.ndarray, b: np.ndarray, share: float) -> float:
    """|top-k(a) & top-k(b)| / k with k = ceil(share * n)."""
    k = max(1, int(np.ceil(share * len(a))))
    ta = set(np.argsort(-a, kind="stable")[:k].tolist())
    tb = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(ta & tb) / k


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def load_data(args, tokenizer):
    from finesift.api import encode
    from finesift.bundled import build_demo_data
    from finesift.data.readers import load_records

    files = build_demo_data(args.out / "data", n_target=4 * args.n_target,
                            n_gsm8k_pool=2 * args.pool_size, n_sharegpt=2 * args.pool_size,
                            seed=args.seed)
    parts = []
    for key in ("pool_gsm8k", "pool_sharegpt"):
        recs = load_records([files[key]], None, role="pool")
        enc = encode(recs, tokenizer, "lm", max_length=args.max_length)
        order = np.argsort([len(e) for e in enc.examples], kind="stable")
        parts.append([enc.records[i] for i in order[: args.pool_size // 2]])
    pool = encode(parts[0] + parts[1], tokenizer, "lm", max_length=args.max_length)
    if len(pool.examples) != len(parts[0]) + len(parts[1]):
        raise SystemExit("influence_cost: re-encoding the pool dropped examples")
    trecs = load_records([files["target"]], None, role="target")
    tenc = encode(trecs, tokenizer, "lm", max_length=args.max_length)
    order = np.argsort([len(e) for e in tenc.examples], kind="stable")[: args.n_target]
    target = encode([tenc.records[i] for i in order], tokenizer, "lm", max_length=args.max_length)
    # the pool's sources, for the agreement within each (GSM8K first, then ShareGPT)
    first = np.arange(len(pool.examples)) < len(parts[0])
    return pool, target, {"gsm8k": first, "sharegpt": ~first}


STAGES = {
    "less": ["proxy_seconds_probe", "proxy_seconds_ipsvd", "proxy_seconds_align",
             "proxy_seconds_align_eval", "seconds_warmup", "seconds_per_example_grads",
             "seconds_projection"],
    "tov": ["seconds_training", "seconds_scoring"],
}
#: the top shares compared (name, share of the pool)
SHARES = (("top10", 0.10), ("top5", 0.05), ("top25", 0.25), ("top50", 0.50))
#: recall of the reference's top 10% inside the run's top share (name, share)
RECALLS = (("top10_in_top25", 0.25), ("top10_in_top50", 0.50))


def top_recall(a: np.ndarray, ref: np.ndarray, share: float, ref_share: float = 0.10) -> float:
    """Share of ``ref``'s top ``ref_share`` that is inside ``a``'s top ``share``."""
    k_ref = max(1, int(np.ceil(ref_share * len(ref))))
    k = max(1, int(np.ceil(share * len(a))))
    tr = set(np.argsort(-ref, kind="stable")[:k_ref].tolist())
    ta = set(np.argsort(-a, kind="stable")[:k].tolist())
    return len(tr & ta) / k_ref


@dataclasses.dataclass
class Run:
    """One method run of the benchmark.

    Attributes:
        label: its name in the tables (and, cleaned, its work folder's).
        method: the registered method.
        options: the method's options.
        seed: the run's seed (``MethodContext.seed``).
        warmup_seed: ``less``/``tracin``: draw the warm-up subset with this seed instead
            (``None``: the run's seed).
        kind: ``base`` (full ``less`` at the run's seed, what the others are compared
            with), ``reference`` (full ``less`` at another seed), ``proxy`` or ``method``.
    """

    label: str
    method: str
    options: dict[str, Any]
    seed: int
    warmup_seed: int | None = None
    kind: str = "method"


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """The runs of one benchmark, in order: ``less``, the proxies (per RHO, per alignment
    epochs), ``tracin``, ``tov``, then ``less``'s reference reruns."""
    grad_opts = {"warmup_epochs": args.warmup_epochs, "proj_dim": args.proj_dim,
                 "chunk_size": args.chunk_size, "projection": args.projection}
    runs: list[Run] = []
    references: list[Run] = []
    if "less" in args.methods:
        runs.append(Run("less", "less", grad_opts, args.seed, kind="base"))
        for s in args.reference_seeds:
            if args.reference_mode in ("reseed", "both"):
                references.append(Run(f"less-seed{s}", "less", grad_opts, s, kind="reference"))
            if args.reference_mode in ("same-warmup", "both"):
                references.append(Run(f"less-seed{s}-samewarmup", "less", grad_opts, s,
                                      warmup_seed=args.seed, kind="reference"))
    if "iprox" in args.methods:
        for rho in args.rhos:
            for split in args.splits:
                for epochs in args.align_epochs:
                    spec = (f"iprox:{rho:g},probe_examples={args.probe_examples},"
                            f"align_epochs={epochs}")
                    if split != "ipsvd":
                        spec += f",split={split}"
                    if args.align_eval:
                        spec += ",align_eval=1"
                    if args.proxy_options:
                        spec += "," + args.proxy_options.strip(",")
                    label = (f"less+iprox:{rho:g}"
                             + (f",align={epochs}" if len(args.align_epochs) > 1 else "")
                             + (f",split={split}" if len(args.splits) > 1 else ""))
                    runs.append(Run(label, "less", {**grad_opts, "proxy": spec}, args.seed,
                                    kind="proxy"))
    if "tracin" in args.methods:
        runs.append(Run("tracin", "tracin", grad_opts, args.seed))
    if "tov" in args.methods:
        runs.append(Run("tov (basic)", "tov", {"mode": "basic", "val_epochs": args.tov_val_epochs},
                        args.seed))
    # the reference reruns last: a run cut short keeps the methods' rows (each row and
    # the scores are saved as it finishes)
    return runs + references


def compare_runs(scores: dict[str, np.ndarray], references: Sequence[str],
                 groups: dict[str, np.ndarray] | None = None
                 ) -> dict[str, dict[str, dict[str, float]]]:
    """``{run: {reference: {"top10", "top5", "top25", "top50", "spearman", ...}}}``: every
    run's agreement with every reference run (present in ``scores``) other than itself: the
    overlap of their top shares (:func:`top_overlap`), the share of the reference's top
    10% inside the run's top 25% and 50% (``top10_in_top25``, ``top10_in_top50``), the
    Spearman correlation of the scores, and, per group of ``groups`` (a boolean mask over
    the pool, e.g. a source), the Spearman correlation within it (``spearman_NAME``)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, s in scores.items():
        out[label] = {}
        for ref in references:
            if ref == label or ref not in scores:
                continue
            r = scores[ref]
            out[label][ref] = {**{name: top_overlap(s, r, share) for name, share in SHARES},
                               **{name: top_recall(s, r, share) for name, share in RECALLS},
                               "spearman": spearman(s, r),
                               **{f"spearman_{g}": spearman(s[m], r[m])
                                  for g, m in (groups or {}).items() if m.sum() > 1}}
    return out


def _fmt(v, spec="{:.1f}"):
    return "-" if v is None else spec.format(v)


def _agreement(a: dict[str, float] | None) -> str:
    if not a:
        return "-"
    return f"{a['top10']:.2f} / {a['top5']:.2f} / {a['spearman']:+.3f}"


def _blocks(d: dict[str, float] | None) -> str:
    return "-" if not d else ", ".join(f"{k} {v:.3f}" for k, v in d.items())


def print_tables(rows: list[dict[str, Any]], references: Sequence[str]) -> None:
    extra = [r for r in references if r != "less"]
    print()
    head = ("| method | seed | wall s | CPU s | stages (wall s) | peak RSS MiB | store MiB | "
            "params (proxy / full) | top-10% overlap | top-5% overlap | Spearman vs less |")
    head += "".join(f" vs {r}: top-10% / top-5% / Spearman |" for r in extra)
    print(head)
    print("|---" * (11 + len(extra)) + "|")
    for r in rows:
        stages = ", ".join(f"{k.replace('proxy_seconds_', 'proxy ').replace('seconds_', '')} "
                           f"{v:.1f}" for k, v in r["stages"].items())
        params = (f"{r['proxy_parameters'] / 1e6:.1f}M / {r['full_parameters'] / 1e6:.1f}M "
                  f"({r['proxy_param_ratio']:.2f})" if r["proxy_parameters"] else "-")
        seed = str(r["seed"]) + ("" if r.get("warmup_seed") is None
                                 else f" (warm-up subset {r['warmup_seed']})")
        line = (f"| {r['method']} | {seed} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {stages} | "
                f"{r['peak_rss_mib']:.0f} | {r['store_bytes'] / 2**20:.1f} | {params} | "
                f"{_fmt(r.get('top10_overlap'), '{:.2f}')} | "
                f"{_fmt(r.get('top5_overlap'), '{:.2f}')} | "
                f"{_fmt(r.get('spearman_vs_less'), '{:+.3f}')} |")
        line += "".join(f" {_agreement(r['agreement'].get(ref))} |" for ref in extra)
        print(line)
    more = [(r["method"], r["agreement"]["less"]) for r in rows if r["agreement"].get("less")]
    if more:
        groups = sorted({k[len("spearman_"):] for _, a in more for k in a
                         if k.startswith("spearman_")})
        print("\nMore agreement with less: top-25% / top-50% overlap; less's top 10% inside "
              "the run's top 25% / top 50%; Spearman within each source of the pool:\n")
        print("| method | top-25% / top-50% overlap | less's top 10% in its top 25% / 50% |"
              + "".join(f" Spearman within {g} |" for g in groups))
        print("|---" * (3 + len(groups)) + "|")
        for label, a in more:
            print(f"| {label} | {a['top25']:.2f} / {a['top50']:.2f} | "
                  f"{a['top10_in_top25']:.2f} / {a['top10_in_top50']:.2f} |"
                  + "".join(f" {_fmt(a.get('spearman_' + g), '{:+.3f}')} |" for g in groups))
    aligned = [r for r in rows if r.get("align_before")]
    if aligned:
        print("\nAlignment objective on the probe set (1 - cos: mean over factored layers of "
              "0.5 [(1 - cos_A) + (1 - cos_B)]; KL: tau^2 KL(model || proxy)):\n")
        print("| method | align epochs | 1 - cos before (A / B) | tau^2 KL before | "
              "1 - cos after (A / B) | tau^2 KL after | per-epoch training means "
              "(1 - cos, KL) | eval s |")
        print("|---" * 8 + "|")
        for r in aligned:
            b, a = r["align_before"], r["align_after"]
            terms = "; ".join(f"{t['align']:.3f}, {t['kl']:.2f}"
                              for t in r.get("align_epoch_terms") or []) or "-"
            print(f"| {r['method']} | {r.get('align_epochs', '-')} | {b['align']:.4f} "
                  f"({b.get('align_A', float('nan')):.3f} / {b.get('align_B', float('nan')):.3f}) | "
                  f"{b['kl']:.3f} | {a['align']:.4f} "
                  f"({a.get('align_A', float('nan')):.3f} / {a.get('align_B', float('nan')):.3f}) | "
                  f"{a['kl']:.3f} | {terms} | {_fmt(r['stages'].get('proxy_seconds_align_eval'))} |")
        for r in aligned:
            b, a = r["align_before"], r["align_after"]
            print(f"\n{r['method']}: 1 - cos by block (before -> after)")
            print("  before: " + _blocks(b.get("by_block")))
            print("  after:  " + _blocks(a.get("by_block")))
            print(f"  smallest compared gradient norm before / after: "
                  f"{_fmt(b.get('min_grad_norm'), '{:.2e}')} / "
                  f"{_fmt(a.get('min_grad_norm'), '{:.2e}')}; layers with one below 1e-7 "
                  f"(cosine eps 1e-8): {b.get('layers_tiny_grad', '-')} / "
                  f"{a.get('layers_tiny_grad', '-')}")
            print(f"{r['method']}: 1 - cos by layer kind")
            print("  before: " + _blocks(b.get("by_kind")))
            print("  after:  " + _blocks(a.get("by_kind")))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder (emptied first)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pool-size", type=int, default=40)
    ap.add_argument("--n-target", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--proj-dim", type=int, default=512)
    ap.add_argument("--projection", default="rademacher",
                    help="less/tracin projection: rademacher (the LESS default), gaussian or "
                         "sparse")
    ap.add_argument("--chunk-size", type=int, default=64,
                    help="examples projected together (the projection matrix is generated "
                         "once per chunk)")
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--probe-examples", type=int, default=8)
    ap.add_argument("--align-epochs", type=int, nargs="+", default=[1],
                    help="Stage 2 epochs; several values build a proxy per value and RHO "
                         "(0: IPSVD only)")
    ap.add_argument("--align-eval", action="store_true",
                    help="record the alignment objective (1 - cos, tau^2 KL; per block and "
                         "layer kind) on the probe set before and after the alignment (one "
                         "extra pass over the probe set each)")
    ap.add_argument("--splits", nargs="+", default=["ipsvd"],
                    choices=["ipsvd", "symmetric", "adapted"],
                    help="how each proxy layer's A B is split between its factors "
                         "(IProxOptions.split); several values build a proxy per value")
    ap.add_argument("--proxy-options", default="",
                    help="more IProxOptions for every proxy, KEY=VALUE[,KEY=VALUE...], e.g. "
                         "align_lr=1e-3")
    ap.add_argument("--reference-seeds", type=int, nargs="*", default=[],
                    help="run full less again at these seeds (the noise ceiling: less "
                         "against less); every run is also compared with them")
    ap.add_argument("--reference-mode", default="reseed",
                    choices=["reseed", "same-warmup", "both"],
                    help="reseed: the reference run changes every seeded choice (warm-up "
                         "subset, LoRA init, dropout, batch order, projection); same-warmup: "
                         "it keeps the base seed's warm-up subset (as a proxy run does); "
                         "both: one run of each per seed")
    ap.add_argument("--tov-val-epochs", type=float, default=2.0)
    ap.add_argument("--methods", nargs="+", default=["less", "iprox", "tracin", "tov"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.reference_seeds = list(dict.fromkeys(args.reference_seeds))
    if args.reference_seeds and "less" not in args.methods:
        ap.error("--reference-seeds needs less in --methods")
    if args.seed in args.reference_seeds:
        ap.error(f"--reference-seeds: {args.seed} is the run's own --seed")
    if min(args.align_epochs) < 0:
        ap.error("--align-epochs must be >= 0")
    args.align_epochs = list(dict.fromkeys(args.align_epochs))
    args.splits = list(dict.fromkeys(args.splits))
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 PID prints where it is

    import torch

    torch.set_num_threads(args.threads)
    from finesift.engine.tasks import task_for
    from finesift.methods import MethodContext, get_method
    from finesift.models.loader import load_model

    runs = plan_runs(args)
    for run in runs:  # bad options fail now, not after an hour of the runs before them
        get_method(run.method, run.options)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    t0 = time.perf_counter()
    bundle = load_model(args.model, "lm", seed=args.seed)
    pool, target, groups = load_data(args, bundle.tokenizer)
    n_tok = [len(e) for e in pool.examples]
    print(f"model {args.model}; pool {len(pool.examples)} examples "
          f"({sum(n_tok)} tokens, mean {np.mean(n_tok):.0f}, max {max(n_tok)}), target "
          f"{len(target.examples)} ({sum(len(e) for e in target.examples)} tokens); "
          f"max_length {args.max_length}; torch threads {args.threads}; "
          f"setup {time.perf_counter() - t0:.1f} s", flush=True)
    print("runs:", json.dumps({r.label: {"method": r.method, "seed": r.seed,
                                         "warmup_seed": r.warmup_seed, "options": r.options}
                               for r in runs}), flush=True)

    rows = []
    scores: dict[str, np.ndarray] = {}
    for run in runs:
        label = run.label
        work = args.out / "work" / label.replace(":", "-").replace(" ", "")
        ctx = MethodContext(
            pool=pool.examples, target=target.examples, pool_records=pool.records,
            target_records=target.records, task=task_for("lm", bundle.tokenizer),
            model=bundle.model, model_task="lm", seed=run.seed, precision="fp32",
            batch_size=args.batch_size, workdir=work,
            log=lambda m, label=label: print(f"  [{label}] {m}", flush=True),
        )
        print(f"{label} ...", flush=True)
        meth = get_method(run.method, run.options)
        if run.warmup_seed is not None:
            # the warm-up subset of another seed; everything else seeded by run.seed
            draw = meth.warmup_indices
            meth.warmup_indices = (  # type: ignore[method-assign]
                lambda c, draw=draw, s=run.warmup_seed: draw(dataclasses.replace(c, seed=s)))
        c0, w0 = time.process_time(), time.perf_counter()
        with PeakRSS() as rss:
            res = meth.score(ctx)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        scores[label] = np.asarray(res.scores, dtype=np.float64)
        info = res.info
        opts = info.get("proxy_options") or {}
        row = {"method": label, "kind": run.kind, "seed": run.seed,
               "warmup_seed": run.warmup_seed, "options": run.options,
               "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss.peak / 2**20,
               "store_bytes": folder_bytes(work),
               "stages": {k: info[k] for k in STAGES["tov" if run.method == "tov" else "less"]
                          if k in info},
               "proxy_parameters": info.get("proxy_parameters"),
               "full_parameters": info.get("full_parameters"),
               "proxy_param_ratio": info.get("proxy_param_ratio"),
               "proxy_cached": info.get("proxy_cached"),
               "trainable_parameters": info.get("trainable_parameters"),
               "warmup_examples": info.get("warmup_examples"),
               "align_epochs": opts.get("align_epochs"),
               "split": opts.get("split"),
               "align_epoch_losses": info.get("proxy_align_epoch_losses"),
               "align_epoch_terms": info.get("proxy_align_epoch_terms"),
               "align_before": info.get("proxy_align_before"),
               "align_after": info.get("proxy_align_after")}
        rows.append(row)
        (args.out / "results.partial.json").write_text(json.dumps(rows, indent=2))
        np.savez(args.out / "scores.npz", **scores)
        print(f"  {label}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS "
              f"{row['peak_rss_mib']:.0f} MiB, stages {row['stages']}", flush=True)
        if row["align_before"]:
            b, a = row["align_before"], row["align_after"]
            print(f"  {label}: alignment objective before -> after: 1 - cos "
                  f"{b['align']:.4f} -> {a['align']:.4f}, tau^2 KL {b['kl']:.3f} -> "
                  f"{a['kl']:.3f}", flush=True)

    references = [r.label for r in runs if r.kind in ("base", "reference")]
    agreement = compare_runs(scores, references, groups)
    for row in rows:
        row["agreement"] = agreement[row["method"]]
        base = row["agreement"].get("less")
        if base is not None:
            row["top10_overlap"] = base["top10"]
            row["top5_overlap"] = base["top5"]
            row["spearman_vs_less"] = base["spearman"]
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print_tables(rows, references)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; results in {args.out / 'results.json'}, "
          f"scores in {args.out / 'scores.npz'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
