"""Does measuring test losses in bf16 change what a benchmark concludes?

For one suite config this fine-tunes a fresh model on a uniformly random pool subset (the
largest budget, the suite's fine-tuning settings) and measures the untouched and the
fine-tuned model on the whole test set twice, in fp32 and in bf16, timing each pass. It
prints, side by side from the same run:

* per test example, the largest and mean absolute difference of the bf16 loss from fp32;
* the fine-tuned model's improvement over the untouched one in each precision, with a
  95% paired bootstrap interval over test examples (the resolution at which a benchmark
  can tell two models apart), and the shift the precision causes in that improvement;
* the seconds of each pass and their ratio.

bf16 is fit for a benchmark when the shift is small against the interval's half width.

    python benchmarks/eval_precision.py --config benchmarks/instruct-gsm8k.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="benchmarks/instruct-gsm8k.yaml")
    p.add_argument("--out", default="runs/eval-precision")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="fine-tuning lr (default: the config's)")
    p.add_argument("--json", default=None, help="also append the figures to this JSONL file")
    args = p.parse_args(argv)

    import torch

    from finesift.engine.scoring import example_losses
    from finesift.engine.tasks import task_for
    from finesift.engine.train import LoraOptions, TrainOptions, add_lora, train
    from finesift.evaluate.bench import load_config, prepare_data
    from finesift.evaluate.finetune import _encode, label_names
    from finesift.evaluate.stats import bootstrap_improvement
    from finesift.models.loader import load_model
    from finesift.select.strategies import parse_budget

    cfg = load_config(args.config)
    out = Path(args.out)
    data = prepare_data(cfg, out)
    ft = cfg.finetune
    lr = args.lr or ft.lr
    k = max(parse_budget(b, len(data.pool)) for b in cfg.budgets)
    rng = np.random.default_rng([args.seed, 0xE7A1])
    train_recs = [data.pool[i] for i in np.sort(rng.choice(len(data.pool), k, replace=False))]
    labels = label_names(cfg.task, cfg.model, [data.pool, data.val, data.test])
    bundle = load_model(cfg.model, cfg.task, labels=labels, seed=args.seed)
    net, tok = bundle.model, bundle.tokenizer
    label2id = None
    if cfg.task == "ner":
        label2id = {net.config.id2label[i]: i for i in range(net.config.num_labels)}
    train_ex, _ = _encode(train_recs, tok, cfg.task, ft.max_length, label2id, "train")
    test_ex, _ = _encode(data.test, tok, cfg.task, ft.max_length, label2id, "test")
    task = task_for(cfg.task, tok)

    def measure(model, precision):
        t0 = time.perf_counter()
        losses = example_losses(model, task, test_ex, batch_size=ft.eval_batch_size,
                                precision=precision)
        return losses, time.perf_counter() - t0

    figures = {"config": cfg.name, "n_test": len(test_ex), "n_train": len(train_ex),
               "threads": torch.get_num_threads()}
    base = {prec: measure(net, prec) for prec in ("fp32", "bf16")}
    opts = TrainOptions(lr=lr, epochs=ft.epochs, batch_size=ft.batch_size)
    if ft.steps is not None:
        opts.max_steps = ft.steps
        opts.epochs = ft.steps / -(-len(train_ex) // ft.batch_size)
    net = add_lora(net, cfg.task, LoraOptions(rank=ft.lora_rank, alpha=2 * ft.lora_rank),
                   seed=args.seed)
    train(net, task, train_ex, opts, seed=args.seed, precision=ft.precision)
    tuned = {prec: measure(net, prec) for prec in ("fp32", "bf16")}
    for name, runs in (("untouched", base), ("fine-tuned", tuned)):
        d = np.abs(runs["bf16"][0] - runs["fp32"][0])
        figures[name] = {
            "mean_loss_fp32": float(runs["fp32"][0].mean()),
            "mean_loss_bf16": float(runs["bf16"][0].mean()),
            "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "seconds_fp32": round(runs["fp32"][1], 2), "seconds_bf16": round(runs["bf16"][1], 2),
            "fp32_over_bf16_time": round(runs["fp32"][1] / runs["bf16"][1], 2),
        }
    for prec in ("fp32", "bf16"):
        est = bootstrap_improvement(base[prec][0][None, :], tuned[prec][0][None, :], seed=0)
        figures[f"improvement_{prec}"] = est
    shift = figures["improvement_bf16"]["mean"] - figures["improvement_fp32"]["mean"]
    half = (figures["improvement_fp32"]["high"] - figures["improvement_fp32"]["low"]) / 2
    figures["improvement_shift_pct_points"] = shift
    figures["interval_half_width_pct_points"] = half
    print(json.dumps(figures, indent=2))
    print(f"\nimprovement over the untouched model: fp32 "
          f"{figures['improvement_fp32']['mean']:+.2f}% "
          f"[{figures['improvement_fp32']['low']:+.2f}, {figures['improvement_fp32']['high']:+.2f}]"
          f", bf16 {figures['improvement_bf16']['mean']:+.2f}%; shift {shift:+.3f} points "
          f"against a 95% half width of {half:.2f}", file=sys.stderr)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"suite": cfg.name, **figures}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
