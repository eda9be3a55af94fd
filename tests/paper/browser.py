"""Render the paper's ``index.html`` in headless Chromium and check it as a reader sees it (issue 15).

``check_page(html_path, screenshot_path)`` opens the page at 1280 x 900 px with every network request refused, then,
through a script run in the page: no table is cut (a table wider than its box must sit in a box that scrolls, the
page itself never scrolls sideways, the main and ablation tables fit whole in their default view, and nothing is
cut with every column and disclosure opened), every ``<img>`` loaded (``naturalWidth > 0``), and clicking a number
shows its provenance box with the number, its per-seed values and each source file's sha256. It saves a screenshot
of the top of the page and returns a report.

Chromium is Debian's (``apt-get install chromium``, done by ``.ci/run``), driven by Playwright over CDP; the test
never downloads a browser. ``BrowserMissing`` is raised when it is not installed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

WIDTH, HEIGHT = 1280, 900
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DEFAULT_CHROMIUM = "/usr/bin/chromium"  # Debian's package
MUST_FIT = ("main", "ablation")  # tables readable whole at WIDTH in their default (collapsed) view


class BrowserMissing(RuntimeError):
    """No Chromium (or no Playwright) on this machine."""


def chromium_path() -> str:
    """``$FRANCA_CHROMIUM``, else ``/usr/bin/chromium``, else ``chromium`` on PATH."""
    for cand in (os.environ.get("FRANCA_CHROMIUM"), DEFAULT_CHROMIUM, shutil.which("chromium")):
        if cand and Path(cand).is_file():
            return cand
    raise BrowserMissing("Chromium not found: apt-get install -y chromium (or set FRANCA_CHROMIUM)")


# run in the page: every visible table against its box; returns a list of problems (strings)
_LAYOUT_JS = """(mustFit) => {
  const problems = [];
  const doc = document.documentElement;
  if (doc.scrollWidth > doc.clientWidth + 1)
    problems.push(`the page scrolls sideways: ${doc.scrollWidth} px of content in ${doc.clientWidth} px`);
  for (const table of document.querySelectorAll('table')) {
    if (table.offsetParent === null) continue;  // not displayed (a closed provenance box)
    const box = table.parentElement;
    const scrolls = ['auto', 'scroll'].includes(getComputedStyle(box).overflowX);
    const holder = table.closest('section, details, .prov, body');
    const heading = holder.querySelector('h1, h2, h3');
    const name = holder.id || (heading ? heading.textContent : table.innerText.slice(0, 40));
    if (box.getBoundingClientRect().right > doc.clientWidth + 1)
      problems.push(`box of table "${name}" ends at ${box.getBoundingClientRect().right} px`);
    if (table.scrollWidth > box.clientWidth + 1 && !scrolls)
      problems.push(`table "${name}" (${table.scrollWidth} px) overflows its box (${box.clientWidth} px)`);
  }
  for (const id of mustFit) {
    const h = document.getElementById('table-' + id);
    if (!h) { problems.push(`no table ${id}`); continue; }
    let el = h.nextElementSibling;  // the first table after the heading
    while (el && !(el.matches('table') || el.querySelector('table'))) el = el.nextElementSibling;
    const table = el && (el.matches('table') ? el : el.querySelector('table'));
    if (!table) { problems.push(`no table after the heading of ${id}`); continue; }
    if (table.scrollWidth > table.parentElement.clientWidth + 1)
      problems.push(`${id} table is ${table.scrollWidth} px wide in a ${table.parentElement.clientWidth} px box`);
  }
  return problems;
}"""

_IMAGES_JS = """() => Array.from(document.images).map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0}))"""

# the displayed provenance box of the last clicked number
_BOX_JS = """(href) => {
  const box = document.getElementById(href.slice(1));
  if (!box) return null;
  return {shown: getComputedStyle(box).display !== 'none' && box.getBoundingClientRect().height > 0,
          hash: location.hash, text: box.innerText};
}"""


def check_page(html_path: str | Path, screenshot_path: str | Path, clicks: int = 3) -> dict:
    """Open ``html_path`` in headless Chromium at 1280 px and assert what a reader needs (module docstring).

    Returns ``{"tables", "images", "clicked", "screenshot", "blocked"}``; raises ``AssertionError`` listing every
    problem found, or ``BrowserMissing``.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:  # pragma: no cover - the lock pins playwright
        raise BrowserMissing(f"playwright is not installed: {err}") from err
    executable = chromium_path()
    html_path, screenshot_path = Path(html_path).resolve(), Path(screenshot_path)
    blocked: list[str] = []

    def refuse(route) -> None:  # self-contained: only the file itself and data: URIs may load
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
            page.set_default_timeout(10_000)
            page.route("**/*", refuse)
            page.goto(html_path.as_uri(), wait_until="load")
            screenshot_path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot_path))
            problems = list(page.evaluate(_LAYOUT_JS, list(MUST_FIT)))
            page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
            page.evaluate("() => document.querySelectorAll('input.more').forEach(c => c.click())")
            problems += page.evaluate(_LAYOUT_JS, [])  # every column shown, and the per-round RASA table
            images = page.evaluate(_IMAGES_JS)
            problems += [f"image '{i['alt']}' did not load" for i in images if not i["ok"]]
            clicked = _click_numbers(page, clicks, problems)
        finally:
            browser.close()
    problems += [f"the page requested {url}" for url in blocked]
    n_tables = html_path.read_text(encoding="utf-8").count("<table")
    assert not problems, "\n".join(problems)
    return {"tables": n_tables, "images": len(images), "clicked": clicked, "screenshot": str(screenshot_path)}


def check_page_or_skip(html_path: str | Path, screenshot_path: str | Path, clicks: int = 3) -> dict:
    """``check_page`` inside a pytest test: skips without Chromium, but fails when ``CI_REQUIRE_BROWSER=1``
    (``.ci/run`` sets it after installing Debian's chromium)."""
    import pytest

    try:
        return check_page(html_path, screenshot_path, clicks)
    except BrowserMissing as err:
        if os.environ.get("CI_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CI_REQUIRE_BROWSER=1 but no browser: {err}")
        pytest.skip(str(err))


def _click_numbers(page, clicks: int, problems: list[str]) -> list[str]:
    """Click the first ``clicks`` numbers of the main table (and one of the ablation table); check each box."""
    links = page.locator("#table-main ~ * a.num:visible")
    targets = [links.nth(i) for i in range(min(clicks, links.count()))]
    ablation = page.locator("#table-ablation ~ * a.num:visible")
    targets += [ablation.first] if ablation.count() else []
    if not targets:
        problems.append("no number to click in the main or ablation table")
    clicked = []
    for link in targets:
        text, href = link.inner_text(), link.get_attribute("href")
        link.click()
        box = page.evaluate(_BOX_JS, href)
        if box is None or not box["shown"]:
            problems.append(f"clicking {text!r} did not show its provenance box {href}")
            continue
        if box["hash"] != href or text not in box["text"] or "sha256" not in box["text"]:
            problems.append(f"the provenance box of {text!r} lacks the number or a sha256: {box['text'][:200]!r}")
        clicked.append(f"{text} -> {href}")
    return clicked
