"""A pytest plugin loaded before pytest-django reads the settings (``-p tests.wattson_env``): the
control plane's settings refuse to start without a secret outside development. The runtime's compiled
kernels (``inference.engine.q4_decode``) go into the checkout's ``.cache``, not the user's home."""

import os
from pathlib import Path

os.environ.setdefault("WATTSON_DEV", "1")
os.environ.setdefault("WATTSON_KERNEL_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "kernels"))
