"""A fault proxy: an HTTP proxy in front of the control plane whose behaviour a fault scenario
switches while the runtime exports through it.

Modes: ``pass`` forwards every request (and answers 502, as nginx does, when the control plane
cannot be reached); ``html_400`` answers a proxy's HTML "400 Bad Request" page without forwarding
(what a misconfigured proxy, or Django's DisallowedHost page, sends); ``bad_gateway`` answers 502;
``slow`` forwards, lets the control plane store the batch, and holds its answer past the
exporter's timeout, so the runtime sends a stored batch again (the way duplicates would arise);
``refuse`` stops listening, so connections are refused, and closes kept-alive ones.

``arm`` runs an action once, on the next telemetry POST, after its body has gone to the control
plane and before its answer is read: a kill lands while that batch is being ingested. The proxy
counts each event it forwarded by ``event_id`` (with its ``end_user``), so a scenario can say how
many of its events the runtime sent more than once (``resent``); duplicates must stop at the
database.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EVENTS_PATH = "/api/v1/events"
UPSTREAM_TIMEOUT_S = 60.0
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer",
               "content-length"}


def _nginx_page(status: str) -> bytes:
    return (f"<html>\r\n<head><title>{status}</title></head>\r\n<body>\r\n<center><h1>{status}</h1></center>\r\n"
            f"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n").encode()


HTML_400 = _nginx_page("400 Bad Request")
HTML_502 = _nginx_page("502 Bad Gateway")


class Mode(StrEnum):
    PASS = "pass"
    HTML_400 = "html_400"
    BAD_GATEWAY = "bad_gateway"
    SLOW = "slow"
    REFUSE = "refuse"


class FaultProxy:
    """The proxy on ``127.0.0.1:port`` in front of ``upstream`` (host, port), served by threads of
    this process; ``slow_hold_s`` is how long ``slow`` holds an answer."""

    def __init__(self, upstream: tuple[str, int], *, port: int, slow_hold_s: float) -> None:
        self.upstream = upstream
        self.port = port
        self.slow_hold_s = slow_hold_s
        self.url = f"http://127.0.0.1:{port}"
        self._mode = Mode.PASS
        self._lock = threading.Lock()
        self._armed: Callable[[], None] | None = None
        self.fired = threading.Event()
        self._forwarded: Counter[str] = Counter()  # event_id -> times forwarded
        self._users: dict[str, str] = {}  # event_id -> end_user
        self.answered_by_fault: Counter[Mode] = Counter()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._listen()

    def close(self) -> None:
        self._stop_listening()

    def _listen(self) -> None:
        if self._server is not None:
            return
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        server = _QuietServer(("127.0.0.1", self.port), Handler)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()

    def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    # -- what a scenario switches --------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode) -> None:
        with self._lock:
            self._mode = mode
        if mode is Mode.REFUSE:
            self._stop_listening()
        else:
            self._listen()

    def arm(self, action: Callable[[], None]) -> None:
        """Run ``action`` once, inside the next telemetry POST forwarded (see the module's doc)."""
        with self._lock:
            self.fired.clear()
            self._armed = action

    def wait_fired(self, timeout: float) -> bool:
        """Whether the armed action has run (waiting up to ``timeout``); one that has not by then
        never will."""
        if self.fired.wait(timeout):
            return True
        self.disarm()
        return self.fired.is_set()

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    def resent(self, user_prefix: str) -> int:
        """Sends beyond the first of the events whose end_user starts with ``user_prefix``."""
        with self._lock:
            return sum(count - 1 for event_id, count in self._forwarded.items()
                       if count > 1 and self._users.get(event_id, "").startswith(user_prefix))

    # -- used by the handler -------------------------------------------------------------------

    def take_armed(self, path: str) -> Callable[[], None] | None:
        if path != EVENTS_PATH:
            return None
        with self._lock:
            action, self._armed = self._armed, None
            return action

    def count_forwarded(self, path: str, body: bytes) -> None:
        if path != EVENTS_PATH:
            return
        try:
            events = json.loads(body).get("events") or []
        except (ValueError, AttributeError):
            return
        with self._lock:
            for event in events:
                if isinstance(event, dict) and isinstance(event.get("event_id"), str):
                    self._forwarded[event["event_id"]] += 1
                    self._users[event["event_id"]] = str(event.get("end_user") or "")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A runtime killed mid-request resets its connection: that is the fault, not news. Any
        other error in the proxy is reported as the standard library would."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # kept-alive connections, as the exporter's client uses them

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        mode = self.owner.mode
        if mode is Mode.REFUSE:  # a kept-alive connection from before: drop it unanswered
            self.close_connection = True
            return
        if mode in (Mode.HTML_400, Mode.BAD_GATEWAY):
            self.owner.answered_by_fault[mode] += 1
            status, page = (400, HTML_400) if mode is Mode.HTML_400 else (502, HTML_502)
            self._answer(status, [("Content-Type", "text/html")], page)
            return
        status, headers, answer = self._forward(body)
        if mode is Mode.SLOW:
            self.owner.answered_by_fault[mode] += 1
            time.sleep(self.owner.slow_hold_s)
        self._answer(status, headers, answer)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.owner.upstream, timeout=UPSTREAM_TIMEOUT_S)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            connection.request(self.command, self.path, body=body, headers=headers)
            if (action := self.owner.take_armed(self.path)) is not None:
                try:
                    action()
                finally:
                    self.owner.fired.set()
            response = connection.getresponse()
            answer = response.read()
        except OSError:  # the control plane is down or died mid-request: what nginx says then
            return 502, [("Content-Type", "text/html")], HTML_502
        finally:
            connection.close()
        if 200 <= response.status < 300:
            self.owner.count_forwarded(self.path, body)
        kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
        return response.status, kept, answer

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        with contextlib.suppress(OSError):  # the runtime gave up waiting (slow mode): nothing to tell
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
