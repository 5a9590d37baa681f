"""plotly.js and the dashboards' own CSS and script are served from static/, never a CDN: the
browser's plotly.js is the installed plotly package's own copy, served by WhiteNoise under any
server (uvicorn included), and `collectstatic` gathers it."""

from __future__ import annotations

from pathlib import Path

import plotly
import pytest
from django.core.management import call_command
from django.test import Client


def test_plotly_js_is_the_installed_packages_copy_and_is_served(client: Client) -> None:
    response = client.get("/static/plotly/plotly.min.js")
    assert response.status_code == 200
    body = b"".join(response.streaming_content) if response.streaming else response.content
    assert body == (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()


@pytest.mark.parametrize("path", ["/static/dashboards/charts.js", "/static/dashboards/dashboards.css",
                                  "/static/django_htmx/htmx-2.min.js"])
def test_the_dashboards_static_files_are_served(client: Client, path: str) -> None:
    assert client.get(path).status_code == 200


def test_no_page_loads_anything_from_another_host() -> None:
    templates = Path(__file__).resolve().parents[2] / "finops" / "dashboards" / "templates"
    for template in templates.rglob("*.html"):
        assert "https://" not in template.read_text() and "http://" not in template.read_text(), template


def test_collectstatic_gathers_plotly(tmp_path: Path, settings) -> None:
    settings.STATIC_ROOT = tmp_path
    call_command("collectstatic", interactive=False, verbosity=0)
    assert (tmp_path / "plotly" / "plotly.min.js").is_file()
    assert (tmp_path / "dashboards" / "charts.js").is_file()
