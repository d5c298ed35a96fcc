"""Batched per-example log-probs and losses, LoRA adapters, short training loops."""
