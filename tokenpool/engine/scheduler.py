"""FCFS scheduler: packs waiting requests into a `Batch` under a token budget and a sequence cap."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
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
    """First come, first served. A request longer than the budget still runs, alone."""

    def __init__(self, max_num_batched_tokens: int, max_num_seqs: int):
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.num_waiting_tokens = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self.num_waiting_tokens += request.num_tokens

    def add_many(self, requests: Iterable[Request], num_tokens: int) -> None:
        """Queue `requests` (in order) whose token counts sum to `num_tokens`."""
        self.waiting.extend(requests)
        self.num_waiting_tokens += num_tokens

    def abort(self, request_ids: set[str]) -> None:
        """Drop queued requests (e.g. their client went away)."""
        kept = deque()
        for request in self.waiting:
            if request.request_id in request_ids:
                request.status = RequestStatus.ABORTED
                self.num_waiting_tokens -= request.num_tokens
            else:
                kept.append(request)
        self.waiting = kept

    def has_waiting(self) -> bool:
        return bool(self.waiting)

    def schedule(self) -> Batch | None:
        waiting = self.waiting
        if not waiting:
            return None
        budget, cap = self.max_num_batched_tokens, self.max_num_seqs
        picked: list[Request] = []
        append, popleft = picked.append, waiting.popleft
        tokens = 0
        while waiting and len(picked) < cap:
            n = waiting[0].num_tokens
            if picked and tokens + n > budget:
                break
            append(popleft())
            tokens += n
        self.num_waiting_tokens -= tokens
        running = RequestStatus.RUNNING
        for request in picked:
            request.status = running
        return Batch(picked)
