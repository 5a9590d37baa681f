"""Reading the bearer token that API keys and the admin token both come in."""

from __future__ import annotations

import pytest

from inference.auth import bearer_token


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer sk-1", "sk-1"), ("bearer sk-1", "sk-1"), ("BEARER  sk-1 ", "sk-1"),
    (None, None), ("", None), ("Bearer", None), ("Bearer   ", None), ("Basic c2stMQ==", None), ("sk-1", None),
])
def test_the_token_is_read_from_a_bearer_header_only(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token
