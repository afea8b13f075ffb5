"""Encoded videos kept for follow-up questions: an LRU bounded by the bytes they hold.

Sessions of one pipeline share its LLM cache: the one that used it last is *resident*
and answers a follow-up after only its question's tokens; any other is made resident
again with :meth:`VideoSession.reclaim_cache` (one prefill of its prefix, no decoding
or encoding). Only the model's worker thread calls this store.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from loc3r.runtime.session import VideoSession


def session_bytes(session: VideoSession) -> int:
    """Memory held by a session's encoded frames (its BEV points, 2 floats per vision
    token against the LLM width, are left out)."""
    return sum(block.nbytes for block in session.encoded.blocks)


class SessionStore:
    """Least recently used sessions first out, once their bytes exceed ``budget_bytes``."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._sessions: OrderedDict[Hashable, VideoSession] = OrderedDict()
        self.resident: VideoSession | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key: Hashable) -> VideoSession | None:
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
        return session

    def add(self, key: Hashable, session: VideoSession, pinned: frozenset[Hashable] = frozenset()) -> int:
        """Keep ``session`` (it holds the LLM cache now); evict what no longer fits and
        return how many sessions that was."""
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        self.resident = session
        return self.evict(pinned | {key})

    @property
    def resident_key(self) -> Hashable | None:
        """The key of the session whose prefix the LLM cache holds."""
        return next((key for key, session in self._sessions.items() if session is self.resident), None)

    def make_resident(self, session: VideoSession) -> bool:
        """Put ``session``'s prefix in the LLM cache; True if it had to be refilled."""
        if self.resident is session:
            return False
        session.reclaim_cache()
        self.resident = session
        return True

    def remove(self, key: Hashable) -> None:
        session = self._sessions.pop(key, None)
        if session is not None and session is self.resident:
            self.resident = None

    def total_bytes(self) -> int:
        return sum(session_bytes(s) for s in self._sessions.values())

    def evict(self, keep: frozenset[Hashable]) -> int:
        """Drop least recently used sessions (never those in ``keep``) until within budget;
        return how many were dropped."""
        total, dropped = self.total_bytes(), 0
        for key in list(self._sessions):
            if total <= self.budget_bytes:
                break
            if key in keep:
                continue
            total -= session_bytes(self._sessions[key])
            self.remove(key)
            dropped += 1
        return dropped
