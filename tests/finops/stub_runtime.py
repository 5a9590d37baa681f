"""A stand-in for a runtime's ``PUT /admin/ruleset``, for the push tests: a real HTTP server in a
thread that answers from a script and records what it was sent."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DROP = "drop"  # close the connection without answering


class StubRuntime:
    """Answers PUT /admin/ruleset with the next entry of ``script`` (``(status, payload)``, or
    ``DROP``); with the script used up, 200 and the version it was sent."""

    def __init__(self) -> None:
        self.script: list[Any] = []
        self.requests: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.requests.append({"path": self.path, "authorization": self.headers.get("Authorization"),
                                      "document": json.loads(body)})
                answer = stub.script.pop(0) if stub.script else (200, None)
                if answer == DROP:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, payload = answer
                if payload is None:
                    payload = {"version": stub.requests[-1]["document"]["version"]}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    """The address of a port that was just free and is closed again: connecting is refused at once,
    as for a runtime whose process is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
