"""A stand-in for the control plane's ``GET /api/v1/ruleset`` (and a sink for ``POST
/api/v1/events``), on 127.0.0.1: real HTTP, answers chosen by the test, requests recorded."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class RulesetStub:
    """``mode``: "document" (200 with ``document``, or 304 when the runtime's header says it
    holds that version already), "not_modified" (always 304), "error" (500), "garbage" (200 with a
    body that is not a ruleset)."""

    def __init__(self) -> None:
        self.mode = "document"
        self.document: dict[str, Any] | None = None
        self.lock = threading.Lock()
        self.pulls: list[dict[str, str | None]] = []  # the headers of every GET
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def up(self) -> None:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/api/v1/ruleset":
                    self._reply(404, b"{}")
                    return
                with stub.lock:
                    stub.pulls.append({"authorization": self.headers.get("Authorization"),
                                       "version": self.headers.get("X-Wattson-Ruleset-Version")})
                status, body = stub.answer(self.headers.get("X-Wattson-Ruleset-Version"))
                self._reply(status, body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._reply(202, b"{}")

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                if status != 304:
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if status != 304:
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def answer(self, held: str | None) -> tuple[int, bytes]:
        mode, document = self.mode, self.document
        if mode == "error":
            return 500, b'{"error": {"message": "boom"}}'
        if mode == "garbage":
            return 200, b'{"version": "nine"}'
        if mode == "not_modified" or document is None or held == str(document["version"]):
            return 304, b""
        return 200, json.dumps(document).encode()
