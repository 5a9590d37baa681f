"""A minimal stand-in for the control plane's ingest, so the demo can show what the runtime
exports over HTTP before the control plane exists: it accepts ``POST /api/v1/events`` and keeps
the records in memory, idempotent on ``event_id``."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class DemoCollector:
    def __init__(self, token: str) -> None:
        self.token = token
        self.events: dict[str, dict[str, Any]] = {}
        self.samples: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                ok = self.path == "/api/v1/events" and self.headers.get("Authorization") == f"Bearer {token}"
                if ok:
                    collector.take(json.loads(body))
                self.send_response(202 if ok else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def take(self, batch: dict[str, Any]) -> None:
        with self._lock:
            for event in batch.get("events", []):
                self.events.setdefault(event["event_id"], event)
            self.samples.extend(batch.get("samples", []))

    def snapshot(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        with self._lock:
            return list(self.events.values()), list(self.samples)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
