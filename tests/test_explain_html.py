"""The HTML report: self-contained, and its charts really render in a headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from planner.explain import timeline as tl
from planner.explain.html import MEM_COLORS, TERM_COLOR, render_html, write_html
from tests.explain_sample import GIB, big_plan, count_colour, small_plan


def _gib_plan():
    """The small pipeline plan with memory in GiB so the memory bar is wide enough to see."""
    mem = {
        "parameters": 0.5 * GIB,
        "gradients": 0.5 * GIB,
        "optimizer_states": 1.0 * GIB,
        "activations": 2.0 * GIB,
    }
    return small_plan(memory_bytes=mem, peak_memory_bytes=sum(mem.values()))


def test_report_is_self_contained():
    page = render_html(big_plan())
    assert page.startswith("<!DOCTYPE html>")
    # nothing is fetched: no external scripts, styles, images or fonts
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page
    assert page.count("<svg") >= 2  # step-time terms and memory (the timeline needs the simulator)
    assert 'class="sortable"' in page and "addEventListener('click'" in page
    data = json.loads(re.search(r"id='plan-data'>(.*?)</script>", page, re.S).group(1))
    assert data["plan"] == str(big_plan())
    for needle in (
        "NVLink within a node",
        "tp=4 halves NVLink traffic",
        "pipeline bubble",
        "2.6 TiB",
    ):
        assert needle in page


def test_report_escapes_text():
    plan = big_plan()
    alt = plan.alternatives[0].model_copy(update={"note": "<script>alert(1)</script>"})
    page = render_html(plan.model_copy(update={"alternatives": [alt]}))
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(
    _chromium() is None, reason="chromium is not installed (CI installs it: .ci/run)"
)
def test_charts_render_in_headless_chromium(tmp_path):
    plan = _gib_plan()
    page = write_html(plan, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            page.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    from PIL import Image

    assert Image.open(shot).size == (1200, 2000)
    # every chart drew its marks: colours that appear only in the charts
    entries, _ = tl.plan_timeline(plan)
    if entries:
        assert count_colour(shot, tl.COLORS["F"]) > 1500, "timeline forward bars missing"
        assert count_colour(shot, tl.COLORS["B"]) > 3000, "timeline backward bars missing"
    assert count_colour(shot, TERM_COLOR) > 1500, "step-time chart missing"
    for colour in MEM_COLORS[:4]:  # the four memory categories
        assert count_colour(shot, colour) > 200, f"memory chart: no {colour} segment"
    # and the page is not just a chart: most of it is white background with text
    assert count_colour(shot, "#ffffff") > 1200 * 2000 // 3


def test_write_html_round_trip(tmp_path):
    path = write_html(small_plan(), tmp_path / "r.html")
    assert path.read_text(encoding="utf-8") == render_html(small_plan())
    assert Path(path).stat().st_size > 10_000
