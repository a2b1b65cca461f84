"""The honest-but-curious server's record: every accepted upload of the watched devices, decoded, and
every secure sum it holds (the NMF start's cohort sums, the secure training rounds' sums) with its cohort."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedsparse.config import RunConfig
from fedsparse.federation.aggregation import needs_row_weights, scatter_active
from fedsparse.federation.messages import START, TRAIN, StartContribution
from fedsparse.federation.secure_start import SECURE_SUM
from fedsparse.federation.server_state import Server
from fedsparse.federation.wire import PayloadError, RowsDownload, RowUpdate
from fedsparse.privacy.observe import ObservedSum, ObservedUpload
from fedsparse.privacy.secure_rows import secure_round_rows


@dataclass
class UploadLog:
    """Keeps the uploads of ``users`` (all users when None), at most ``per_user`` each (the earliest),
    and counts every device's accepted uploads (for privacy accounting) and their value norms."""

    users: set[int] | None = None
    per_user: int = 1
    uploads: dict[int, list[ObservedUpload]] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    value_norms: list[float] = field(default_factory=list)  # L2 norm of each upload's delta values

    def observe(self, server_round: int, user: int, update: RowUpdate, server: Server) -> None:
        """Record one accepted upload (the engine's ``UploadObserver``)."""
        self.counts[user] = self.counts.get(user, 0) + 1
        self.value_norms.append(float(np.linalg.norm(update.values)))
        if self.users is not None and user not in self.users:
            return
        kept = self.uploads.setdefault(user, [])
        if len(kept) >= self.per_user:
            return
        rows = update.row_ids.astype(np.int64)
        deltas = scatter_active(update.values, update.carried_mask(server.item_mask))
        kept.append(ObservedUpload(server_round, user, rows, deltas, server.item_weight[rows].copy(), server.n_items))

    def all(self) -> list[ObservedUpload]:
        """Every recorded upload, ordered by user then round."""
        return [upload for user in sorted(self.uploads) for upload in self.uploads[user]]


class ObservingTransport:
    """A transport that records, next to the engine, the sums a secure-aggregation server holds.

    Wraps the in-process transport: per start round the sum of the valid start vectors, per training
    round under ``privacy.secure-aggregation`` the sum of the devices' secure vectors, read per row as the
    summed weights (when the rule sends them) or the summed delta's norm (what SecAgg+ reveals; the engine
    itself sums the same vectors). Other messages pass through unrecorded.
    """

    def __init__(self, inner, config: RunConfig, n_items: int) -> None:
        self.inner = inner
        self.config = config
        self.n_items = n_items
        self.sums: list[ObservedSum] = []
        self._start_round: tuple[int, np.ndarray, list[int]] | None = None  # the last start round's running sum

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def send(self, kind, server_round, messages, settings):
        replies = self.inner.send(kind, server_round, messages, settings)
        if kind == START:
            self._record_start(server_round, replies)
        elif kind == TRAIN and self.config.privacy.secure_aggregation:
            self._record_train(server_round, replies, next(iter(messages.values()), None))
        return replies

    def _record_start(self, server_round: int, replies) -> None:
        answers = {user: reply.arrays for user, reply in replies.items() if not isinstance(reply, str)}
        length = next((np.size(arrays[SECURE_SUM]) for arrays in answers.values() if SECURE_SUM in arrays), 0)  # public
        valid = {}
        for user, arrays in answers.items():  # the vectors the engine sums
            try:
                valid[user] = StartContribution.from_arrays(arrays, length).vector
            except PayloadError:
                continue
        if not valid:
            return
        total = np.sum([vector.astype(np.float64) for vector in valid.values()], axis=0)
        users = sorted(valid)
        # the engine may deliver a round's cohort in several batches: the server holds one sum per round
        if self._start_round is not None and self._start_round[0] == server_round:
            _, earlier_total, earlier_users = self._start_round
            total, users = total + earlier_total, sorted({*users, *earlier_users})
            self.sums.pop()
        self._start_round = (server_round, total, users)
        n = self.n_items
        # a seeded or power pass sums [n_items, k]; a refinement [n_items, k] then [k, k]: n k + k² = size
        width = total.size // n if total.size % n == 0 else int(round((-n + np.sqrt(n * n + 4 * total.size)) / 2))
        mass = np.linalg.norm(total[: self.n_items * width].reshape(self.n_items, width), axis=1)
        self.sums.append(ObservedSum("start", server_round, np.array(users, dtype=np.int64), mass))

    def _record_train(self, server_round: int, replies, message) -> None:
        """Per item row, what the round's sum says: the devices' summed row weights (how many touched it) when
        the rule sends them, else the norm of the row's summed delta (scattered on the mask the server sent)."""
        answers = [reply.arrays for reply in replies.values() if not isinstance(reply, str)]
        if not answers or message is None:
            return
        users = np.array(sorted(user for user, reply in replies.items() if not isinstance(reply, str)), dtype=np.int64)
        table = {key: value for key, value in message.items() if key == "row-ids" or key.startswith("table.")}
        _, item_mask = RowsDownload.from_arrays(table, self.n_items, self.config.model.dim).table.decode()
        rows = secure_round_rows(self.config, self.n_items, server_round, item_mask)
        rows = np.arange(self.n_items) if rows is None else rows
        mass = np.zeros(self.n_items)
        if needs_row_weights(self.config.fed.aggregation):
            mass[rows] = np.sum([arrays["secure-weights"].astype(np.float64) for arrays in answers], axis=0)
        else:
            total = np.sum([arrays["secure-values"].astype(np.float64) for arrays in answers], axis=0)
            mass[rows] = np.linalg.norm(scatter_active(total, item_mask[rows]), axis=1)
        self.sums.append(ObservedSum("train", server_round, users, mass))
