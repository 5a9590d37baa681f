"""A real telemetry collector on 127.0.0.1 for tests, standing in for the control plane's ingest."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def finops_error(status: int, code: str, message: str, **extra: Any) -> tuple[int, bytes, str]:
    """An answer in finops's error body (``finops/lib/api.py``)."""
    body = {**extra, "error": {"type": "invalid_request_error", "message": message, "code": code, "param": None}}
    return status, json.dumps(body).encode(), "application/json"


# What something between the runtime and finops may answer instead of finops: not its refusal.
FOREIGN = {
    "html_400": (400, b"<!DOCTYPE html><html><title>Bad Request (400)</title><h1>Bad Request (400)</h1></html>",
                 "text/html"),
    "proxy_404": (404, b"<html><body><h1>404 Not Found</h1>nginx</body></html>", "text/html"),
    "proxy_405": (405, b"Method Not Allowed", "text/plain"),
    "other_json_400": (400, b'{"detail": "bad request"}', "application/json"),
    "unknown_code_400": finops_error(400, "something_new", "a code this runtime does not know"),
}


class Collector:
    """An HTTP collector that stores records by event_id and answers as finops's ingest does,
    and can be taken down, slowed, made to fail or to answer as a proxy would. ``mode``: "ok"
    (202 with the stored and refused records), "slow" (hangs ``slow_s`` then 503), "error" (500),
    "invalid_batch" (finops's 400 for a body that is no batch), "unauthorized" (401), "small"
    (finops's 413 for more than 2 events), or a key of ``FOREIGN``. A batch holding an event whose
    id is in ``spoilers`` is answered finops's 400 as well. Events whose id (or ``feature:NAME``)
    is a key of ``refuse`` are refused with that reason, as finops refuses a record: in the 202,
    or with a 422 when the whole batch is refused."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.slow_s = 2.0
        self.spoilers: set[str] = set()
        self.refuse: dict[str, str] = {}
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
                status, reply, content_type = collector.receive(self.path, self.headers.get("Authorization"), body)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
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

    def receive(self, path: str, authorization: str | None, body: bytes) -> tuple[int, bytes, str]:
        mode = self.mode
        with self.lock:
            self.bodies.append(body)
            self.authorizations.append(authorization)
        if path != "/api/v1/events":
            return FOREIGN["proxy_404"]
        if mode in FOREIGN:
            return FOREIGN[mode]
        if mode == "slow":
            time.sleep(self.slow_s)
            return finops_error(503, "database_unavailable", "The telemetry database is unavailable; retry later.")
        if mode == "error":
            return finops_error(500, "internal_error", "The control plane failed to store this batch.")
        if mode == "unauthorized":
            return finops_error(401, "invalid_token", "A valid runtime token is required.")
        batch = json.loads(body)
        if mode == "invalid_batch" or any(event["event_id"] in self.spoilers for event in batch["events"]):
            return finops_error(400, "invalid_batch", "the body is not valid JSON: bad batch")
        if mode == "small" and len(batch["events"]) > 2:
            return finops_error(413, "too_many_records", "3 records in one request; at most 2; send smaller batches.")
        return self._store(body, batch)

    def _store(self, body: bytes, batch: dict[str, Any]) -> tuple[int, bytes, str]:
        refused = [{"kind": "event", "index": index, "event_id": event["event_id"], "errors": [reason]}
                   for index, event in enumerate(batch["events"]) if (reason := self.refusal(event))]
        received = len(batch["events"]) + len(batch["samples"])
        result = {"accepted": 0, "duplicates": 0, "refused": refused}
        if refused and len(refused) == received:
            return finops_error(422, "all_records_refused", f"All {received} records were refused; see 'refused'.",
                                **result)
        with self.lock:
            self.accepted_bodies.append(body)
            for event in batch["events"]:
                if self.refusal(event):
                    continue
                if event["event_id"] in self.events:
                    self.duplicates += 1
                    result["duplicates"] += 1
                else:
                    self.events[event["event_id"]] = event
                    self.event_order.append(event["event_id"])
                    result["accepted"] += 1
            self.samples.extend(batch["samples"])
            result["accepted"] += len(batch["samples"])
        return 202, json.dumps(result).encode(), "application/json"

    def refusal(self, event: dict[str, Any]) -> str | None:
        return self.refuse.get(event["event_id"]) or self.refuse.get(f"feature:{event['feature']}")
