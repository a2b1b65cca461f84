"""Run every attack on the recorded uploads and average the leakage metrics per user.

The value attack needs labelled shadow uploads: a seeded half of the watched devices plays the
attacker's shadow devices (a strong attacker who can simulate devices like the real ones), the other
half are the targets every attack is scored on.
"""

from __future__ import annotations

import numpy as np

from fedsparse.config import RunConfig
from fedsparse.privacy.attacks import ValueAttack, differencing_guess, imia_guess, row_id_guess
from fedsparse.privacy.leakage import mean_metrics, membership_metrics, random_guess_metrics
from fedsparse.privacy.observe import ObservedSum, ObservedUpload
from fedsparse.rng import rng_for

ATTACKS = ("row-id", "value", "imia")
CONTROL_DEVICES = 50  # devices outside every sum that a sum attack's control scores (a seeded draw)


def shadow_split(seed: int, users: np.ndarray, shadow_fraction: float = 0.5) -> set[int]:
    """The seeded share of the watched ``users`` that plays the attacker's labelled shadow devices; the rest
    are the targets every attack is scored on."""
    rng = rng_for(seed, "privacy-shadow")
    return set(rng.choice(users, size=int(round(shadow_fraction * users.size)), replace=False).tolist())


def sum_attack(
    sums: list[ObservedSum], members_of: dict[int, np.ndarray], n_items: int, predicted: int, seed: int,
    strata: np.ndarray | None = None, shadow_fraction: float = 0.5, controls: int = CONTROL_DEVICES,
) -> dict[str, float]:
    """The differencing attack on secure sums (``differencing_guess``), its direction learnt on shadow devices.

    Whether a user's items carry more or less row mass in the sums it joined is the data's, not the attacker's
    choice (under secure rows, a device's own items are never its sampled negatives), so the attacker orients
    its scores by the mean AUC of its shadow devices (``sign`` -1 below 0.5) and is scored on the targets:
    {auc, f1, sign} over the target devices that joined a sum (NaN when none did or no sum was held).

    ``auc_outside`` is the control: each target's scores depend on the user only through which sums it joined,
    so the same scores are also read against the items of up to ``controls`` devices of ``members_of`` that
    joined no sum (a seeded draw). What the sums say of everyone (item popularity) scores there as well; only
    ``auc`` above it comes from the members' own contributions (NaN when every device joined a sum);
    ``auc_matched_outside`` is the same control under the popularity-matched AUC."""
    joined = {int(user) for item in sums for user in item.users.tolist()}
    users = np.array(sorted(user for user in members_of if user in joined))
    if users.size < 2:
        return {"auc": np.nan, "auc_matched": np.nan, "f1": np.nan, "sign": np.nan, "auc_outside": np.nan,
                "auc_matched_outside": np.nan}
    shadow = shadow_split(seed, users, shadow_fraction)
    everything = np.arange(n_items)
    outside = np.array(sorted(user for user in members_of if user not in joined), dtype=np.int64)
    if outside.size > controls:
        outside = np.sort(rng_for(seed, "privacy-controls").choice(outside, size=controls, replace=False))

    def scored(group: list[int], sign: int, controlled: np.ndarray) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
        metrics: list[dict[str, float]] = []
        control: list[dict[str, float]] = []
        for user in group:
            guess = differencing_guess(sums, user, predicted, sign)
            if guess is not None:
                metrics.append(membership_metrics(guess, members_of[user], everything, strata))
                control.extend(membership_metrics(guess, members_of[int(other)], everything, strata) for other in controlled)
        return metrics, control

    shadow_auc = mean_metrics(scored(sorted(shadow), 1, outside[:0])[0])["auc"]  # the shadow half learns the sign only
    sign = -1 if shadow_auc < 0.5 else 1
    target_metrics, control = scored([int(user) for user in users if int(user) not in shadow], sign, outside)
    targets, outside_means = mean_metrics(target_metrics), mean_metrics(control)
    return {"auc": targets["auc"], "auc_matched": targets["auc_matched"], "f1": targets["f1"], "sign": float(sign),
            "auc_outside": outside_means["auc"], "auc_matched_outside": outside_means["auc_matched"]}


def evaluate_attacks(
    config: RunConfig, uploads: list[ObservedUpload], members_of: dict[int, np.ndarray],
    strata: np.ndarray | None = None, shadow_fraction: float = 0.5,
) -> dict[str, dict[str, float]]:
    """{attack or "random": mean metrics over target uploads}. ``members_of`` maps a user to its training
    items; ``config`` is the run's (the protocol, which the server knows, and the seed); ``strata``: the
    items' popularity strata of the matched AUC (``leakage.popularity_strata``; NaN without them)."""
    seed = config.seed
    users = np.array(sorted({upload.user for upload in uploads}))
    shadow_users = shadow_split(seed, users, shadow_fraction)
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
            per_attack[name].append(membership_metrics(guess, members, upload.rows, strata))
        per_attack["random"].append(random_guess_metrics(upload.n_items, members.size, upload.rows.size))
    summary = {name: mean_metrics(rows) for name, rows in per_attack.items()}
    for name in summary:
        summary[name]["targets"] = float(len(targets))
    return summary
