"""Evaluation harness: fine-tune on a selected subset, measure test metrics, run benchmarks.

* :mod:`finesift.evaluate.finetune`: LoRA fine-tune a fresh model on a subset and report
  test log-loss (plus entity F1 for NER, exact match for GSM8K-style records).
* :mod:`finesift.evaluate.overlap`: exact-duplicate guard between test, val and pool.
* :mod:`finesift.evaluate.bench`: method x budget x seed benchmark runs, resumable.
* :mod:`finesift.evaluate.auto`: ``--method auto``, candidate methods tried on folds of
  the target (select, short fine-tune, held-out loss), then the winner's selection.
* :mod:`finesift.evaluate.report`: Markdown and self-contained HTML reports.
* :mod:`finesift.evaluate.suites`: data for the shipped benchmark suites.
"""
