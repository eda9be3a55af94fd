"""The paper page in a real browser (issue 15): headless Chromium at 1280 px, through tests/paper/browser.py.

Without Chromium the test skips, except where ``CI_REQUIRE_BROWSER=1`` (``.ci/run`` sets it and installs Debian's
chromium): there it fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import check_page_or_skip
from fake_results import EXPERIMENTS, fake_inputs

from franca.paper.build import build_paper

REFERENCE = Path(__file__).resolve().parents[2] / "config" / "reference" / "paper_readme.yaml"


def test_page_in_headless_chromium(fake_tree, tmp_path):
    root = fake_tree.parent
    out = tmp_path / "paper"
    build_paper(
        fake_inputs(root),
        out,
        experiments=EXPERIMENTS,
        preset="tiny",
        reference_yaml=REFERENCE,
        root=root,
        mask_draws=400,
    )
    report = check_page_or_skip(out / "index.html", tmp_path / "screenshot.png")
    print(f"paper page screenshot: {report['screenshot']}")  # the test's artifact (pytest -s shows it)
    assert Path(report["screenshot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["images"] == len(list((out / "figures").glob("*.png"))) >= 8  # PCA maps included
    assert len(report["clicked"]) == 4


def test_browser_missing_fails_under_ci_require_browser(tmp_path, monkeypatch):
    monkeypatch.setenv("FRANCA_CHROMIUM", str(tmp_path / "no-such-chromium"))
    monkeypatch.setattr("browser.DEFAULT_CHROMIUM", str(tmp_path / "no-such-chromium"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="CI_REQUIRE_BROWSER=1"):
        check_page_or_skip(tmp_path / "x.html", tmp_path / "x.png")
    monkeypatch.delenv("CI_REQUIRE_BROWSER")
    with pytest.raises(pytest.skip.Exception, match="Chromium not found"):
        check_page_or_skip(tmp_path / "x.html", tmp_path / "x.png")


def test_check_page_finds_a_cut_table_and_a_broken_image(tmp_path):
    """The checks can fail: a wide table outside a scrolling box, and an image that does not decode."""
    cells = "".join(f"<td>{'x' * 40}</td>" for _ in range(12))
    page = tmp_path / "bad.html"
    page.write_text(
        '<html><body style="max-width:1000px"><h2 id="table-main">m</h2><div class="wrap"><table><tr>'
        f'{cells}</tr></table></div><img alt=broken src="data:image/png;base64,AAAA"></body></html>'
    )
    with pytest.raises(AssertionError) as err:
        check_page_or_skip(page, tmp_path / "bad.png")
    text = str(err.value)
    assert "overflows its box" in text and "image 'broken' did not load" in text and "no table ablation" in text
