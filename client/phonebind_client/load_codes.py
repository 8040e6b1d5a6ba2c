"""The handset side of phonebind-load: the one-time codes sent to its numbers.

Codes arrive from the file gateway's JSON lines (:class:`SmsFileReader`), or
as the http gateway's POSTs to a small sink the tool runs itself
(:class:`SmsSink`). Either hands each code to a :class:`CodeBook`, indexed by
number, which wakes the flow waiting for it. All of it runs on one process's
event loop, except the sink's HTTP thread, which hands codes over with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

__all__ = ["CodeBook", "FileRelay", "SmsFileReader", "SmsSink", "split_address"]

PURPOSE_CODE = "REBIND_CODE"
_CODE = re.compile(r"(?<![0-9])([0-9]{6,10})(?![0-9])")
# The destination of a JSON line, found without parsing the whole line.
_TO = re.compile(rb'"to"\s*:\s*"([^"\\]{1,32})"')
_LARGEST_SMS = 64 * 1024  # a POST or a line larger than this is no SMS


def split_address(address: str) -> tuple[str, int]:
    """HOST and PORT of ``HOST:PORT`` (``[::1]:PORT`` for IPv6)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("must be HOST:PORT")
    return host.strip("[]"), int(port)


class CodeBook:
    """Codes delivered to the numbers of one process, by number (E.164), each
    handed to the flow waiting for it. One flow waits on a number at a time."""

    def __init__(self, accept: Callable[[str], bool] = lambda to: True) -> None:
        self.accept = accept
        self._codes: dict[str, deque[str]] = {}
        self._waiters: dict[str, asyncio.Future[str | None]] = {}
        self._seen: set[str] = set()  # message ids: a redelivery is not a second code
        self.received = 0  # codes a flow waited for and got
        # Called when a flow starts waiting (to wake whatever reads the codes).
        self.on_wait: Callable[[], None] = lambda: None

    @property
    def waiting(self) -> bool:
        return bool(self._waiters)

    def deliver(self, message: Any) -> None:
        """Takes one SMS as the gateways write it: {message_id, to, text, purpose}."""
        if not isinstance(message, dict) or message.get("purpose") != PURPOSE_CODE:
            return
        to, text = message.get("to"), message.get("text")
        if not isinstance(to, str) or not isinstance(text, str) or not self.accept(to):
            return
        match = _CODE.search(text)
        if match is None:
            return
        message_id = message.get("message_id")
        if isinstance(message_id, str) and message_id:
            if message_id in self._seen:
                return
            self._seen.add(message_id)
        waiter = self._waiters.pop(to, None)
        if waiter is not None and not waiter.done():
            self.received += 1
            waiter.set_result(match.group(1))
        else:
            self._codes.setdefault(to, deque()).append(match.group(1))

    async def wait(self, to: str, timeout: float) -> str | None:
        """The next code sent to ``to``, or None after ``timeout`` seconds."""
        codes = self._codes.get(to)
        if codes:
            code = codes.popleft()
            if not codes:
                del self._codes[to]
            self.received += 1
            return code
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[str | None] = loop.create_future()
        self._waiters[to] = waiter
        timer = loop.call_later(timeout, _expire, waiter)
        self.on_wait()
        try:
            return await waiter
        finally:
            timer.cancel()
            if self._waiters.get(to) is waiter:
                del self._waiters[to]


def _expire(waiter: asyncio.Future[str | None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class SmsFileReader:
    """Follows a JSON-lines SMS file from where it ended when the reader was made.

    It keeps its offset and reads only what was appended since, keeps a
    partial last line until its end arrives, and parses only the lines of
    codes to this process's numbers; a file that is replaced or truncated is
    read again from its start.

    It reads only while a flow waits for a code, and never wakes the event
    loop for it while the loop is awake anyway: ``check()``, called after
    every RPC, reads then; a timer reads ``poll`` seconds after the last read
    when nothing else woke the loop. (A wake-up of an idle loop costs tens of
    microseconds of CPU: polling on a timer alone cost more than parsing.)
    """

    def __init__(self, path: str, book: CodeBook, poll: float = 0.002) -> None:
        self.path = path
        self._book = book
        self._poll = poll
        self._fd: int | None = None
        self._inode: int | None = None
        self._partial = b""
        self._idle_reads = 0
        self._timer: asyncio.TimerHandle | None = None
        try:
            stat = os.stat(path)
            self._offset, self._inode = stat.st_size, stat.st_ino
        except OSError:
            self._offset = 0

    def start(self) -> SmsFileReader:
        """Reads whenever a flow starts to wait, and from then on as said above."""
        self._book.on_wait = self.check
        return self

    def check(self) -> None:
        """Reads what was appended, if a flow waits for a code."""
        if self._book.waiting:
            self.read_new()
            self._arm()

    def _arm(self) -> None:
        """Puts the timer ``poll`` seconds after this read (while a flow waits)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._book.waiting:
            self._timer = asyncio.get_running_loop().call_later(self._poll, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.check()

    def read_new(self) -> int:
        """Reads what was appended since the last read; returns how many bytes."""
        fd = self._fd if self._fd is not None else self._open()
        if fd is None:
            return 0
        data = os.pread(fd, 1 << 20, self._offset)
        if not data:
            self._idle_reads += 1
            if self._idle_reads % 64 == 0:
                self._check_replaced()
            return 0
        self._idle_reads = 0
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _LARGEST_SMS:
            self._partial = b""  # not an SMS: skip to the next line
        for line in lines:
            self._line(line)
        return len(data)

    def _line(self, line: bytes) -> None:
        if b"REBIND_CODE" not in line:
            return
        to = _TO.search(line)
        if to is None or not self._book.accept(to.group(1).decode("ascii", "replace")):
            return
        try:
            message = json.loads(line)
        except ValueError:
            return
        self._book.deliver(message)

    def _open(self) -> int | None:
        try:
            fd = self._fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        inode = os.fstat(fd).st_ino
        if self._inode is not None and inode != self._inode:
            self._offset = 0  # a new file since the reader was made
        self._inode = inode
        return fd

    def _check_replaced(self) -> None:
        """Starts over when the path now names another file, or a shorter one."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            self._close_file()
            self._inode = stat.st_ino
            self._offset, self._partial = 0, b""

    def close(self) -> None:
        self._book.on_wait = lambda: None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close_file()

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SmsSink:
    """A small HTTP server for the http gateway: each POSTed JSON message goes
    to ``deliver``, called on the sink's own thread."""

    def __init__(self, address: str, deliver: Callable[[Any], object]) -> None:
        host, port = split_address(address)

        class Handler(BaseHTTPRequestHandler):
            # A gateway that stalls mid-request cannot hold the sink for long.
            timeout = 5

            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= _LARGEST_SMS:
                    self._answer(400, b'{"error": "bad Content-Length"}')
                    return
                try:
                    message = json.loads(self.rfile.read(length) or b"null")
                except ValueError:
                    message = None
                if not isinstance(message, dict):
                    self._answer(400, b'{"error": "expected a JSON object"}')
                    return
                deliver(message)
                self._answer(200, b"{}")

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the gateway's requests carry codes and numbers: never logged

        # One thread answers every POST: the gateway sends one small message per
        # connection, and a thread per connection would cost more than the answer.
        self.server = HTTPServer((host, port), Handler)
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="sms-sink", daemon=True
        )

    @classmethod
    def into_loop(cls, address: str, book: CodeBook, loop: asyncio.AbstractEventLoop) -> SmsSink:
        """A sink handing each message to ``book`` on ``loop``."""
        return cls(address, lambda message: loop.call_soon_threadsafe(book.deliver, message))

    def start(self) -> SmsSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(2)


class FileRelay:
    """Appends what the sink receives to a private JSON-lines file, which the
    load processes read as they would the file gateway's."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="phonebind-load-")
        self.path = os.path.join(self.directory, "sms.jsonl")
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def deliver(self, message: Any) -> None:
        line = json.dumps(message, ensure_ascii=False).encode() + b"\n"
        with self._lock:
            os.write(self._fd, line)

    def close(self) -> None:
        os.close(self._fd)
        shutil.rmtree(self.directory, ignore_errors=True)
