"""Privacy of sparse uploads: what an honest-but-curious server infers, and what defences cost.

``leakage`` scores membership guesses; ``attacks`` produces them from what the server sees;
``defences`` transforms a device's upload (padding, local DP); ``accounting`` turns the local-DP
settings into (epsilon, delta) with a maintained accountant; ``observe`` holds what the server
recorded (``fedsparse.federation.observer`` fills it in). May import ``config``, ``rng`` and ``eval``;
never ``federation`` (which uses the defences) or ``experiments``. No Flower import.
"""
