"""FCFS scheduler: packs waiting requests into a `Batch` under a token budget and a sequence cap.

Batching is decided here and nowhere else. Aborted requests (their caller went away) stay in the queue,
marked, and are skipped when they reach its head; a request marked `alone` runs in a batch of its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tokenpool.engine.request import Request, RequestStatus


@dataclass(slots=True)
class Batch:
    """Requests that run in one forward pass, packed back to back."""

    requests: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.requests)


class Scheduler:
    """First come, first served. A request longer than the budget still runs, alone.

    num_waiting_tokens: the tokens of the live (not aborted) waiting requests.
    """

    def __init__(self, max_num_batched_tokens: int, max_num_seqs: int):
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.num_waiting_tokens = 0
        self._num_live = 0

    def add_many(self, requests: list[Request], front: bool = False) -> None:
        """Queue `requests`, in order, after the waiting ones (`front`: before them)."""
        if front:
            self.waiting.extendleft(reversed(requests))
        else:
            self.waiting.extend(requests)
        tokens = sum(r.num_tokens for r in requests)
        count = len(requests)
        self.num_waiting_tokens += tokens
        self._num_live += count

    def abort(self, request: Request) -> None:
        """Mark a waiting request aborted: it is skipped, never run."""
        if request.status is RequestStatus.WAITING:
            request.status = RequestStatus.ABORTED
            self.num_waiting_tokens -= request.num_tokens
            self._num_live -= 1

    def has_waiting(self) -> bool:
        return self._num_live > 0

    def schedule(self) -> Batch | None:
        waiting = self.waiting
        budget, cap = self.max_num_batched_tokens, self.max_num_seqs
        picked: list[Request] = []
        tokens = 0
        aborted, running = RequestStatus.ABORTED, RequestStatus.RUNNING
        while waiting and len(picked) < cap:
            request = waiting[0]
            if request.status is aborted:
                waiting.popleft()
                continue
            n = request.num_tokens
            if picked and (tokens + n > budget or request.alone):
                break
            waiting.popleft()
            request.status = running
            picked.append(request)
            tokens += n
            if request.alone:
                break
        if not picked:
            return None
        self.num_waiting_tokens -= tokens
        self._num_live -= len(picked)
        return Batch(picked)
