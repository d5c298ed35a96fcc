"""Tune the benchmark's fine-tuning hyperparameters once, for random selection.

The ToV paper fixes one set of fine-tuning hyperparameters per benchmark, tuned for
random selection, and uses it for every method. A config may list a grid:

```yaml
tune: {lr: [1.0e-4, 2.0e-4, 5.0e-4], epochs: [1, 2]}   # or steps: [50, 100]
```

(also ``head_lr``, ``warmup``, and ``lora_rank``, where 0 is full fine-tuning.)

Each grid point fine-tunes a fresh model on one uniformly random subset of the pool (the
largest budget, the first seed) and is measured on the **val** set, which every method
sees anyway; the test set stays unseen. The point with the lowest val log-loss replaces
the ``finetune`` values for the whole benchmark. Finished points are kept in
``OUT/tuning.json``, so an interrupted tuning resumes.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from finesift.errors import OptionError
from finesift.evaluate.finetune import FinetuneOptions, finetune_and_evaluate

TUNABLE = ("lr", "head_lr", "epochs", "steps", "lora_rank", "warmup", "batch_size")


def check_grid(grid: Any) -> dict[str, list[Any]]:
    """Validate a ``tune`` mapping (raises :class:`OptionError`)."""
    if not isinstance(grid, dict) or not grid:
        raise OptionError(f"tune: expected a mapping like {{lr: [1.0e-4, 2.0e-4]}}; "
                          f"tunable: {', '.join(TUNABLE)}")
    out = {}
    for key, values in grid.items():
        if key not in TUNABLE:
            raise OptionError(f"tune.{key}: not tunable; tunable: {', '.join(TUNABLE)}")
        if not isinstance(values, list) or not values:
            raise OptionError(f"tune.{key}: expected a non-empty list of values")
        for v in values:  # each value must make valid options
            FinetuneOptions(**{key: v}).validate()
        out[str(key)] = list(values)
    return out


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = sorted(grid)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(grid[k] for k in keys))]


def tune_for_random(
    grid: dict[str, list[Any]],
    pool: list[Any],
    val: list[Any],
    *,
    task: str,
    model: str | None,
    base: FinetuneOptions,
    k: int,
    seed: int,
    labels: list[str] | None,
    out: Path,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> tuple[FinetuneOptions, dict[str, Any]]:
    """Return the tuned options and a summary ``{"grid", "points", "chosen", ...}``
    (``device``: where each point is fine-tuned)."""
    from finesift.store import write_json

    log = log or (lambda msg: None)
    rng = np.random.default_rng([seed, 0x7E57])
    idx = np.sort(rng.choice(len(pool), size=min(k, len(pool)), replace=False))
    train = [pool[i] for i in idx]
    path = out / "tuning.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    fingerprint = {"grid": grid, "base": base.setup_fields(),
                   "k": k, "seed": seed, "train_ids": [r.id for r in train]}
    fingerprint = json.loads(json.dumps(fingerprint, default=str))
    points = saved.get("points", {}) if saved.get("fingerprint") == fingerprint else {}
    for point in grid_points(grid):
        key = json.dumps(point, sort_keys=True)
        if key in points:
            continue
        opts = FinetuneOptions(**{**base.__dict__, **point, "seed": seed})
        log(f"tuning for random: {point} on {len(train)} random pool examples ...")
        t0 = time.perf_counter()
        res = finetune_and_evaluate(train, val, task=task, model=model, options=opts,
                                    labels=labels, measure_base=False, progress=progress,
                                    device=device)
        points[key] = {"params": point, "val_loss": res.test_loss, "val_f1": res.f1,
                       "seconds": round(time.perf_counter() - t0, 1)}
        write_json(path, {"fingerprint": fingerprint, "points": points})
    rows = [points[json.dumps(p, sort_keys=True)] for p in grid_points(grid)]
    best = min(rows, key=lambda r: r["val_loss"])
    tuned = FinetuneOptions(**{**base.__dict__, **best["params"]})
    summary = {"grid": grid, "points": rows, "chosen": best["params"], "subset_size": len(train),
               "seed": seed, "measured_on": "val"}
    return tuned, summary


def finished_tuning(out: Path, grid: dict[str, list[Any]], tuned: FinetuneOptions
                    ) -> dict[str, Any] | None:
    """The summary of a finished tuning in ``out`` (for reports written without running);
    ``None`` if ``OUT/tuning.json`` does not hold every grid point."""
    path = out / "tuning.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    points = saved.get("points", {})
    rows = [points.get(json.dumps(p, sort_keys=True)) for p in grid_points(grid)]
    if any(r is None for r in rows):
        return None
    best = min(rows, key=lambda r: r["val_loss"])
    fp = saved.get("fingerprint", {})
    return {"grid": grid, "points": rows, "chosen": best["params"],
            "subset_size": len(fp.get("train_ids", [])), "seed": fp.get("seed"),
            "measured_on": "val"}
