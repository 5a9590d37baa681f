"""`python -m demo.screenshots`: full-page screenshots of every dashboard page of a running demo.

Logs in with Playwright on Debian's Chromium (``/usr/bin/chromium``; never ``playwright install``),
opens the pages the navigation links to, and from each list page its first detail page, waits for
their charts to draw, and saves one PNG per page in ``docs/screenshots/`` (``--out``). Start the
demo first (``make demo``, or ``python -m demo`` in another terminal) and leave it serving.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from demo.__main__ import DEFAULT_PASSWORD

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"
# Links that are not pages to show: leaving, exports, the API, Django's admin, static files.
SKIP = re.compile(r"^/(accounts/logout|admin|api|static)(/|$)|\.csv$|[?&](format|export)=csv|/export|"
                  r"/(edit|delete|pause|resume)/?$")
# /features/search/, /budgets/3/: one row of a list page (/budgets/new/, the form, is a page of its own).
DETAIL = re.compile(r"^/[\w-]+/(?!new/?$)[^/?#]+/?$")


def page_name(path: str) -> str:
    """A file name for a page's path: ``/`` is ``overview``, ``/features/search/`` ``features-search``."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", urlsplit(path).path).strip("-").lower()
    return name or "overview"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.screenshots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the demo's control plane")
    parser.add_argument("--user", default="demo-admin")
    parser.add_argument("--password", default=DEFAULT_PASSWORD)
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--width", type=int, default=1440, help="viewport width in CSS pixels")
    parser.add_argument("--range", default="1h",
                        help="the dashboards' time range (1h, 24h, 7d, 30d); a demo's few minutes show best in 1h")
    parser.add_argument("--max-pages", type=int, default=24)
    parser.add_argument("--page", action="append", default=[],
                        help="a path to take instead of following the navigation (repeatable)")
    args = parser.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("playwright is not installed: `.venv/bin/pip install -e '.[dev]'`", file=sys.stderr)
        return 2
    if not Path(CHROMIUM).exists():
        print(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium`", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.url.rstrip("/")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{base}/accounts/login/")
        page.fill("input[name=username]", args.user)
        page.fill("input[name=password]", args.password)
        page.click("form [type=submit]")
        page.wait_for_load_state("networkidle")
        if "/accounts/login" in page.url:
            print(f"could not log in as {args.user!r} at {base}", file=sys.stderr)
            return 1
        # The overview, the pages it links to, and from each of those its first detail page.
        queue: list[tuple[str, bool]] = [(path, True) for path in args.page] or [("/", False)]
        seen: set[str] = set()
        while queue and len(seen) < args.max_pages:
            path, leaf = queue.pop(0)
            if path in seen:
                continue
            seen.add(path)
            response = page.goto(f"{base}{path}{'&' if '?' in path else '?'}range={args.range}")
            if response is None or not response.ok:
                print(f"  {path}: HTTP {response.status if response else 'no answer'}, skipped")
                continue
            _settle(page)
            target = args.out / f"{page_name(path)}.png"
            page.screenshot(path=str(target), full_page=True)
            print(f"  {path} -> {target}")
            if not leaf:
                queued = {p for p, _ in queue} | seen
                # From the overview its navigation; from each page it links to, that page's first
                # row's detail and any page not seen yet (the new-budget form).
                links = [link for link in _links(page, base) if path != "/" or not DETAIL.match(link)]
                queue += [(link, path != "/") for link in links if link not in queued]
        browser.close()
    if errors:
        print("JavaScript errors on the pages:\n  " + "\n  ".join(errors), file=sys.stderr)
    return 0


def _settle(page: Page) -> None:
    """Wait until the page is quiet and its plotly charts have drawn."""
    page.wait_for_load_state("networkidle")
    # A page without charts, or one whose charts did not draw in time, is taken as it is.
    with contextlib.suppress(Exception):
        page.wait_for_function(
            "() => [...document.querySelectorAll('.js-plotly-plot')].every(p => p.querySelector('.main-svg'))",
            timeout=10_000)
    page.wait_for_timeout(800)


def _links(page: Page, base: str) -> list[str]:
    """Same-site page links: every link in the navigation, and from each list page its first row."""
    hrefs: list[str] = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
    paths: list[str] = []
    details = 0
    for href in hrefs:
        url = urljoin(base + "/", href)
        if not url.startswith(base):
            continue
        # Filters in a link's query are the current ones: each page is taken once, under --range.
        path = urlsplit(url[len(base):]).path or "/"
        if SKIP.search(path) or path in paths:
            continue
        if DETAIL.match(path):
            if details:
                continue
            details += 1
        paths.append(path)
    return paths


if __name__ == "__main__":
    sys.exit(main())
