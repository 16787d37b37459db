"""Example models built on moesaic's public MoE layer."""

from .gpt import GPT, GPTConfig, check_gpt_fields, unigram_baseline_loss

__all__ = ["GPT", "GPTConfig", "check_gpt_fields", "unigram_baseline_loss"]
