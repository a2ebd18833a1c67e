"""A bounded queue of received messages, served round-robin by sender.

The process's own loop handles one message at a time, so what it has not handled yet waits
here: this is the queue of each agent's requests at the coordinator. A plain FIFO would let one
agent that floods the coordinator fill memory and push every other agent's request behind its
own. Here each sender has a queue of at most `per_sender` messages (further ones are dropped:
`queue_full`), all queues together at most `max_bytes` (when full, the sender holding the most
loses its newest message, or the arrival is dropped if that is its own: `overload`), and `get`
takes one message from each sender in turn. A sender's own messages keep their order.

Dropping is safe because every request in the protocol is sent again until it is answered
(`resend_s`), and answered at most once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")
# What a queued message costs besides its bytes (its decoded envelope, meta dict, queue entry),
# so a flood of tiny messages is bounded by max_bytes too.
ITEM_OVERHEAD = 2048


class FairInbox(Generic[T]):
    """Thread-safe: paho's thread puts, the process's loop gets."""

    def __init__(self, per_sender: int, max_bytes: int,
                 on_drop: Callable[[str], None] = lambda reason: None):
        if per_sender < 1 or max_bytes < 1:
            raise ValueError(f"per_sender and max_bytes must be >= 1, got {per_sender}, {max_bytes}")
        self.per_sender, self.max_bytes, self.on_drop = per_sender, max_bytes, on_drop
        self.dropped: Counter[str] = Counter()
        self._queues: dict[Hashable, deque[tuple[T, int]]] = {}
        self._held: Counter[Hashable] = Counter()  # bytes queued per sender
        self._bytes = 0
        self._turns: deque[Hashable] = deque()  # senders with messages queued, next served first
        self._ready = threading.Condition()

    def __len__(self) -> int:
        with self._ready:
            return sum(len(q) for q in self._queues.values())

    def queued(self, sender: Hashable) -> int:
        with self._ready:
            return len(self._queues.get(sender, ()))

    @property
    def bytes(self) -> int:
        """What the queued messages are charged: their sizes plus ITEM_OVERHEAD each."""
        with self._ready:
            return self._bytes

    def put(self, sender: Hashable, item: T, size: int) -> bool:
        """Queue `item` (of `size` bytes) from `sender`; False if it was dropped."""
        cost = size + ITEM_OVERHEAD
        with self._ready:
            queue = self._queues.get(sender)
            if queue is not None and len(queue) >= self.per_sender:
                return self._drop("queue_full")
            while self._bytes + cost > self.max_bytes:
                victim = max(self._held, key=self._held.__getitem__, default=sender)
                # the arrival loses unless someone holds more than it would: max-min fairness
                if victim == sender or self._held[victim] <= self._held[sender] + cost:
                    return self._drop("overload")
                self._take(victim, newest=True)
                self._drop("overload")
            if queue is None:
                queue = self._queues[sender] = deque()
                self._turns.append(sender)
            queue.append((item, cost))
            self._held[sender] += cost
            self._bytes += cost
            self._ready.notify()
            return True

    def get(self, timeout: float | None = None) -> T | None:
        """The next message, from the next sender in turn; None after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while not self._turns:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._ready.wait(left)
            sender = self._turns.popleft()
            item = self._take(sender, newest=False)
            if sender in self._queues:
                self._turns.append(sender)  # its next message waits for everyone else's turn
            return item

    def _take(self, sender: Hashable, newest: bool) -> T:
        queue = self._queues[sender]
        item, cost = queue.pop() if newest else queue.popleft()
        self._held[sender] -= cost
        self._bytes -= cost
        if not queue:
            del self._queues[sender], self._held[sender]
            if newest:  # get() has already taken it off the turns
                self._turns.remove(sender)
        return item

    def _drop(self, reason: str) -> bool:
        self.dropped[reason] += 1
        self.on_drop(reason)
        return False
