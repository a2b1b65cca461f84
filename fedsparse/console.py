"""What a person reads in a terminal: one short line per round and a short summary table.

The full records stay in the run directory (``rounds.jsonl``, ``summary.json``); these lines only pick
the headline numbers. ``ROUND_LINE`` parses a round line back, so a progress bar can follow a run it
sees only as text (``flwr run``'s log stream).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

BYTES_PER_KB = 1000
BYTE_UNITS = ("B", "KB", "MB", "GB", "TB")  # decimal: each 1,000 times the one before
ROUND_LINE = re.compile(r"^round (\d+)/(\d+): ")
SUMMARY_HEADER = "summary (every figure: summary.json in the run directory)"
SAMPLED_HR = "sampled_hr@10"  # HR@10 of the leave-one-out protocol with sampled negatives (data.split = loo)


def round_line(record: Mapping[str, Any], total_rounds: int) -> str:
    """``round 3/20: 94 devices (2 failed), Recall@20 0.1234, NDCG@20 0.0567, upload 12.3 KB, 4.2 s``.

    HR@10 appears when the sampled protocol ran; rounds without evaluation say so. ``upload`` is the
    mean bytes one device sent in the round (KB = 1,000 bytes)."""
    failed = record.get("failed_clients", 0) + record.get("dropped_updates", 0)
    parts = [f"{record['clients']} devices" + (f" ({failed} failed or dropped)" if failed else "")]
    if "recall@20" in record:
        parts += [f"Recall@20 {record['recall@20']:.4f}", f"NDCG@20 {record['ndcg@20']:.4f}"]
        if SAMPLED_HR in record:
            parts.append(f"HR@10 {record[SAMPLED_HR]:.4f}")
        if "unseen_recall@20" in record:  # devices held out of training (fed.unseen-users), evaluated apart
            parts.append(f"unseen Recall@20 {record['unseen_recall@20']:.4f}"
                         + (f" HR@10 {record['unseen_' + SAMPLED_HR]:.4f}" if f"unseen_{SAMPLED_HR}" in record else ""))
    else:
        parts.append("not evaluated")
    parts += [f"upload {record['upload_bytes_mean'] / BYTES_PER_KB:.1f} KB", f"{record['seconds']:.1f} s"]
    return f"round {record['round']}/{total_rounds}: " + ", ".join(parts)


def _number(key: str, digits: int = 4) -> Callable[[Mapping[str, Any]], str | None]:
    return lambda summary: f"{summary[key]:.{digits}f}" if summary.get(key) is not None else None


def byte_size(count: float) -> str:
    """``534 B``, ``12.3 KB``, ``4.56 MB``: three significant figures in the largest unit below ``count``."""
    unit = 0
    while abs(count) >= BYTES_PER_KB and unit < len(BYTE_UNITS) - 1:
        count /= BYTES_PER_KB
        unit += 1
    return f"{count:.0f} B" if unit == 0 else f"{count:.3g} {BYTE_UNITS[unit]}"


def _bytes(key: str) -> Callable[[Mapping[str, Any]], str | None]:
    return lambda summary: byte_size(summary[key]) if key in summary else None


def _best(summary: Mapping[str, Any]) -> str | None:
    if summary.get("best_validation_round") is None:
        return None
    recall = summary.get("best_test_recall@20")
    return f"{summary['best_validation_round']}" + (f" (test Recall@20 there {recall:.4f})" if recall is not None else "")


def _unseen(summary: Mapping[str, Any]) -> str | None:
    """``10 devices: Recall@20 0.1234, HR@10 0.5000`` of the devices held out of training, at the last round."""
    if summary.get("unseen_recall@20") is None:
        return None
    hr = summary.get(f"unseen_{SAMPLED_HR}")
    return (f"{summary.get('unseen_users')} devices: Recall@20 {summary['unseen_recall@20']:.4f}"
            + (f", HR@10 {hr:.4f}" if hr is not None else ""))


def _seconds(summary: Mapping[str, Any]) -> str | None:
    seconds = summary.get("seconds", summary.get("total_seconds"))
    return f"{seconds:.1f}" if seconds is not None else None


def _phases(summary: Mapping[str, Any]) -> str | None:
    """Mean wire bytes per device (down + up) of each phase: start / training / evaluation."""
    keys = [f"wire_{phase}_both_bytes_per_device_mean" for phase in ("start", "train", "evaluate")]
    return " / ".join(byte_size(summary[key]) for key in keys) if all(key in summary for key in keys) else None


# (label, how to show it from summary.json; None = the summary lacks it and the row is left out)
SUMMARY_ROWS: list[tuple[str, Callable[[Mapping[str, Any]], str | None]]] = [
    ("rounds", lambda s: str(s["rounds"]) if "rounds" in s else None),
    ("epochs", lambda s: f"{s['epochs_run']} (best {s['best_epoch']})" if "epochs_run" in s else None),
    ("policy", lambda s: s.get("policy")),
    ("density", _number("density", 3)),
    ("Recall@20 (test, final)", _number("recall@20")),
    ("NDCG@20 (test, final)", _number("ndcg@20")),
    ("HR@10 (sampled, final)", _number(SAMPLED_HR)),
    ("best validation round", _best),
    ("held out of training (final)", _unseen),
    ("per device, whole run, on the wire", _bytes("wire_total_both_bytes_per_device_mean")),
    ("  start / training / evaluation", _phases),
    ("upload payload, all devices, training", _bytes("total_upload_bytes")),
    ("download payload, all devices, training", _bytes("total_download_bytes")),
    ("seconds", _seconds),
]


def summary_table(summary: Mapping[str, Any], run_dir: object) -> str:
    """A few aligned ``label  value`` lines of a run's summary, then where the full records are."""
    rows = [(label, shown) for label, show in SUMMARY_ROWS if (shown := show(summary)) is not None]
    rows.append(("run directory", str(run_dir)))
    width = max(len(label) for label, _ in rows)
    lines = [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join([SUMMARY_HEADER, *lines])


def dataset_line(name: str, counts: Mapping[str, int], seconds: float) -> str:
    """``dataset ml-100k: 943 users, 1,682 items, 80,000 train interactions (1.2 s)``."""
    return (f"dataset {name}: {counts['users']:,} users, {counts['items']:,} items, "
            f"{counts['train']:,} train interactions ({seconds:.1f} s)")
