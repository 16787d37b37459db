"""Optimizer-side code: parameter groups built from parameter identity."""
