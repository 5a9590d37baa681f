"""``python -m inference serve|prepare-model``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

USAGE = """usage: python -m inference COMMAND [options]

commands:
  serve            serve models over the OpenAI-compatible API (see: serve --help)
  prepare-model    fetch and convert SmolLM2 weights once: prepare-model smollm2 [--model-cache-dir DIR]
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return _serve(rest)
    if command == "prepare-model":
        return _prepare(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _serve(argv: list[str]) -> int:
    from inference.config import ConfigError, load_config

    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per telemetry POST is noise
    if not config.api_keys:
        logging.getLogger("inference").warning("no API keys configured (INFERENCE_API_KEYS): every request "
                                               "will be refused with 401")
    import uvicorn

    from inference.api import create_app

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level,
                access_log=False, timeout_graceful_shutdown=10)
    return 0


def _prepare(argv: list[str]) -> int:
    import argparse

    from inference.engine.models import SMOLLM2, ModelLoadError, prepare_smollm2

    parser = argparse.ArgumentParser(prog="python -m inference prepare-model")
    parser.add_argument("model", choices=[SMOLLM2])
    parser.add_argument("--model-cache-dir", type=Path, default=Path(".cache/models"))
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    try:
        path = prepare_smollm2(args.model_cache_dir)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"SmolLM2-135M-Instruct ready in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
