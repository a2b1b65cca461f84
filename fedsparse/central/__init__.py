"""Centralised training: the recommenders (MF, NeuMF, most popular), their losses, negative sampling and
the trainer that is every federated table's reference.

May import ``data``, ``eval``, ``sparse`` and the base modules (``config``, ``rng``, ``run_files``,
``console``); never ``federation``, ``privacy`` or ``experiments``.
"""
