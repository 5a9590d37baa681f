"""Every option is a flag and an INFERENCE_* variable; bad values are refused with a clear message."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from inference.config import ApiKey, ConfigError, RuntimeConfig, Upstream, UpstreamDevice, load_config
from inference.options import POSITIVE, Option, declared


def test_help_documents_every_option_and_its_variable() -> None:
    result = subprocess.run([sys.executable, "-m", "inference", "serve", "--help"], capture_output=True, text=True,
                            check=True)
    for option in declared(RuntimeConfig):
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


@pytest.mark.parametrize("url", ["http://h:8000/v1", "http://h:8000/v1/", "http://h:8000", "http://h:8000/"])
def test_an_upstream_url_is_its_openai_base_with_or_without_v1(url: str) -> None:
    config = load_config(["--upstream", f"big={url}#m"], environ={})
    assert config.upstreams == (Upstream("big", "http://h:8000", "m"),)


def test_an_upstream_device_names_a_served_upstream_and_a_gpu_by_index_or_uuid() -> None:
    config = load_config(["--upstream", "big=http://h:1", "--upstream", "small=http://h:2",
                          "--upstream-device", "big=0", "--upstream-device", "small=GPU-5e1c"], environ={})
    assert config.upstream_devices == (UpstreamDevice("big", "0"), UpstreamDevice("small", "GPU-5e1c"))


@pytest.mark.parametrize(("devices", "message"), [
    (["big=cuda:0"], "NAME=INDEX or NAME=GPU-UUID"),
    (["other=0"], "no upstream of that name"),
    (["big=0", "big=1"], "given twice"),
    (["big=0", "small=0"], "given to two upstreams"),
])
def test_a_bad_upstream_device_is_refused_with_a_reason(devices: list[str], message: str) -> None:
    argv = ["--upstream", "big=http://h:1", "--upstream", "small=http://h:2"]
    for device in devices:
        argv += ["--upstream-device", device]
    with pytest.raises(ConfigError, match=message):
        load_config(argv, environ={})


def test_an_upstream_path_before_v1_is_kept() -> None:
    config = load_config(["--upstream", "big=http://gw/llm/v1"], environ={})
    assert config.upstreams[0].url == "http://gw/llm"


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


POSITIVE_OPTIONS = [option for option in declared(RuntimeConfig) if POSITIVE in option.checks]


@pytest.mark.parametrize("option", POSITIVE_OPTIONS, ids=[o.flag for o in POSITIVE_OPTIONS])
def test_an_option_declared_positive_refuses_zero_from_its_flag_and_its_variable(option: Option) -> None:
    with pytest.raises(ConfigError, match=f"^{option.name} must be positive$"):
        load_config([option.flag, "0"], environ={})
    with pytest.raises(ConfigError, match=f"^{option.name} must be positive$"):
        load_config([], environ={option.env: "-1"})


@pytest.mark.parametrize(("argv", "message"), [
    (["--upstream-retries", "-1"], "upstream_retries must not be negative"),
    (["--breaker-error-rate", "0"], "breaker_error_rate must be above 0 and at most 1"),
    (["--breaker-error-rate", "1.01"], "breaker_error_rate must be above 0 and at most 1"),
    (["--high-priority-max-running", "0"], "high_priority_max_running must be at least 1"),
    (["--admin-token", "a" * 15], "--admin-token must be 16-200 characters"),
    (["--cache-redis-url", ""], "--cache-redis-url must start with redis://, rediss:// or unix://"),
    (["--finops-url", "ftp://x"], "--finops-url must start with http:// or https://"),
    (["--breaker-window-s", "soon"], "--breaker-window-s / INFERENCE_BREAKER_WINDOW_S: 'soon' is not a valid float"),
])
def test_each_option_is_checked_by_its_declaration(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(argv, environ={})


def test_boundary_values_and_unset_options_pass_their_checks() -> None:
    config = load_config(["--upstream-retries", "0", "--breaker-error-rate", "1", "--high-priority-max-running", "1",
                          "--finops-url", ""], environ={"INFERENCE_TORCH_THREADS": ""})
    assert (config.upstream_retries, config.breaker_error_rate, config.high_priority_max_running) == (0, 1.0, 1)
    assert config.finops_url == "" and config.torch_threads is None, "empty means unset: telemetry stays off"
