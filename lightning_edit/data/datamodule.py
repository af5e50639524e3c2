"""The edit stream as Lightning data: batches of requests in a fixed order, resumable mid-stream.

Sequential editing (MEMIT / AlphaEdit over thousands of facts) applies one weight update per batch
of requests, and every update changes the model the next batch is computed on. So the order is
fixed (no shuffling), and a run resumed from a checkpoint must continue exactly after the last
*committed* batch: replaying a batch would write its facts twice, skipping one would never write
them. :class:`EditStreamLoader` takes that position (``applied``) from the edit ledger.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_edit.data.loaders import requests_from_records
from lightning_edit.data.requests import EditRequest
from lightning_edit.data.sources import load_records
from lightning_edit.errors import CheckpointError, InputError
from lightning_edit.resources import resolve


@dataclass
class EditBatch:
    """One batch of the edit stream.

    Attributes:
        index: position of the batch in the stream, 0-based (batch ``index`` holds requests
            ``[index * batch_size, (index + 1) * batch_size)``).
        requests: the batch's requests, in stream order (the last batch may be shorter).
    """

    index: int
    requests: list[EditRequest]

    def __len__(self) -> int:
        return len(self.requests)

    def to(self, device: Any, **kwargs: Any) -> "EditBatch":
        """No-op device transfer: the batch is text. Lightning moves a batch with
        ``apply_to_collection``, which would otherwise recurse into the frozen ``EditRequest``
        dataclasses and fail ("A frozen dataclass was passed to apply_to_collection"); an object
        with a ``to`` method is handed to that method instead."""
        return self


class _IndexedRequests(Dataset):
    """Map-style dataset: ``i -> (i, requests[i])``; the position lets collate name the batch."""

    def __init__(self, requests: Sequence[EditRequest]) -> None:
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> tuple[int, EditRequest]:
        return i, self.requests[i]


class _CollateEditBatch:
    """``[(position, request), ...] -> EditBatch``; a class (not a lambda) so loaders pickle."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def __call__(self, items: list[tuple[int, EditRequest]]) -> EditBatch:
        return EditBatch(index=items[0][0] // self.batch_size, requests=[r for _, r in items])


class _StreamBatchSampler(Sampler[list[int]]):
    """Consecutive index batches ``[b*bs, (b+1)*bs)`` for ``b = start, start+1, ...``; ``start`` (or
    ``source.position``, when a source is followed) is read when iteration begins, so a restored
    position takes effect on the next ``iter()``."""

    def __init__(self, num_requests: int, batch_size: int) -> None:
        self.num_requests = num_requests
        self.batch_size = batch_size
        self.num_batches = -(-num_requests // batch_size)  # ceil: the last batch may be short
        self.start = 0
        self.source = None  # an object with ``position`` (the edit ledger) that sets the start

    def first(self) -> int:
        return self.source.position if self.source is not None else self.start

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.first(), self.num_batches):
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_requests)))

    def __len__(self) -> int:
        return self.num_batches - self.first()


def stream_fingerprint(requests: Sequence[EditRequest]) -> str:
    """SHA-1 over each request's :meth:`~lightning_edit.data.requests.Request.fingerprint` (a
    fact's ``(case_id, prompt, subject, target_new)``), in order: two streams with the same size
    and batch size but other facts (another offset, an edited file) get different fingerprints."""
    digest = hashlib.sha1()
    for r in requests:
        digest.update("\x1f".join(r.fingerprint()).encode("utf-8"))
        digest.update(b"\x1e")
    return digest.hexdigest()


Subset = Literal["all", "tune", "heldout"]


def subset_positions(n: int, subset: Subset = "all", tune_every: int = 4, tuned: Sequence[int] = ()) -> list[int]:
    """The dataset positions of a fixed split of ``n`` records into a tuning part (every
    ``tune_every``-th record from 0, plus the positions in ``tuned``: records already used to
    choose settings) and a held-out part (all the others), so settings are chosen on one and
    reported on the other. The two never overlap and together cover every record; the split
    depends only on positions, not on ``offset`` / ``limit`` (which then count within it)."""
    if subset == "all":
        return list(range(n))
    if subset not in ("tune", "heldout"):
        raise InputError(f"subset must be 'all', 'tune' or 'heldout', got {subset!r}")
    if tune_every < 2:
        raise InputError(f"tune_every must be >= 2 (every record in the tuning part leaves none held out), got {tune_every}")
    tune = {i for i in range(0, n, tune_every)} | {int(i) for i in tuned if 0 <= int(i) < n}
    return sorted(tune) if subset == "tune" else [i for i in range(n) if i not in tune]


class EditStreamLoader(DataLoader):
    """The training stream: :class:`EditBatch` es of ``batch_size`` requests in order, resumable.

    Iteration starts at batch :attr:`applied`, the number of batches whose weight update has been
    committed. In an edit run the loader :meth:`follow` s the edit ledger, so the position is the
    ledger's and nothing else keeps a copy; on its own, :attr:`applied` is set by hand and
    :meth:`state_dict` / :meth:`load_state_dict` carry it through Lightning checkpoints (the fit
    loop saves and restores the state of a stateful train loader). Either way a resumed run
    neither re-applies nor skips a batch. ``len(loader)`` is the number of batches of the whole
    stream, whatever ``applied`` is: Lightning restores its own batch counter from the checkpoint
    and counts on from there.

    Notes:
        ``DataLoader.batch_size`` is ``None`` here (a batch sampler is used); the number of
        requests per batch is :attr:`edit_batch_size`. Single process, ``num_workers=0``. Lightning
        must not re-create this loader with a ``DistributedSampler`` (use
        ``use_distributed_sampler=False`` under DDP and shard the requests yourself).

    Args:
        requests: the validated requests, in stream order.
        batch_size: requests per sequential edit batch (>= 1).
    """

    def __init__(self, requests: Sequence[EditRequest], batch_size: int = 100) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if len(requests) == 0:
            raise InputError("an edit stream needs at least one request")
        self.requests = list(requests)
        self.edit_batch_size = batch_size
        self.fingerprint = stream_fingerprint(self.requests)
        self._stream = _StreamBatchSampler(len(self.requests), batch_size)
        super().__init__(
            _IndexedRequests(self.requests),
            batch_sampler=self._stream,
            collate_fn=_CollateEditBatch(batch_size),
            num_workers=0,
        )

    @property
    def num_requests(self) -> int:
        """Number of requests in the whole stream."""
        return self._stream.num_requests

    @property
    def num_batches(self) -> int:
        """Number of batches in the whole stream (``ceil(num_requests / batch_size)``)."""
        return self._stream.num_batches

    @property
    def applied(self) -> int:
        """Number of batches whose weight update has been committed; iteration starts here."""
        return self._stream.first()

    @applied.setter
    def applied(self, value: int) -> None:
        if self._stream.source is not None:
            raise ValueError("this stream follows an edit ledger: its position is the ledger's")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.num_batches:
            raise ValueError(f"applied must be an int in [0, {self.num_batches}], got {value!r}")
        self._stream.start = value

    def follow(self, source) -> None:
        """Take the position from ``source.position`` (the edit ledger) from now on."""
        self._stream.source = source

    def __len__(self) -> int:
        return self.num_batches

    def state_dict(self) -> dict[str, Any]:
        """``{"applied", "num_requests", "batch_size", "fingerprint"}`` (see :func:`stream_fingerprint`);
        without ``applied`` while the loader follows an edit ledger."""
        state = {
            "num_requests": self.num_requests,
            "batch_size": self.edit_batch_size,
            "fingerprint": self.fingerprint,
        }
        if self._stream.source is None:  # following a ledger, the ledger (in the same checkpoint) is the position
            state = {"applied": self.applied, **state}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :attr:`applied` from a :meth:`state_dict`.

        Raises:
            ValueError: the checkpoint was taken on another stream (number of requests, batch size
                or, when saved, the fingerprint differ): continuing would apply the wrong edits.
        """
        hint = "resuming on a different edit stream would apply the wrong edits (check dataset, limit, offset, batch_size)"
        saved_n, saved_bs = state["num_requests"], state["batch_size"]
        if saved_n != self.num_requests:
            raise CheckpointError(f"checkpoint stream has {saved_n} requests, this one {self.num_requests}: {hint}")
        if saved_bs != self.edit_batch_size:
            raise CheckpointError(f"checkpoint stream has batch_size {saved_bs}, this one {self.edit_batch_size}: {hint}")
        if "fingerprint" in state and state["fingerprint"] != self.fingerprint:
            raise CheckpointError(f"checkpoint stream holds other requests (fingerprint differs): {hint}")
        if self._stream.source is None:  # following a ledger: the position is the ledger's (restored with it)
            self.applied = state["applied"]


class EditDataModule(L.LightningDataModule):
    """Edit requests from a file or hub dataset, as a sequential training stream and eval batches.

    ``setup`` reads and validates the selected requests once, before any weight changes.
    ``train_dataloader`` is the resumable :class:`EditStreamLoader` (the same object on every call,
    so its position survives repeated ``fit`` calls); ``val_dataloader`` / ``test_dataloader``
    iterate the same requests in batches of ``eval_batch_size``. All yield :class:`EditBatch`.

    Args:
        dataset: a local .json / .jsonl / .parquet / .csv file or directory, ``factworld:<preset>/counterfact`` (or ``/zsre``), or a hub dataset id
            (see :func:`lightning_edit.data.sources.load_records`).
        format: record format: auto (detect per record), counterfact, counterfact_flat, zsre, or
            long-form (AnyEdit): unkebench, editeverything, akew (the long ``fact_new_uns``
            answers of AKEW records, which ``auto`` reads as MQuAKE facts), longform (any).
        split: split to read from a directory or a hub dataset.
        data_files: files to read, relative to a directory ``dataset``.
        batch_size: edits per sequential batch (one weight update each).
        limit: number of records to use (after ``offset``; a record with several rewrites, as in
            MQuAKE / AKEW, counts once and gives all its requests); None uses all.
        offset: number of records to skip at the start of the dataset.
        eval_batch_size: requests per evaluation batch.
        config_name: hub dataset configuration name (``load_dataset(dataset, config_name)``).
        field: for a JSON file holding one object, the key of the records array.
        subset: ``all`` records, or one part of a fixed split (:func:`subset_positions`): ``tune``
            (choose settings on it) or ``heldout`` (report on it); ``offset`` and ``limit`` then
            count records of that part.
        tune_every: every ``tune_every``-th record (from the first) belongs to the tuning part.
        tuned: positions of records already used to choose settings (they join the tuning part).
    """

    def __init__(
        self,
        dataset: str,
        format: str = "auto",
        split: str = "train",
        data_files: str | list[str] | None = None,
        batch_size: int = 100,
        limit: int | None = None,
        offset: int = 0,
        eval_batch_size: int = 64,
        config_name: str | None = None,
        field: str | None = None,
        subset: Subset = "all",
        tune_every: int = 4,
        tuned: list[int] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size < 1:
            raise InputError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        if offset < 0:
            raise InputError(f"offset must be >= 0, got {offset}")
        if limit is not None and limit < 1:
            raise InputError(f"limit must be >= 1 or None, got {limit}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.format = format
        self.split = split
        self.data_files = data_files
        self.batch_size = batch_size
        self.limit = limit
        self.offset = offset
        self.eval_batch_size = eval_batch_size
        # not ``self.name``: LightningDataModule already has a ``name`` attribute
        self.config_name = config_name
        self.field = field
        self.subset, self.tune_every, self.tuned = subset, tune_every, list(tuned or [])
        subset_positions(0, subset, tune_every)  # a bad subset / tune_every fails here, not after loading
        self.requests: list[EditRequest] = []
        self._loaded = False
        self._train_loader: EditStreamLoader | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load and validate requests ``[offset, offset + limit)`` (once, for every stage).

        Records past the window are not converted, so a bad record outside it does not stop a run.

        Raises:
            RequestError: a record in the window cannot be edited.
            ValueError: the window is empty.
        """
        if self._loaded:
            return

        records = load_records(
            resolve(self.dataset), split=self.split, data_files=self.data_files, name=self.config_name, field=self.field
        )
        # offset / limit count *records*: a record with several rewrites (MQuAKE / AKEW chains)
        # is kept or dropped whole
        stop = None if self.limit is None else self.offset + self.limit
        positions = subset_positions(len(records), self.subset, self.tune_every, self.tuned)[self.offset:stop]
        self.requests = requests_from_records([records[i] for i in positions], self.format, indices=positions)
        if not self.requests:
            part = f" ({self.subset} part: {len(subset_positions(len(records), self.subset, self.tune_every, self.tuned))})" \
                if self.subset != "all" else ""
            raise InputError(
                f"no edit requests in {self.dataset!r} (split {self.split!r}) after offset={self.offset}, "
                f"limit={self.limit}: it holds {len(records)} records{part}"
            )
        self._loaded = True

    def outside_requests(self, n: int) -> list[EditRequest]:
        """Up to ``n`` requests from records of the same part of the split (``subset``) that the
        stream does not hold: the ones after its window first, then those before it. For
        locality: never edited, and for a held-out run never used to choose settings either."""
        if n <= 0:
            return []
        records = load_records(
            resolve(self.dataset), split=self.split, data_files=self.data_files, name=self.config_name, field=self.field
        )
        part = subset_positions(len(records), self.subset, self.tune_every, self.tuned)
        stop = len(part) if self.limit is None else min(len(part), self.offset + self.limit)
        positions = (part[stop:] + part[: self.offset])[:n]
        return requests_from_records([records[i] for i in positions], self.format, indices=positions) if positions else []

    def _require_requests(self) -> list[EditRequest]:
        if not self._loaded:
            self.setup()
        return self.requests

    def train_dataloader(self) -> EditStreamLoader:
        """The resumable, ordered edit stream (batches of ``batch_size``)."""
        if self._train_loader is None:
            self._train_loader = EditStreamLoader(self._require_requests(), self.batch_size)
        return self._train_loader

    def _eval_loader(self) -> DataLoader:
        return DataLoader(
            _IndexedRequests(self._require_requests()),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=_CollateEditBatch(self.eval_batch_size),
            num_workers=0,
        )

    def val_dataloader(self) -> DataLoader:
        """All requests in order, in batches of ``eval_batch_size`` (:class:`EditBatch`)."""
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        """All requests in order, in batches of ``eval_batch_size`` (:class:`EditBatch`)."""
        return self._eval_loader()
