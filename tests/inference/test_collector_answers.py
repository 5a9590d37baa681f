"""What the control plane's answer to a batch means: only finops's own contract refusals set
records aside; anything else leaves them to be sent again."""

from __future__ import annotations

import json

import pytest

from inference.telemetry.answers import Verdict, read_answer
from tests.inference.collector import FOREIGN, finops_error

BATCH = ["E", "S", "E", "E"]  # events 0, 1, 2 sit at places 0, 2, 3; the sample at place 1


def answer(status: int, body: bytes | dict, kinds: list[str] = BATCH, headers: dict[str, str] | None = None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return read_answer(status, headers or {}, raw, kinds=kinds)


def finops(status: int, code: str, **extra: object):
    _, body, _ = finops_error(status, code, f"finops says {code}", **extra)
    return answer(status, body)


def test_a_202_stores_every_record_it_does_not_refuse() -> None:
    result = answer(202, {"accepted": 4, "duplicates": 0, "refused": []})

    assert (result.verdict, result.refusals) == (Verdict.DONE, {})


def test_a_202_refusal_names_the_record_by_its_kind_and_index_with_finops_reasons() -> None:
    result = answer(202, {"accepted": 2, "duplicates": 0, "refused": [
        {"kind": "event", "index": 1, "event_id": "e1", "errors": ["tenant: too long", "seq: too large"]},
        {"kind": "sample", "index": 0, "event_id": None, "errors": ["devices.0.mem_used: too large"]}]})

    assert result.verdict is Verdict.DONE
    assert result.refusals == {2: "HTTP 202: event 1: tenant: too long; seq: too large",
                               1: "HTTP 202: sample 0: devices.0.mem_used: too large"}


def test_a_202_refusal_that_names_no_record_of_the_batch_is_counted_not_guessed() -> None:
    result = answer(202, {"accepted": 4, "refused": [{"kind": "event", "index": 7}, {"kind": ["x"], "index": 0},
                                                     {"kind": "event", "index": True}, "junk"]})

    assert (result.verdict, result.refusals, result.unplaced) == (Verdict.DONE, {}, 4)


def test_finops_refusing_every_record_sets_each_aside_with_its_own_reason() -> None:
    refused = [{"kind": "event", "index": i, "event_id": f"e{i}", "errors": [f"problem {i}"]} for i in range(3)]
    result = finops(422, "all_records_refused", accepted=0, duplicates=0, refused=refused)

    assert result.verdict is Verdict.DONE
    assert result.refusals[0] == "HTTP 422: event 0: problem 0"
    assert result.refusals[3] == "HTTP 422: event 2: problem 2"
    assert result.refusals[1].startswith("HTTP 422 all_records_refused"), "a record it did not list: its message"


def test_finops_finding_no_batch_splits_a_batch_and_sets_a_single_record_aside() -> None:
    assert finops(400, "invalid_batch").verdict is Verdict.SPLIT

    _, body, _ = finops_error(400, "invalid_batch", "the body is not valid JSON")
    single = answer(400, body, kinds=["E"])

    assert single.verdict is Verdict.DONE
    assert single.refusals == {0: "HTTP 400 invalid_batch: the body is not valid JSON"}


@pytest.mark.parametrize("code", ["too_many_records", "body_too_large"])
def test_too_large_shrinks_the_batch(code: str) -> None:
    assert finops(413, code).verdict is Verdict.SPLIT


def test_a_single_record_finops_finds_too_large_is_set_aside_and_a_proxy_413_is_retried() -> None:
    _, body, _ = finops_error(413, "body_too_large", "The body is larger than 8 bytes")

    assert answer(413, body, kinds=["E"]).verdict is Verdict.DONE
    assert answer(413, b"<html>413 Request Entity Too Large</html>", kinds=["E"]).verdict is Verdict.RETRY
    assert answer(413, b"<html>413 Request Entity Too Large</html>").verdict is Verdict.SPLIT


@pytest.mark.parametrize("mode", sorted(FOREIGN))
def test_an_answer_that_is_not_a_finops_refusal_keeps_the_records(mode: str) -> None:
    status, body, _ = FOREIGN[mode]

    result = answer(status, body)

    assert (result.verdict, result.refusals) == (Verdict.RETRY, {})
    assert result.problem.startswith(f"HTTP {status}")


@pytest.mark.parametrize("body", [
    b"<html><body>Welcome to the hotel network</body></html>", b"", b"{}", b'{"ok": true}', b'{"accepted": true}',
    b'{"accepted": "4"}', b"[4]",
])
def test_a_2xx_without_finops_ingest_result_stored_nothing_and_is_retried(body: bytes) -> None:
    for status in (200, 202, 204):
        result = answer(status, body)

        assert (result.verdict, result.refusals) == (Verdict.RETRY, {})
        assert "without the control plane's ingest result" in result.problem


@pytest.mark.parametrize("status", [401, 403, 408, 409, 429, 500, 502, 503])
def test_finops_errors_that_say_nothing_of_the_records_keep_them(status: int) -> None:
    assert finops(status, "whatever").verdict is Verdict.RETRY


def test_a_422_without_finops_refusal_list_is_retried() -> None:
    assert answer(422, {"detail": [{"loc": ["body"], "msg": "field required"}]}).verdict is Verdict.RETRY


def test_retry_after_is_read_and_a_bad_one_ignored() -> None:
    assert answer(503, b"busy", headers={"Retry-After": "7"}).retry_after_s == 7.0
    assert answer(503, b"busy", headers={"Retry-After": "soon"}).retry_after_s is None
