"""A bound on how long PostgreSQL may leave a statement unanswered.

PostgreSQL ends its own statements at lock_timeout and statement_timeout, and
the kernel drops a connection whose packets go unacknowledged
(tcp_user_timeout). Neither helps when the server stops answering while the
connection stays up: a hung backend, a stalled disk, a pooler or proxy that
accepts and holds. A call would then keep its RPC thread, and the pooled
connection, until TCP gave up many minutes later.

Each statement is registered with the time by which it must be answered: the
caller's deadline plus a grace (the database ends its lock waits at that
deadline, so a live one answers first), or at the latest the statement
timeout plus that grace. One thread per store looks every `tick` seconds and
shuts down the socket of a statement waiting past its time; psycopg2 then
fails it as a lost connection, which the store reports as STORE_UNAVAILABLE,
and the pool discards the connection.

No cancel request is sent first: psycopg2's cancel() waits for the database
without releasing the GIL, and against a silent one it stopped the whole
process. A database that is alive but slow runs a cut statement to its end
(its statement_timeout, when set), as it would have for a caller who gave up.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import psycopg2
import psycopg2.extensions

from ..domain.ports import call_deadline

log = logging.getLogger(__name__)


class SilenceWatch:
    def __init__(self, longest: float, *, grace: float = 1.0, tick: float = 0.25) -> None:
        self._longest = longest + grace
        self._grace = grace
        self._tick = tick
        # id(connection) -> (answer-by time, connection); a connection runs one
        # statement at a time. A statement's end takes the lock, so a cut cannot
        # land on the connection's next statement.
        self._waiting: dict[int, tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.cut = 0

    def cursor_factory(self) -> type[psycopg2.extensions.cursor]:
        """A cursor class whose statements this watch bounds."""
        watch = self

        class WatchedCursor(psycopg2.extensions.cursor):
            def execute(self, query: Any, vars: Any = None) -> Any:
                key = watch.begin(self.connection)
                try:
                    return super().execute(query, vars)
                finally:
                    watch.end(key)

        return WatchedCursor

    def begin(self, connection: Any) -> int:
        now = time.monotonic()
        answer_by = now + self._longest
        deadline = call_deadline.get()
        if deadline is not None:
            answer_by = min(answer_by, max(deadline, now) + self._grace)
        key = id(connection)
        self._waiting[key] = (answer_by, connection)
        if self._thread is None:
            self._start()
        return key

    def end(self, key: int) -> None:
        with self._lock:
            del self._waiting[key]

    def stop(self) -> None:
        self._stopped.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="db-silence", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._tick):
            now = time.monotonic()
            for key, entry in list(self._waiting.items()):
                if now < entry[0]:
                    continue
                with self._lock:
                    if self._waiting.get(key) is entry:  # still that statement
                        self._cut(entry[1])

    def _cut(self, connection: Any) -> None:
        try:
            with socket.socket(fileno=os.dup(connection.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except (OSError, psycopg2.Error):
            return  # already closed
        self.cut += 1
        log.error("the database left a statement unanswered; connection dropped")
