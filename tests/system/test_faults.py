"""The telemetry pipeline under faults, on the whole product in processes of its own: after each
fault every request the runtime answered is stored exactly once, and after the worker is killed
inside a rollup run the rollups add up to the raw events again.

The faults, the load and the reconciliation are ``bench.faults`` (``python -m bench faults`` runs
them larger and prints the table); here each runs at the test's size on one stack started for
this module (``bench.fault_rig``: private PostgreSQL and Redis on free ports, never the machine's
shared ones). First, the fault proxy is held to what it claims to break.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from bench.fault_proxy import EVENTS_PATH, FaultProxy, Mode
from bench.fault_rig import Stack, Unavailable
from bench.faults import FAULTS, QUICK, Fault, run_fault
from bench.servers import free_port

# -- the fault proxy --------------------------------------------------------------------------------


class _Collector(BaseHTTPRequestHandler):
    """Stands in for the control plane: stores every event it is sent and answers 202."""

    protocol_version = "HTTP/1.1"
    stored: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.stored.extend(event["event_id"] for event in json.loads(body)["events"])
        answer = b'{"accepted": 1, "duplicates": 0, "refused": []}'
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


@pytest.fixture
def collector() -> Iterator[tuple[tuple[str, int], list[str]]]:
    stored: list[str] = []
    handler = type("Collector", (_Collector,), {"stored": stored})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield ("127.0.0.1", server.server_address[1]), stored
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(collector: tuple[tuple[str, int], list[str]]) -> Iterator[FaultProxy]:
    proxy = FaultProxy(collector[0], port=free_port(), slow_hold_s=0.6)
    proxy.start()
    yield proxy
    proxy.close()


def batch(*event_ids: str) -> bytes:
    return json.dumps({"events": [{"event_id": e, "end_user": f"u-{e}"} for e in event_ids], "samples": []}).encode()


def test_the_proxy_passes_batches_to_the_collector(proxy: FaultProxy, collector: tuple) -> None:
    response = httpx.post(proxy.url + EVENTS_PATH, content=batch("e1"))
    assert response.status_code == 202 and response.json()["accepted"] == 1
    assert collector[1] == ["e1"]


@pytest.mark.parametrize(("mode", "status"), [(Mode.HTML_400, 400), (Mode.BAD_GATEWAY, 502)])
def test_the_proxy_answers_an_html_error_page_without_forwarding(proxy: FaultProxy, collector: tuple, mode: Mode,
                                                                  status: int) -> None:
    proxy.set_mode(mode)
    response = httpx.post(proxy.url + EVENTS_PATH, content=batch("e1"))
    assert response.status_code == status
    assert response.headers["content-type"] == "text/html" and response.text.startswith("<html>")
    assert collector[1] == []


def test_a_slow_proxy_lets_the_collector_store_the_batch_and_answers_too_late(proxy: FaultProxy,
                                                                               collector: tuple) -> None:
    proxy.set_mode(Mode.SLOW)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proxy.url + EVENTS_PATH, content=batch("e1"), timeout=0.3)
    assert collector[1] == ["e1"], "stored before the answer was held"
    proxy.set_mode(Mode.PASS)
    httpx.post(proxy.url + EVENTS_PATH, content=batch("e1")).raise_for_status()
    assert proxy.resent("u-") == 1, "the second send of a stored event is counted as a resend"


def test_a_refusing_proxy_refuses_connections_until_it_passes_again(proxy: FaultProxy) -> None:
    proxy.set_mode(Mode.REFUSE)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", proxy.port)) != 0
    proxy.set_mode(Mode.PASS)
    assert httpx.post(proxy.url + EVENTS_PATH, content=batch("e2")).status_code == 202


def test_an_armed_action_runs_once_inside_the_next_telemetry_post(proxy: FaultProxy, collector: tuple) -> None:
    seen: list[list[str]] = []
    proxy.arm(lambda: seen.append(list(collector[1])))
    httpx.post(proxy.url + EVENTS_PATH, content=batch("e1")).raise_for_status()
    httpx.post(proxy.url + EVENTS_PATH, content=batch("e2")).raise_for_status()
    assert proxy.wait_fired(0) and len(seen) == 1


def test_an_armed_action_that_never_fired_is_disarmed(proxy: FaultProxy) -> None:
    proxy.arm(lambda: pytest.fail("ran after its wait was over"))
    assert not proxy.wait_fired(0.05)
    httpx.post(proxy.url + EVENTS_PATH, content=batch("e1")).raise_for_status()


# -- the faults, on the whole product ----------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # In /tmp, not pytest's directory (private to this user): the postgres user must reach its data.
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the load's every request, otherwise
    root = Path(tempfile.mkdtemp(prefix="wattson-faults-"))
    try:
        rig = Stack(root, logs=tmp_path_factory.mktemp("fault-logs"))
    except Unavailable as exc:
        shutil.rmtree(root)
        pytest.skip(str(exc))
    try:
        with rig:
            yield rig
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
def test_after_the_fault_every_answered_request_is_stored_exactly_once(stack: Stack, fault: Fault) -> None:
    began = time.monotonic()
    result = run_fault(stack, fault, QUICK)
    if result.skipped:
        pytest.skip(result.skipped)
    report = f"{result.describe()}\n(the fault took {time.monotonic() - began:.0f} s; logs in {stack.logs})"
    assert result.failed is None, report
    assert result.answered > 0, report
    assert (result.lost, result.duplicates) == (0, 0), report
    if fault.every_answer_ok:
        assert (result.errors, result.unanswered) == (0, 0), "every request answered 200 throughout:\n" + report
    if fault.rollups:
        assert result.rollup_mismatches == [], "rollup sums equal the raw sums at every granularity:\n" + report
