"""Reporters: the JSON report of a run turned into JUnit XML for CI and HTML for people."""

from partywall.reports.html import write_html
from partywall.reports.junit import write_junit

__all__ = ["write_html", "write_junit"]
