"""The edit stream: :class:`EditStream` (the one place a batch becomes a weight update), its
:class:`~lightning_edit.stream.ledger.EditLedger` and the PEFT export of its edits."""

from lightning_edit.stream.edit_stream import SINGLE_PROCESS, Collective, EditStream

__all__ = ["SINGLE_PROCESS", "Collective", "EditStream"]
