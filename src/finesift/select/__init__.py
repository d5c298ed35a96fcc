"""Budgets and selection strategies: turn scores into a subset (no models here)."""

from finesift.select.strategies import STRATEGIES, parse_budget, select_indices

__all__ = ["STRATEGIES", "parse_budget", "select_indices"]
