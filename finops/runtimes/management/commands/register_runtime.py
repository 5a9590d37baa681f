"""``manage.py register_runtime NAME --url URL``: register a runtime and print its tokens, once.

Two tokens: the ingest token the runtime sends telemetry and pulls rulesets with (stored as a
digest), and the admin token the control plane pushes rulesets to it with (derived from
SECRET_KEY and a stored salt, never stored). Rotating SECRET_KEY changes every admin token: give
each runtime its new one with ``--rotate-admin-token``.
"""

from __future__ import annotations

import shlex
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from finops.runtimes.models import Runtime
from finops.runtimes.services import runtime_admin_token_rotate, runtime_register, runtime_token_rotate

DEFAULT_FINOPS_URL = "http://127.0.0.1:8000"


class Command(BaseCommand):
    help = (
        "Register an inference runtime and print the token it sends telemetry with and the admin token "
        "the control plane pushes rulesets with. The ingest token is shown once and stored only as a digest; "
        "--rotate issues a new one (revoking the old ones). The admin token is derived from SECRET_KEY: "
        "after changing SECRET_KEY, or if it leaked, --rotate-admin-token gives the runtime a new one."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="the runtime's --runtime-id (letters, digits, - and _)")
        parser.add_argument("--url", help="where the control plane reaches the runtime, e.g. http://gpu-1:8080")
        parser.add_argument("--rotate", action="store_true",
                            help="issue a new token for an existing runtime and revoke its old ones")
        parser.add_argument("--rotate-admin-token", action="store_true",
                            help="give an existing runtime a new admin token (after SECRET_KEY changed)")
        parser.add_argument("--finops-url", default=None,
                            help="this control plane's URL as the runtime sees it, for the start command "
                                 f"(default: the WATTSON_PUBLIC_URL setting or {DEFAULT_FINOPS_URL})")

    def handle(self, *args: Any, name: str, url: str | None, rotate: bool, finops_url: str | None,
               rotate_admin_token: bool = False, **options: Any) -> None:
        if rotate_admin_token:
            if url or rotate:
                raise CommandError("--rotate-admin-token cannot be combined with --url or --rotate")
            runtime = Runtime.objects.filter(name=name).first()
            if runtime is None:
                raise CommandError(f"no runtime named {name!r} is registered; register it with --url first")
            admin_token = runtime_admin_token_rotate(runtime=runtime)
            self.stdout.write(f"Issued a new admin token for runtime {name!r}; pushes now use it.")
            self.stdout.write(f"Admin token: {admin_token}")
            self.stdout.write(f"Restart the runtime with: --admin-token {shlex.quote(admin_token)}")
            return
        if rotate:
            if url:
                raise CommandError("--url cannot be combined with --rotate: change a runtime's URL in the admin")
            runtime = Runtime.objects.filter(name=name).first()
            if runtime is None:
                raise CommandError(f"no runtime named {name!r} is registered; register it with --url first")
            token = runtime_token_rotate(runtime=runtime)
            self.stdout.write(f"Issued a new token for runtime {name!r}; its previous tokens are revoked.")
        else:
            if not url:
                raise CommandError("--url is required to register a runtime (or pass --rotate for a new token)")
            try:
                runtime, token = runtime_register(name=name, base_url=url)
            except ValidationError as exc:
                hint = " (use --rotate to issue it a new token)" if _is_duplicate(exc) else ""
                raise CommandError(_describe(exc) + hint) from exc
            self.stdout.write(f"Registered runtime {name!r} at {runtime.base_url}.")
        finops_url = finops_url or getattr(settings, "WATTSON_PUBLIC_URL", None) or DEFAULT_FINOPS_URL
        admin_token = runtime.admin_token()
        self.stdout.write(f"Token (shown only now; store it safely): {token}")
        self.stdout.write(f"Admin token (the runtime's --admin-token, for ruleset pushes): {admin_token}")
        self.stdout.write("Start the runtime with:")
        self.stdout.write(
            f"  INFERENCE_FINOPS_URL={shlex.quote(finops_url)} INFERENCE_FINOPS_TOKEN={shlex.quote(token)} "
            f"python -m inference serve --runtime-id {shlex.quote(runtime.name)} "
            f"--admin-token {shlex.quote(admin_token)}"
        )


def _describe(exc: ValidationError) -> str:
    if hasattr(exc, "message_dict"):
        return "; ".join(f"{field}: {' '.join(messages)}" for field, messages in exc.message_dict.items())
    return " ".join(exc.messages)


def _is_duplicate(exc: ValidationError) -> bool:
    return any(error.code == "duplicate" for error in getattr(exc, "error_dict", {}).get("name", []))
