"""The root of every consensus failure, each with a short stable reason string.

Logs, peer handling, RPC errors and tests match on `reason` (Bitcoin Core's reject
reasons); `detail` is for humans and may change.
"""


class ConsensusError(Exception):
    """A rule was broken. `reason` is stable; `detail` explains this instance."""

    reason = "consensus"

    def __init__(self, reason: str | None = None, detail: str = "") -> None:
        if reason is not None:
            self.reason = reason
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)


class DecodeError(ConsensusError):
    """Bytes that are not the one canonical encoding of the expected object."""

    reason = "bad-encoding"
