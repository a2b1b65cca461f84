"""Run every attack on the recorded uploads and average the leakage metrics per user.

The value attack needs labelled shadow uploads: a seeded half of the watched devices plays the
attacker's shadow devices (a strong attacker who can simulate devices like the real ones), the other
half are the targets every attack is scored on.
"""

from __future__ import annotations

import numpy as np

from fedsparse.config import RunConfig
from fedsparse.privacy.attacks import ValueAttack, imia_guess, row_id_guess
from fedsparse.privacy.leakage import mean_metrics, membership_metrics, random_guess_metrics
from fedsparse.privacy.observe import ObservedUpload
from fedsparse.rng import rng_for

ATTACKS = ("row-id", "value", "imia")


def evaluate_attacks(
    config: RunConfig, uploads: list[ObservedUpload], members_of: dict[int, np.ndarray], shadow_fraction: float = 0.5
) -> dict[str, dict[str, float]]:
    """{attack or "random": mean metrics over target uploads}. ``members_of`` maps a user to its training
    items; ``config`` is the run's (the protocol, which the server knows, and the seed)."""
    seed = config.seed
    users = np.array(sorted({upload.user for upload in uploads}))
    rng = rng_for(seed, "privacy-shadow")
    shadow_users = set(rng.choice(users, size=int(round(shadow_fraction * users.size)), replace=False).tolist())
    shadow = [upload for upload in uploads if upload.user in shadow_users]
    targets = [upload for upload in uploads if upload.user not in shadow_users]
    if not shadow or not targets:
        raise ValueError(f"need uploads of at least two devices to split shadow and targets, got {users.size}")
    value_attack = ValueAttack(seed).fit(shadow, [members_of[upload.user] for upload in shadow])
    per_attack: dict[str, list[dict[str, float]]] = {name: [] for name in (*ATTACKS, "random")}
    for upload in targets:
        members = members_of[upload.user]
        guesses = {
            "row-id": row_id_guess(upload),
            "value": value_attack.guess(upload),
            "imia": imia_guess(
                upload, rng_for(seed, "privacy-imia", upload.user, upload.server_round),
                config.fed.item_optimizer, config.train.l2_reg,
            ),
        }
        for name, guess in guesses.items():
            per_attack[name].append(membership_metrics(guess, members, upload.rows))
        per_attack["random"].append(random_guess_metrics(upload.n_items, members.size, upload.rows.size))
    summary = {name: mean_metrics(rows) for name, rows in per_attack.items()}
    for name in summary:
        summary[name]["targets"] = float(len(targets))
    return summary
