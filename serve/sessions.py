"""Encoded videos kept for follow-up questions: an LRU bounded by the bytes they hold, and
their scenes' KV kept resident in host memory under a second budget.

Sessions of one pipeline share its LLM cache: the one that used it last is *resident*
and answers a follow-up after only its question's tokens. Any other is made resident again
from the cheapest source: its scene's KV held in memory (a copy), else its stored scene
(``loc3r.runtime.scene_store``: read, verified, copied), else one prefill of its prefix from
its encoded frames (:meth:`VideoSession.reclaim_cache`). The KV of a complete video is
snapshotted when another takes the LLM cache; least recently used snapshots beyond
``kv_budget_bytes`` are spilled to the scene store (written if it lacks them) and dropped.
Only the model's worker thread calls this store.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable

from loc3r.runtime.scene_store import Scene
from loc3r.runtime.session import VideoSession

log = logging.getLogger(__name__)
SOURCES = ("memory", "store", "prefill")  # where a reclaimed session's prefix came from


def session_bytes(session: VideoSession) -> int:
    """Memory held by a session's encoded frames (its BEV points, 2 floats per vision
    token against the LLM width, are left out)."""
    return sum(block.nbytes for block in session.encoded.blocks)


class SessionStore:
    """Least recently used sessions first out, once their bytes exceed ``budget_bytes``;
    resident scenes' KV first out once theirs exceed ``kv_budget_bytes``.

    ``load_scene(session)`` reads a session's stored scene (None when there is none);
    ``spill(session, scene)`` stores one that leaves memory."""

    def __init__(
        self, budget_bytes: int, kv_budget_bytes: int = 0,
        load_scene: Callable[[VideoSession], Scene | None] = lambda session: None,
        spill: Callable[[VideoSession, Scene], None] = lambda session, scene: None,
    ) -> None:
        self.budget_bytes, self.kv_budget_bytes = budget_bytes, kv_budget_bytes
        self._sessions: OrderedDict[Hashable, VideoSession] = OrderedDict()
        self._kv: OrderedDict[Hashable, Scene] = OrderedDict()
        self._load_scene, self._spill = load_scene, spill
        self.resident: VideoSession | None = None
        self.sources = dict.fromkeys(SOURCES, 0)

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
        self._leave_resident()
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        self.resident = session
        return self.evict(pinned | {key})

    @property
    def resident_key(self) -> Hashable | None:
        """The key of the session whose prefix the LLM cache holds."""
        return self._key_of(self.resident)

    def make_resident(self, session: VideoSession) -> str | None:
        """Put ``session``'s prefix in the LLM cache; None if it was there, else where it came
        from (``memory``, ``store`` or ``prefill``)."""
        if self.resident is session:
            return None
        key = self._key_of(session)
        scene = self._kv.get(key)
        if scene is not None:
            self._kv.move_to_end(key)  # before the leaving session's KV is held, which may spill the least recent
        self._leave_resident()
        source = "memory"
        if scene is None and session.duration_s is not None:
            scene, source = self._load_scene(session), "store"
        if scene is None:
            session.reclaim_cache()
            source = "prefill"
        else:
            session.reclaim_cache(scene)
            if key is not None:
                self._hold(key, scene)
        self.resident = session
        self.sources[source] += 1
        return source

    def prepare_open(self) -> None:
        """Before a new video takes the LLM cache: keep the resident scene's KV."""
        self._leave_resident()
        self.resident = None

    def remove(self, key: Hashable) -> None:
        session = self._sessions.pop(key, None)
        self._kv.pop(key, None)
        if session is not None and session is self.resident:
            self.resident = None

    def total_bytes(self) -> int:
        return sum(session_bytes(s) for s in self._sessions.values())

    def kv_bytes(self) -> int:
        return sum(scene.nbytes for scene in self._kv.values())

    def resident_scenes(self) -> list[str]:
        """Sources of the sessions whose KV is held in memory, least recently used first."""
        return [self._sessions[key].source for key in self._kv if key in self._sessions]

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

    def _key_of(self, session: VideoSession | None) -> Hashable | None:
        return next((key for key, kept in self._sessions.items() if kept is session), None)

    def _leave_resident(self) -> None:
        """The resident session (a complete video) gives up the LLM cache: hold its KV."""
        session, key = self.resident, self.resident_key
        if session is None or key is None or session.duration_s is None or self.kv_budget_bytes <= 0:
            return
        if key in self._kv:
            self._kv.move_to_end(key)
            return
        self._hold(key, session.scene())

    def _hold(self, key: Hashable, scene: Scene) -> None:
        """Keep ``scene`` in memory as the most recent; spill the least recent beyond the budget."""
        self._kv[key] = scene
        self._kv.move_to_end(key)
        total = self.kv_bytes()
        for old in list(self._kv):
            if total <= self.kv_budget_bytes:
                break
            spilled = self._kv.pop(old)
            total -= spilled.nbytes
            if old in self._sessions:
                self._spill(self._sessions[old], spilled)
