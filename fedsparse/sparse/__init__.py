"""Sparse embedding tables and how they learn: masks, row gradients, masked optimisers, compact storage,
per-row embedding sizes, the NMF that seeds SparseRec's mask, BET's size search and the mask policies.

Owns every operation on one (possibly masked) embedding table. May import ``config``, ``rng`` and
``run_files``; never ``central``, ``federation``, ``privacy`` or ``experiments``.
"""
