"""A pytest plugin loaded before pytest-django reads the settings (``-p tests.wattson_env``): the
control plane's settings refuse to start without a secret outside development."""

import os

os.environ.setdefault("WATTSON_DEV", "1")
