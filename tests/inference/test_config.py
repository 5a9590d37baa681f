"""Every option is a flag and an INFERENCE_* variable; bad values are refused with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from inference.config import OPTIONS, ApiKey, ConfigError, Upstream, load_config


def test_help_documents_every_option_and_its_variable() -> None:
    result = subprocess.run([sys.executable, "-m", "inference", "serve", "--help"], capture_output=True, text=True,
                            check=True)
    for option in OPTIONS:
        assert option.flag in result.stdout
        assert option.env in result.stdout.replace("\n", " ").replace("  ", "")


def test_defaults_serve_the_tiny_model_on_port_8100() -> None:
    config = load_config([], environ={})
    assert (config.port, config.models, config.device) == (8100, ("tiny-random",), "auto")


def test_variables_configure_and_flags_win() -> None:
    env = {"INFERENCE_PORT": "9001", "INFERENCE_MODEL": "smollm2, tiny-random", "INFERENCE_DEVICE": "cpu",
           "INFERENCE_API_KEYS": "sk-aaaaaaaa:acme:premium,sk-bbbbbbbb:globex", "INFERENCE_SPOOL_DIR": "/tmp/sp"}
    config = load_config(["--port", "9002"], environ=env)
    assert config.port == 9002
    assert config.models == ("smollm2", "tiny-random")
    assert config.spool_dir == Path("/tmp/sp")
    assert config.api_keys == (ApiKey("sk-aaaaaaaa", "acme", "premium"), ApiKey("sk-bbbbbbbb", "globex", "standard"))


def test_repeatable_upstreams_parse_name_url_and_model() -> None:
    config = load_config(["--upstream", "big=http://10.0.0.1:8000/#meta/llama", "--upstream", "fast=http://h:1"],
                         environ={})
    assert config.upstreams == (Upstream("big", "http://10.0.0.1:8000", "meta/llama"),
                                Upstream("fast", "http://h:1", "fast"))
    assert config.models == (), "naming upstreams alone serves no local model"


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--port", "eighty"], {}, "not a valid int"),
    (["--max-batch-size", "0"], {}, "must be positive"),
    ([], {"INFERENCE_DEVICE": "tpu"}, "must be one of"),
    ([], {"INFERENCE_API_KEYS": "short:acme"}, "8-200 characters"),
    ([], {"INFERENCE_API_KEYS": "sk-aaaaaaaa:acme:gold"}, "tier 'gold'"),
    ([], {"INFERENCE_API_KEYS": "sk-aaaaaaaa"}, "KEY:TENANT"),
    ([], {"INFERENCE_API_KEYS": "sk-aaaaaaaa:a,sk-aaaaaaaa:b"}, "listed twice"),
    (["--upstream", "big"], {}, "NAME=URL"),
    (["--upstream", "big=ftp://x"], {}, "http://"),
    (["--model", "tiny-random", "--model", "tiny-random"], {}, "unique"),
    (["--finops-url", "localhost:8000"], {}, "http://"),
])
def test_bad_configuration_is_refused_with_a_reason(argv: list[str], env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(argv, environ=env)


def test_the_cli_exits_2_with_the_reason_on_bad_configuration() -> None:
    result = subprocess.run([sys.executable, "-m", "inference", "serve", "--max-queue-depth", "-1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "max_queue_depth must be positive" in result.stderr
