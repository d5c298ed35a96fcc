"""DSIR's featurisation and weighting speed on real ShareGPT conversations: finesift's
two bucket hashings (``sha256``, the official package's and the default, and the
vectorised ``blake2b``) side by side in one run, and the official ``data-selection``
package on the same texts when it is installed (its weights are checked equal).

    python benchmarks/dsir_speed.py                 # 2,000 conversations, 3 repeats
    python benchmarks/dsir_speed.py --pool 8000 --repeats 5

Each repeat runs the variants in turn (the official package last, on one process), so a
busy machine slows them alike; the table gives the median conversations per second and
each variant's time as a multiple of finesift's default, repeat by repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from finesift import bundled
from finesift.data.readers import parse_record
from finesift.data.records import record_text
from finesift.methods.dsir import DSIROptions, dsir_log_weights


def _texts(n_pool: int, n_target: int) -> tuple[list[str], list[str]]:
    share = bundled.sharegpt_first_turns(n_pool)
    gsm = bundled.gsm8k_records()[:n_target]

    def text(r, i, src):
        return record_text(parse_record(r, src, row=i, line=i + 1))
    return ([text(r, i, "sharegpt") for i, r in enumerate(share)],
            [text(r, i, "gsm8k") for i, r in enumerate(gsm)])


def _official(pool: list[str], target: list[str], folder: Path) -> np.ndarray:
    from data_selection import HashedNgramDSIR

    for name, texts in (("pool", pool), ("target", target)):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    dsir = HashedNgramDSIR([str(folder / "pool.jsonl")], [str(folder / "target.jsonl")],
                           cache_dir=str(folder / "cache"), num_proc=1)
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    dsir.compute_importance_weights()
    return np.load(folder / "cache" / "log_importance_weights" / "0.npy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=int, default=2000, help="ShareGPT conversations")
    ap.add_argument("--target", type=int, default=64, help="GSM8K problems as the target")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    pool, target = _texts(args.pool, args.target)
    chars = sum(map(len, pool))
    print(f"pool: {len(pool):,} ShareGPT conversations ({chars / len(pool):,.0f} characters "
          f"each on average); target: {len(target)} GSM8K problems")
    try:
        import data_selection  # noqa: F401
        have_official = True
    except ImportError:
        have_official = False
        print("data-selection is not installed: the official package is left out")
    variants = {"sha256 (default)": DSIROptions(sampling="top"),
                "blake2b": DSIROptions(sampling="top", hashing="blake2b")}
    times: dict[str, list[float]] = {k: [] for k in variants}
    if have_official:
        times["official package"] = []
    weights = {}
    for _ in range(args.repeats):
        for name, opts in variants.items():
            t0 = time.perf_counter()
            weights[name], _ = dsir_log_weights(pool, target, opts)
            times[name].append(time.perf_counter() - t0)
        if have_official:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                weights["official package"] = _official(pool, target, Path(tmp))
                times["official package"].append(time.perf_counter() - t0)
    base = times["sha256 (default)"]
    print(f"\n{'variant':<20} {'conv/s (median)':>16} {'time / default, per repeat':>30}")
    for name, ts in times.items():
        ratios = " ".join(f"{t / b:.2f}" for t, b in zip(ts, base, strict=True))
        print(f"{name:<20} {len(pool) / statistics.median(ts):>16,.0f} {ratios:>30}")
    if have_official:
        diff = np.max(np.abs(weights["official package"] - weights["sha256 (default)"]))
        print(f"\nlargest |official - finesift default| log weight: {diff:.2e}")


if __name__ == "__main__":
    main()
