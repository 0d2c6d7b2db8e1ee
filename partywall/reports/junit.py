"""JUnit XML of a run or bench report, the format CI systems read.

One ``<testsuite>``; one ``<testcase>`` per threshold (``partywall.thresholds``)
and per invariant (``partywall.invariants``), failed with the breach or the
violations as message and text; checks that did not run are ``<skipped>``;
a run that could not be made is an ``<error>`` of the ``partywall.run``
testcase, so a CI page never shows green for a run that did not happen.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from partywall import thresholds
from partywall.benchreport import BenchReport, as_json

# The invariants of the suite, in the order people read them. A report may
# list its own under "invariants"; any named only in a violation is added.
DEFAULT_INVARIANTS: tuple[str, ...] = (
    "isolation", "routing", "durability", "exactly-once",
    "ordering", "liveness", "timing", "protocol",
)

# Characters XML 1.0 cannot carry at all, not even escaped; evidence (a raw
# frame, a server's error text) may hold them.
_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _dump(value: Any) -> str:
    return _clean(json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=True))


def _breach(name: str, entry: Mapping[str, Any]) -> str:
    # The one wording of a breach, the thresholds' own (the same as the violation's title).
    return thresholds.breach(name, thresholds.Threshold.from_json(entry, name)) + "."


def _not_run_entries(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for item in report.get("not_run") or []:
        if isinstance(item, Mapping):
            name = item.get("invariant") or item.get("check") or item.get("name") or "unnamed"
            out.append((str(name), str(item.get("reason") or "did not run")))
        else:
            out.append((str(item), "did not run against this target"))
    return out


def _testcase(suite: ET.Element, classname: str, name: str, time_s: float = 0.0) -> ET.Element:
    return ET.SubElement(suite, "testcase", classname=classname, name=_clean(name), time=f"{time_s:.3f}")


def build_junit(report: BenchReport | Mapping[str, Any]) -> ET.ElementTree:
    """The JUnit document of a report (see `write_junit`); a bench report is read through its model."""
    report = as_json(report)
    is_bench = "plan_fingerprint" in report
    suite_name = "partywall.bench" if is_bench else "partywall.run"
    duration = float(report.get("duration_s") or 0.0)
    root = ET.Element("testsuites", name="partywall")
    suite = ET.SubElement(root, "testsuite", name=suite_name)
    props = ET.SubElement(suite, "properties")
    target = report.get("target") or {}
    for key, value in (
        ("seed", report.get("seed")),
        ("plan_fingerprint", report.get("plan_fingerprint")),
        ("users", report.get("users")),
        ("target", target.get("kind") if isinstance(target, Mapping) else target),
        ("url", target.get("url") if isinstance(target, Mapping) else None),
    ):
        if value is not None:
            ET.SubElement(props, "property", name=key, value=_clean(value))

    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}

    run = _testcase(suite, "partywall", "run", duration)
    counts["tests"] += 1
    if report.get("error"):
        err = ET.SubElement(run, "error", message=_clean(report["error"]), type="HarnessError")
        err.text = _clean(report["error"])
        counts["errors"] += 1

    for name, entry in (report.get("thresholds") or {}).items():
        case = _testcase(suite, "partywall.thresholds", str(name))
        counts["tests"] += 1
        if not entry.get("ok"):
            failure = ET.SubElement(case, "failure", message=_clean(_breach(str(name), entry)), type="threshold")
            failure.text = _dump(entry)
            counts["failures"] += 1

    violations = list(report.get("violations") or [])
    names = list(report.get("invariants") or DEFAULT_INVARIANTS)
    for v in violations:
        if v.get("invariant") not in names:
            names.append(str(v.get("invariant")))
    skipped = dict(_not_run_entries(report))
    for name in names:
        case = _testcase(suite, "partywall.invariants", name)
        counts["tests"] += 1
        found = [v for v in violations if v.get("invariant") == name]
        if found:
            first = str(found[0].get("title") or "violated")
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            failure = ET.SubElement(case, "failure", message=_clean(first + more), type=_clean(name))
            failure.text = "\n\n".join(
                f"{v.get('title')}\nreproduced: {v.get('reproduced', 'n/a')}  replay: {v.get('replay', 'n/a')}\n"
                f"{_dump(v.get('evidence') or {})}"
                for v in found
            )
            failure.text = _clean(failure.text)
            counts["failures"] += 1
        elif name in skipped:
            ET.SubElement(case, "skipped", message=_clean(skipped.pop(name)))
            counts["skipped"] += 1
    for name, reason in skipped.items():  # checks that are not invariants
        case = _testcase(suite, "partywall.checks", name)
        ET.SubElement(case, "skipped", message=_clean(reason))
        counts["tests"] += 1
        counts["skipped"] += 1

    for element in (root, suite):
        for key, value in counts.items():
            element.set(key, str(value))
        element.set("time", f"{duration:.3f}")
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(report: BenchReport | Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the report as JUnit XML: one testsuite, a testcase per threshold and invariant."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    build_junit(report).write(out, encoding="utf-8", xml_declaration=True)
