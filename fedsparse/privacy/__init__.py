"""Privacy of sparse uploads: what an honest-but-curious server infers, and what defences cost.

``leakage`` scores membership guesses; ``attacks`` produces them from what the server sees;
``defences`` transforms a device's upload (padding, local DP); ``accounting`` turns the local-DP
settings into (epsilon, delta) with a maintained accountant. No Flower import.
"""
