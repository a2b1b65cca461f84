"""Device-side defences of an upload: fake-item padding and local DP (clip, then noise).

Padding (FedRec's hybrid filling) picks items outside the user's training set (outside everything it
rated under ``train.negatives-from = unrated``) and trains them as if
they were positives, so their deltas look like real ones; it costs bytes (more rows) and accuracy
(wrong positives). Local DP clips the upload's values to a norm bound and adds Gaussian or Laplace
noise; it hides values, not the row ids.
"""

from __future__ import annotations

import numpy as np

from fedsparse.privacy.accounting import MECHANISMS


def padding_count(ratio: float, positives: int) -> int:
    """Fake rows for ``positives`` real ones: round(ratio * positives), halves rounded up."""
    return int(np.floor(ratio * positives + 0.5))


def sample_padding(rng: np.random.Generator, pool: np.ndarray, excluded: np.ndarray, count: int) -> np.ndarray:
    """``count`` distinct items of ``pool`` (sorted int64 ids), sorted, none of them in ``excluded`` (the
    user's items padding may not use); every such item when fewer remain (a heavy user pads with all it can)."""
    candidates = np.setdiff1d(pool, excluded)
    return np.sort(rng.choice(candidates, size=min(count, candidates.size), replace=False))


def clip_and_noise(
    values: np.ndarray, mechanism: str, clip_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """``values`` float32 [n] scaled down to norm <= ``clip_norm`` (L2 for gaussian, L1 for laplace),
    plus i.i.d. noise of scale ``noise_multiplier * clip_norm`` (std for gaussian, b for laplace)."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown local-DP mechanism {mechanism!r}; known: {', '.join(MECHANISMS)}")
    values = values.astype(np.float64)
    norm = np.abs(values).sum() if mechanism == "laplace" else np.linalg.norm(values)
    if norm > clip_norm:
        values = values * (clip_norm / norm)
    scale = noise_multiplier * clip_norm
    noise = rng.laplace(0.0, scale, values.shape) if mechanism == "laplace" else rng.normal(0.0, scale, values.shape)
    return (values + noise).astype(np.float32)
