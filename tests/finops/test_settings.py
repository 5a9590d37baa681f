"""Settings from the environment: the README's production environment passes ``check --deploy``
without a warning, production refuses to start without a secret, and a development install without
one makes its own instead of sharing a public key. Each case starts the settings in a fresh process
with only the environment it names."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_KEY = "wattson-development-only-key-not-for-production"  # the key every install used to share
SHOW = ("import json, django; django.setup(); from django.conf import settings as s; print(json.dumps({"
        "'SECRET_KEY': s.SECRET_KEY, 'SESSION_COOKIE_SECURE': s.SESSION_COOKIE_SECURE, "
        "'CSRF_COOKIE_SECURE': s.CSRF_COOKIE_SECURE, 'SECURE_SSL_REDIRECT': s.SECURE_SSL_REDIRECT, "
        "'SECURE_HSTS_SECONDS': s.SECURE_HSTS_SECONDS, 'SECURE_PROXY_SSL_HEADER': s.SECURE_PROXY_SSL_HEADER}))")


def run(args: list[str], env: dict[str, str], var_dir: Path) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` at the repository root with only ``env`` (and a PATH and var directory)."""
    full = {"PATH": os.environ["PATH"], "WATTSON_VAR_DIR": str(var_dir), "DJANGO_SETTINGS_MODULE": "finops.settings",
            **env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)


def settings_with(env: dict[str, str], var_dir: Path) -> dict:
    done = run(["-c", SHOW], env, var_dir)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def readme_production_environment() -> dict[str, str]:
    """The README's production block, a fresh key in place of its placeholder."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Production\n.*?```sh\n(.*?)```", readme, flags=re.S).group(1)
    env = dict(line.split("=", 1) for line in block.splitlines() if line.strip())
    assert env["SECRET_KEY"].startswith("<"), "the README shows a placeholder, never a key"
    env["SECRET_KEY"] = secrets.token_urlsafe(50)
    return env


def test_check_deploy_is_clean_with_the_readme_production_environment(tmp_path: Path) -> None:
    env = readme_production_environment()
    assert env["DEBUG"] == "0"

    done = run(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], env, tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues (0 silenced)." in done.stdout


def test_production_defaults_are_strict_and_development_serves_plain_http(tmp_path: Path) -> None:
    production = settings_with({"SECRET_KEY": secrets.token_urlsafe(50)}, tmp_path)
    development = settings_with({"WATTSON_DEV": "1"}, tmp_path)

    assert production["SESSION_COOKIE_SECURE"] and production["CSRF_COOKIE_SECURE"]
    assert production["SECURE_SSL_REDIRECT"] and production["SECURE_HSTS_SECONDS"] >= 365 * 24 * 3600
    assert production["SECURE_PROXY_SSL_HEADER"] is None  # trusting a forwarded header is opted into
    assert not (development["SESSION_COOKIE_SECURE"] or development["CSRF_COOKIE_SECURE"]
                or development["SECURE_SSL_REDIRECT"] or development["SECURE_HSTS_SECONDS"])


def test_the_proxy_header_is_read_from_the_environment_and_checked(tmp_path: Path) -> None:
    env = {"WATTSON_DEV": "1", "SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https"}
    assert settings_with(env, tmp_path)["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]

    done = run(["-c", SHOW], {**env, "SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto"}, tmp_path)

    assert done.returncode != 0 and "must read like HTTP_X_FORWARDED_PROTO,https" in done.stderr


def test_production_without_a_secret_key_refuses_to_start(tmp_path: Path) -> None:
    done = run(["-c", SHOW], {"DEBUG": "0"}, tmp_path)

    assert done.returncode != 0
    assert "SECRET_KEY must be set" in done.stderr


@pytest.mark.parametrize("mode", [{"DEBUG": "1"}, {"WATTSON_DEV": "1"}])
def test_two_installs_without_a_secret_key_do_not_share_one(tmp_path: Path, mode: dict[str, str]) -> None:
    first = settings_with(mode, tmp_path / "first")["SECRET_KEY"]
    second = settings_with(mode, tmp_path / "second")["SECRET_KEY"]
    first_again = settings_with(mode, tmp_path / "first")["SECRET_KEY"]

    assert first != second
    assert PUBLIC_KEY not in (first, second) and len(first) >= 50
    assert first_again == first, "the runtimes' admin tokens must survive a restart"
    assert (tmp_path / "first" / "secret_key").stat().st_mode & 0o777 == 0o600


ROUTE = ("import django; django.setup(); from finops.celery import app; "
         "print(app.amqp.router.route({}, 'finops.runtimes.tasks.push_ruleset')['queue'].name)")


def test_tasks_go_to_the_queue_the_environment_names(tmp_path: Path) -> None:
    def queue(env: dict[str, str]) -> str:
        done = run(["-c", ROUTE], {"WATTSON_DEV": "1", **env}, tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()[-1]

    assert queue({}) == "celery"
    assert queue({"CELERY_TASK_DEFAULT_QUEUE": "wattson-eu"}) == "wattson-eu"
