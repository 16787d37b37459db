"""Example models built on moesaic's public MoE layer."""

from .gpt import GPT, GPTConfig, unigram_baseline_loss

__all__ = ["GPT", "GPTConfig", "unigram_baseline_loss"]
