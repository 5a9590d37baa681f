"""Settings, all from environment variables, with safe development defaults and strict production ones.

Development is ``DEBUG=1`` or ``WATTSON_DEV=1`` (the demo and the tests): plain HTTP, and without a
``SECRET_KEY`` a random key made once for this install and kept in ``var/secret_key``. Production is
neither: ``SECRET_KEY`` must be set, cookies are secure, plain HTTP is redirected and HSTS is on
unless the environment says otherwise (the README's production section lists what makes
``manage.py check --deploy`` clean). ``DATABASE_URL`` selects PostgreSQL (psycopg 3); without it a
SQLite file under ``var/`` is used. ``CELERY_BROKER_URL`` selects Redis or RabbitMQ; without it
Celery uses kombu's filesystem transport, which needs no server.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import sys
import tempfile
import zoneinfo
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("WATTSON_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str = "") -> list[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


def development_secret_key(var_dir: Path) -> str:
    """This install's own key, made once and kept in ``var_dir/secret_key`` (readable by its owner
    only). Never a key every checkout shares: the runtimes' admin tokens are HMACs under it."""
    path = var_dir / "secret_key"
    try:
        if not path.exists():
            var_dir.mkdir(parents=True, exist_ok=True)
            draft = path.with_name(f".secret_key.{os.getpid()}")
            with os.fdopen(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
                file.write(secrets.token_urlsafe(50) + "\n")
            try:
                os.link(draft, path)  # atomic: processes starting at once all keep the first key
                sys.stderr.write(f"wattson: no SECRET_KEY set; made this install's own in {path}\n")
            except FileExistsError:
                pass
            finally:
                draft.unlink()
        key = path.read_text().strip()
    except OSError as exc:
        raise ImproperlyConfigured(f"SECRET_KEY is not set and no key could be kept in {path}: {exc}") from exc
    if len(key) < 50:
        raise ImproperlyConfigured(f"{path} holds no usable key: delete it to have a new one made, or set SECRET_KEY")
    return key


def proxy_ssl_header(value: str) -> tuple[str, str] | None:
    """``HTTP_X_FORWARDED_PROTO,https``: the header (as Django names it) and the value that mark a
    request the TLS-terminating proxy received over HTTPS."""
    if not value:
        return None
    header, _, expected = (part.strip() for part in value.partition(","))
    if not (header.startswith("HTTP_") and expected):
        raise ImproperlyConfigured(f"SECURE_PROXY_SSL_HEADER {value!r} must read like HTTP_X_FORWARDED_PROTO,https")
    return header, expected


DEBUG = env_bool("DEBUG")
DEVELOPMENT = DEBUG or env_bool("WATTSON_DEV")
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEVELOPMENT:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off (or set WATTSON_DEV=1 for development)")
    SECRET_KEY = development_secret_key(VAR_DIR)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

# -- HTTPS: strict in production, plain HTTP on localhost in development ---------------------------
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEVELOPMENT)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEVELOPMENT)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEVELOPMENT)
# Paths served over plain HTTP all the same (regular expressions, e.g. ^api/ for runtimes on a private network).
SECURE_REDIRECT_EXEMPT = env_list("SECURE_REDIRECT_EXEMPT")
SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", "0" if DEVELOPMENT else str(365 * 24 * 3600)))
# Both commit every subdomain (and, with preload, every browser) to HTTPS: the operator's choice.
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS")
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD")
# Only behind a proxy that sets this header on every request and drops any a client sent.
SECURE_PROXY_SSL_HEADER = proxy_ssl_header(os.environ.get("SECURE_PROXY_SSL_HEADER", ""))

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "template_partials",
    "django_htmx",
    "finops.runtimes",
    "finops.pricing",
    "finops.telemetry",
    "finops.dashboards",
    "finops.budgets",
    "finops.regressions",
    "finops.caching",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves static/ (plotly.js, the dashboards' CSS) under any server, uvicorn included.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "finops.urls"
WSGI_APPLICATION = "finops.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'wattson.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60, conn_health_checks=True)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    # WAL lets the dashboard read while the worker writes; a busy timeout rides out short locks.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # The test database is a file too, not SQLite's in-memory one: a live server (system and browser
    # tests) then opens a connection per thread and waits on locks as deployed, where in memory it
    # either shared the test's one connection and transaction or met "table is locked" at once.
    DATABASES["default"]["TEST"] = {"NAME": str(Path(tempfile.gettempdir()) / f"wattson-test-{os.getpid()}.sqlite3")}
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Dashboard queries are mid-sized aggregates: JIT compilation costs more than it saves there
    # (~60 ms measured), and a larger work_mem keeps their sorts in memory.
    _pg_options = DATABASES["default"].setdefault("OPTIONS", {})
    _pg_options["options"] = os.environ.get("POSTGRES_OPTIONS", "-c jit=off -c work_mem=32MB")
    # Under ASGI each request runs in a fresh thread, so CONN_MAX_AGE cannot keep a connection:
    # without a pool every ingest POST paid for a new session (measured: 400 POSTs, 400 sessions).
    if env_bool("DATABASE_POOL", True):
        _pg_options["pool"] = {"min_size": 2, "max_size": int(os.environ.get("DATABASE_POOL_MAX", "8"))}
        DATABASES["default"]["CONN_MAX_AGE"] = 0
        # With a pool, Django makes this the pool's check on every checkout (one round trip): a
        # session the server ended is replaced instead of failing a request. Off, each pooled
        # session that died with a PostgreSQL restart failed one ingest POST after the server was
        # back (503s for 10-25 s; the fault suite's postgres_restart).
        DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
USE_TZ = True
TIME_ZONE = "UTC"
# The organisation's time zone: budget periods and dashboards are shown in it.
WATTSON_TIME_ZONE = os.environ.get("WATTSON_TIME_ZONE", "UTC")
# Budget periods (day, week, month) start at midnight here; WATTSON_TIME_ZONE is the older name.
ORG_TIME_ZONE = os.environ.get("ORG_TIME_ZONE") or WATTSON_TIME_ZONE
try:
    zoneinfo.ZoneInfo(ORG_TIME_ZONE)
except (zoneinfo.ZoneInfoNotFoundError, ValueError) as _exc:
    raise ImproperlyConfigured(f"ORG_TIME_ZONE {ORG_TIME_ZONE!r} is not a known time zone") from _exc
# This control plane's address as people reach it: links in alert emails point here.
SITE_URL = os.environ.get("SITE_URL", "http://127.0.0.1:8000").rstrip("/")

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").is_dir() else []
# plotly.js from the installed plotly package (static/plotly/plotly.min.js), so the browser's copy
# always matches the Python package that builds the figures; the machines have no internet.
STATICFILES_DIRS.append(("plotly", str(Path(importlib.util.find_spec("plotly").origin).parent / "package_data")))
STATIC_ROOT = VAR_DIR / "staticfiles"
# WhiteNoise warns on every start when STATIC_ROOT is missing (before the first collectstatic).
with contextlib.suppress(OSError):
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)
# WhiteNoise serves from the finders too, so a server started without `collectstatic` still has them.
WHITENOISE_USE_FINDERS = env_bool("WHITENOISE_USE_FINDERS", True)
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboards:overview"  # product managers land on the overview
LOGOUT_REDIRECT_URL = "login"

EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "25"))
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS")
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "wattson@localhost")
# Each socket operation of an SMTP send waits at most this long (Django's default is forever).
EMAIL_TIMEOUT = int(os.environ.get("EMAIL_TIMEOUT", "30"))
# An alert claimed for sending by a worker that did not finish is claimed again after this lease;
# it is far longer than one SMTP send can take (a few socket operations of EMAIL_TIMEOUT each).
ALERT_CLAIM_LEASE_SECONDS = int(os.environ.get("ALERT_CLAIM_LEASE_SECONDS", "300"))
if ALERT_CLAIM_LEASE_SECONDS < 8 * EMAIL_TIMEOUT:
    raise ImproperlyConfigured(f"ALERT_CLAIM_LEASE_SECONDS ({ALERT_CLAIM_LEASE_SECONDS}) must be at least 8 times "
                               f"EMAIL_TIMEOUT ({EMAIL_TIMEOUT}), or a slow send could outlast its lease")

# -- Celery ------------------------------------------------------------------------------------
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "filesystem://")
if CELERY_BROKER_URL == "filesystem://":
    _broker_dir = VAR_DIR / "celery-broker"
    for _folder in ("out", "processed", "control"):
        (_broker_dir / _folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "out"),
        "data_folder_out": str(_broker_dir / "out"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
# Results are kept only where a pass of budget evaluation is split over workers (a chord needs them):
# by default in Redis when Redis is the broker; ``CELERY_RESULT_BACKEND`` names another.
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND") or (
    CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://")) else None)
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER")
# Tasks go to this queue (workers consume it by default): control planes sharing one broker each
# keep to their own.
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "celery")
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE = {
    "telemetry-rollup": {"task": "finops.telemetry.tasks.rollup", "schedule": 10.0, "options": {"expires": 9}},
    "telemetry-sample-rollup": {"task": "finops.telemetry.tasks.sample_rollup", "schedule": 30.0,
                                "options": {"expires": 29}},
    "telemetry-retention": {"task": "finops.telemetry.tasks.retention", "schedule": 3600.0,
                            "options": {"expires": 3000}},
    "budgets-evaluate": {"task": "finops.budgets.tasks.evaluate", "schedule": 5.0, "options": {"expires": 4}},
    # A safety net: evaluation queues alerts itself; this retries failed sends and sweeps stragglers.
    "budgets-send-alerts": {"task": "finops.budgets.tasks.send_alerts", "schedule": 60.0,
                            "options": {"expires": 55}},
    # Each complete hour of every feature against its baseline (docs/DASHBOARDS.md, "Cost regressions").
    "regressions-detect": {"task": "finops.regressions.tasks.detect", "schedule": 600.0, "options": {"expires": 590}},
    "regressions-send-alerts": {"task": "finops.regressions.tasks.send_alerts", "schedule": 300.0,
                                "options": {"expires": 290}},
}
# The FOCUS export's billing account (the organisation paying) and provider, publisher and invoice issuer.
FOCUS_BILLING_ACCOUNT = os.environ.get("FOCUS_BILLING_ACCOUNT", "wattson")
FOCUS_PROVIDER = os.environ.get("FOCUS_PROVIDER", "Wattson")
# The bearer token a FinOps tool pulls GET /api/v1/focus with; unset, that endpoint is off.
FOCUS_API_TOKEN = os.environ.get("FOCUS_API_TOKEN", "")
# Who gets cost regression alerts (comma-separated); empty: every active superuser with an email.
REGRESSION_ALERT_EMAILS = [a.strip() for a in os.environ.get("REGRESSION_ALERT_EMAILS", "").split(",") if a.strip()]

# -- Budgets ------------------------------------------------------------------------------------
# Budgets evaluated together in one transaction; a pass over more is split into chunks of this size,
# run by several workers at once where a result backend lets Celery join them (docs/DEPLOY.md).
BUDGET_EVALUATION_CHUNK = int(os.environ.get("BUDGET_EVALUATION_CHUNK", "2500"))

# -- Telemetry ----------------------------------------------------------------------------------
RAW_RETENTION_DAYS = int(os.environ.get("RAW_RETENTION_DAYS", "30"))
SAMPLE_RETENTION_DAYS = int(os.environ.get("SAMPLE_RETENTION_DAYS", "7"))
MINUTE_ROLLUP_RETENTION_DAYS = int(os.environ.get("MINUTE_ROLLUP_RETENTION_DAYS", "7"))
# Task rows (one per request or named task: cost per successful task, waste) by their first attempt.
TASK_RETENTION_DAYS = int(os.environ.get("TASK_RETENTION_DAYS", "90"))
if TASK_RETENTION_DAYS < RAW_RETENTION_DAYS:
    raise ImproperlyConfigured(f"TASK_RETENTION_DAYS ({TASK_RETENTION_DAYS}) must be at least RAW_RETENTION_DAYS "
                               f"({RAW_RETENTION_DAYS}): a late attempt must find its task")
INGEST_MAX_BODY_BYTES = int(os.environ.get("INGEST_MAX_BODY_BYTES", str(16 * 1024 * 1024)))
INGEST_MAX_RECORDS = int(os.environ.get("INGEST_MAX_RECORDS", "5000"))
# Rollups leave events received in the last few seconds to the raw tail, so an ingest transaction
# that commits late is never skipped by a watermark that has passed it.
ROLLUP_SETTLE_SECONDS = int(os.environ.get("ROLLUP_SETTLE_SECONDS", "5"))
DATA_UPLOAD_MAX_MEMORY_SIZE = INGEST_MAX_BODY_BYTES

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}
