"""JUnit and HTML reports: valid, escaped, complete, and rendered by a real browser.

Rules: reports come from `bench_fixture.make_bench_report` (realistic, built
through the real statistics code). The browser test drives Debian's
/usr/bin/chromium through /usr/bin/chromedriver headless, loads the file over
file:// and looks at what rendered. It is marked `browser`; it skips only
outside CI when the browser is missing, and fails in CI (CI=true), where
`.ci/run` installs the packages.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from partywall.benchreport import BenchReport, merge_reports
from partywall.reports import write_html, write_junit
from partywall.reports.html import render_html

from .bench_fixture import make_bench_report

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

HOSTILE = '<script>alert("x")</script>'
HOSTILE_EVIDENCE = "</pre><img src=x onerror=alert(1)>\x00\x07 \u202e"


def _failing_report() -> dict[str, Any]:
    report, _ = make_bench_report(connect_failures=2, startup_failures=1)
    report["violations"].append({
        "invariant": "isolation",
        "title": f"tenant t1 received a marker of tenant t2 {HOSTILE}",
        "evidence": {"frame": HOSTILE_EVIDENCE, "connection": "c7"},
        "reproduced": "3/3",
        "replay": "replays/isolation-1.json",
    })
    report["violations"].append({"invariant": "isolation", "title": "a second leak\x01", "evidence": {}})
    report["ok"] = False
    report["target"] = {"kind": "url", "url": 'ws://"evil"&<host>:1/ws'}
    return report


# ---------------------------------------------------------------------------
# JUnit
# ---------------------------------------------------------------------------


def test_reports_junit_has_one_testcase_per_threshold_and_invariant(tmp_path: Path) -> None:
    report = _failing_report()
    path = tmp_path / "out" / "junit.xml"
    write_junit(report, path)
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    suite = suites[0]
    cases = suite.findall("testcase")
    thresholds = [c for c in cases if c.get("classname") == "partywall.thresholds"]
    invariants = [c for c in cases if c.get("classname") == "partywall.invariants"]
    assert [c.get("name") for c in thresholds] == list(report["thresholds"])
    assert [c.get("name") for c in invariants] == [
        "isolation", "routing", "durability", "exactly-once", "ordering", "liveness", "timing", "protocol"]
    assert int(suite.get("tests") or 0) == len(cases) == 1 + 5 + 8
    failed = {c.get("name") for c in cases if c.find("failure") is not None}
    assert failed == {"connect_success_rate", "isolation", "timing"}
    assert int(suite.get("failures") or 0) == 3 and suite.get("errors") == "0"
    isolation = next(c for c in invariants if c.get("name") == "isolation").find("failure")
    assert isolation is not None
    assert (isolation.get("message") or "").endswith(f"{HOSTILE} (and 1 more)")
    assert "reproduced: 3/3" in (isolation.text or "")
    # Characters XML cannot carry are shown escaped, not dropped and not left to break the file.
    assert "\\u0000" in (isolation.text or "") and "a second leak\\x01" in (isolation.text or "")
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["seed"] == "100" and props["plan_fingerprint"] == report["plan_fingerprint"]
    rate = next(c for c in thresholds if c.get("name") == "connect_success_rate").find("failure")
    assert rate is not None and rate.get("message") == "connect_success_rate: actual 0.98 is below limit 1.0."


def test_reports_junit_marks_a_run_that_could_not_be_made_and_checks_not_run(tmp_path: Path) -> None:
    report = {
        "ok": False,
        "error": "nothing is listening at ws://127.0.0.1:9/ws (connection refused); start the server or fix --server-url.",
        "violations": [],
        "not_run": [{"invariant": "durability", "reason": "needs a crash; the url target cannot be crashed"},
                    "crash-restart"],
    }
    path = tmp_path / "junit.xml"
    write_junit(report, path)
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite is not None and suite.get("name") == "partywall.run"
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures"), suite.get("skipped")) == ("10", "1", "0", "2")
    error = suite.find("testcase[@name='run']/error")
    assert error is not None and "nothing is listening" in (error.get("message") or "")
    skipped = suite.find("testcase[@name='durability']/skipped")
    assert skipped is not None and "cannot be crashed" in (skipped.get("message") or "")


# ---------------------------------------------------------------------------
# HTML without a browser
# ---------------------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.extend(attrs)


def test_reports_html_escapes_every_string_from_the_report() -> None:
    report = _failing_report()
    # (The model refuses a threshold of no known form or with a limit that is no number.)
    report["thresholds"]['<b>bold</b>_p95_ms'] = {"limit": 5, "actual": HOSTILE, "ok": False}
    report["latency_ms"]["connect"]["p95"] = "<u>not a number</u>"
    report["seed"] = HOSTILE
    page = render_html(report)
    assert HOSTILE not in page and "<img" not in page and "<b>bold" not in page and "<u>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;/pre&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "ws://&quot;evil&quot;&amp;&lt;host&gt;:1/ws" in page
    parser = _Tags()
    parser.feed(page)
    assert "script" not in parser.tags and "img" not in parser.tags and "iframe" not in parser.tags
    assert not any(name.startswith("on") for name, _ in parser.attrs)


def test_reports_html_is_self_contained() -> None:
    page = render_html(_failing_report())
    # The only URL in the page is the SVG namespace (an identifier, never fetched)
    # and the target's address in the text.
    urls = set(re.findall(r"(?:https?|ftp)://[^\s\"'<>]+", page))
    assert urls == {"http://www.w3.org/2000/svg"}
    parser = _Tags()
    parser.feed(page)
    assert not [name for name, _ in parser.attrs if name in ("src", "href", "srcset", "action")]
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert page.count("<svg") == 9


def test_reports_html_of_a_run_that_could_not_be_made(tmp_path: Path) -> None:
    path = tmp_path / "r.html"
    write_html({"ok": False, "error": "the server command 'x' exited with code 2", "violations": []}, path)
    page = path.read_text()
    assert "could not run" in page and "exited with code 2" in page
    assert "<svg" not in page


def test_reports_html_notes_percentiles_that_are_the_maximum_at_small_n() -> None:
    report, _ = make_bench_report(users=12)
    page = render_html(report)
    assert "p95 and p99 are the maximum at n = 12 (nearest-rank)" in page


def test_reports_html_of_a_merged_sharded_run_shows_each_client() -> None:
    a, _ = make_bench_report(users=30, rng_seed=1, shard=(0, 2), started_at=10.0)
    b, _ = make_bench_report(users=30, rng_seed=2, shard=(1, 2), started_at=10.2, user_offset=30)
    page = render_html(merge_reports([BenchReport.from_json(a), BenchReport.from_json(b)]))
    assert "client (shard 0)" in page and "client (shard 1)" in page
    assert "<dt>shards</dt><dd>2</dd>" in page and "<dt>users</dt><dd>60</dd>" in page


# ---------------------------------------------------------------------------
# HTML in a real browser
# ---------------------------------------------------------------------------


@pytest.fixture
def chromium() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.exists(p) and os.access(p, os.X_OK))]
    if missing:
        message = (f"{', '.join(missing)} missing: install the Debian packages chromium and "
                   "chromium-driver (apt-get install -y chromium chromium-driver).")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("the browser test cannot be skipped in CI: " + message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="partywall-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.browser
@pytest.mark.timeout(90)
def test_reports_html_renders_its_charts_in_chromium(chromium: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    report = _failing_report()
    path = tmp_path / "report.html"
    write_html(report, path)
    chromium.get(path.resolve().as_uri())

    assert chromium.title == "partywall bench report"
    badge = chromium.find_element(By.CSS_SELECTOR, "h1 .badge")
    assert badge.text == "failed" and badge.is_displayed()

    charts = chromium.find_elements(By.CSS_SELECTOR, "svg.chart")
    assert len(charts) == 9
    for chart in charts:
        box = chromium.execute_script(
            "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", chart)
        assert box[0] > 200 and box[1] > 150, (chart.get_attribute("id"), box)
        # What was drawn inside has an area too (not an empty or collapsed SVG).
        drawn = chromium.execute_script(
            "const b = arguments[0].getBBox(); return [b.width, b.height];", chart)
        assert drawn[0] > 100 and drawn[1] > 100, (chart.get_attribute("id"), drawn)

    captions = [c.text for c in chromium.find_elements(By.CSS_SELECTOR, "figcaption") if c.is_displayed()]
    for expected in (
        "Connect (handshake until welcome): n = 98, failures = 2",
        "Agent start-up, as the client sees it: n = 97, failures = 1",
        "Time to first chunk: n = 97, failures = 0",
        "Time to the complete reply: n = 97, failures = 0",
        "History read: n = 97, failures = 0",
        "Established connections and started agents over time",
        "Connections and agent start-ups over time, one row per user",
        "Server and client CPU over time",
        "Server and client memory over time",
    ):
        assert expected in captions

    def count(selector: str) -> int:
        return len(chromium.find_elements(By.CSS_SELECTOR, selector))

    assert count("svg path.cdf") == 5
    assert count("svg .marker") == 15  # p50, p95 and p99 on each distribution
    assert count("#chart-gantt rect") >= 100 + 97
    assert count("#chart-cumulative path.cumulative") == 2
    assert count("#chart-cpu polyline") == 2 and count("#chart-memory polyline") == 2
    p95 = chromium.find_element(By.CSS_SELECTOR, "#chart-latency-agent_startup .marker-p95 text")
    assert p95.text.startswith("p95 ") and p95.text.endswith(" ms")

    # The hostile strings arrived as text, not as markup.
    violations = chromium.find_element(By.CSS_SELECTOR, "ol.violations").text
    assert HOSTILE in violations
    assert count("img") == 0 and count("script") == 0

    severe = [e for e in chromium.get_log("browser") if e.get("level") == "SEVERE"]
    assert severe == []

    height = chromium.execute_script("return document.documentElement.scrollHeight")
    chromium.set_window_size(1280, min(int(height) + 80, 8000))
    shot = tmp_path / "report.png"
    assert chromium.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    keep = os.environ.get("PARTYWALL_SCREENSHOT_DIR")
    if keep:  # CI or a person can keep the picture for the README
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "bench-report.png")
