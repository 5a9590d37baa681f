"""A real telemetry collector on 127.0.0.1 for tests, standing in for the control plane's ingest."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Collector:
    """An HTTP collector that stores records by event_id and can be taken down, slowed or made
    to fail. ``mode``: "ok" (202), "slow" (hangs ``slow_s`` then 503), "error" (500),
    "reject" (400), "unauthorized" (401), or "small" (413 for bodies of more than 2 events)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.slow_s = 2.0
        self.lock = threading.Lock()
        self.bodies: list[bytes] = []  # every body that arrived, whatever it was answered
        self.accepted_bodies: list[bytes] = []
        self.authorizations: list[str | None] = []
        self.events: dict[str, dict[str, Any]] = {}
        self.event_order: list[str] = []
        self.samples: list[dict[str, Any]] = []
        self.duplicates = 0
        self.port = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = collector.receive(self.path, self.headers.get("Authorization"), body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                reply = b'{"error": {"type": "invalid_request_error", "message": "bad batch"}}'
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        server.handle_error = lambda *args: None  # type: ignore[method-assign]  # clients that gave up
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def down(self) -> None:
        """Stop listening: connections are refused until ``up`` again, on the same port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def receive(self, path: str, authorization: str | None, body: bytes) -> int:
        mode = self.mode
        with self.lock:
            self.bodies.append(body)
            self.authorizations.append(authorization)
        if path != "/api/v1/events":
            return 404
        if mode == "slow":
            time.sleep(self.slow_s)
            return 503
        if mode == "error":
            return 500
        if mode == "reject":
            return 400
        if mode == "unauthorized":
            return 401
        batch = json.loads(body)
        if mode == "small" and len(batch["events"]) > 2:
            return 413
        with self.lock:
            self.accepted_bodies.append(body)
            for event in batch["events"]:
                if event["event_id"] in self.events:
                    self.duplicates += 1
                else:
                    self.events[event["event_id"]] = event
                    self.event_order.append(event["event_id"])
            self.samples.extend(batch["samples"])
        return 202


