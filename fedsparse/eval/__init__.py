"""Evaluation: top-K ranking metrics (full ranking and sampled candidates) and how rounds are compared.

Imports nothing of fedsparse but the base modules: every trainer, central or federated, scores through it.
"""
