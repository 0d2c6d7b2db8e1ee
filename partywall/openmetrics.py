"""The bench report as Prometheus metrics: OpenMetrics text, and a push to a Pushgateway.

Everything here works from the report as `partywall bench` writes it (the
``report.json`` mapping, a merged shard report included), never from the run
itself, so a stored report can be rendered again later. The metrics go into a
private `CollectorRegistry` of their own (never prometheus_client's global
one, which would mix in the client's process and GC metrics and keep state
from one call to the next) and come out through prometheus_client's own
exposition: `render` gives OpenMetrics text, `push` the Prometheus text
format that a Pushgateway takes.

Names follow Prometheus's naming guide: the ``partywall_bench_`` prefix, base
units (the report's milliseconds become seconds, MiB become bytes, percent of
one core becomes a ratio), the unit as the name's last word, and ``_total``
for none of them, because nothing here is a counter. A bench run is a batch
job: each figure belongs to one run, and the next push replaces it, so the
counts are gauges (a counter promises to grow over one process's life, and
``rate()`` over a series of unrelated runs means nothing).

Every series carries ``plan_fingerprint``, ``seed`` and ``target`` (and
``shard`` for one shard of a sharded run). ``target`` is the server's URL
for ``--server-url``; for a server the suite launched (``embedded``,
``cmd``) it is that kind, because such a server listens on a new port every
run and a label that changes every run makes every run a new series.

The families (L = those common labels):

- ``partywall_bench_ok{L}``: 1 when the gate held, else 0.
- ``partywall_bench_users{L}``, ``partywall_bench_duration_seconds{L}``,
  ``partywall_bench_started_timestamp_seconds{L}``.
- ``partywall_bench_latency_seconds{L, step}``: a histogram per step of the
  report's ``latency_ms`` (``connect``, ``agent_startup``, ...,
  ``server_startup``), from its HDR histogram; `BUCKETS_S` are the bounds.
- ``partywall_bench_latency_quantile_seconds{L, step, quantile}``: the
  report's own percentiles (see `QUANTILES`).
- ``partywall_bench_measurement_overhead_seconds{L, quantile}``.
- ``partywall_bench_steps{L, step, outcome}``: ``ok``, ``failed`` and
  ``not_attempted`` per step; for the client's steps the three add up to
  what the plan expected.
- ``partywall_bench_success_ratio{L, step}``, and
  ``partywall_bench_users_complete_ratio{L}`` (the report's ``overall``).
- ``partywall_bench_cpu_peak_ratio``, ``partywall_bench_cpu_mean_ratio``,
  ``partywall_bench_resident_memory_peak_bytes``,
  ``partywall_bench_resident_memory_mean_bytes``,
  ``partywall_bench_open_files_peak``, ``partywall_bench_threads_peak``,
  ``partywall_bench_resource_samples``, each ``{L, process}`` with process
  ``server`` or ``client``.
- ``partywall_bench_threshold_limit_<unit>`` and
  ``partywall_bench_threshold_actual_<unit>`` ``{L, threshold}`` and
  ``partywall_bench_threshold_ok{L, threshold}``: the gate. ``threshold`` is
  the ``[bench.thresholds]`` key as written (``agent_startup_p95_ms``), so it
  joins with the settings; the value is converted by the key's suffix
  (``_ms`` → seconds, ``_mib`` → bytes, ``_rate`` → ratio, else no unit), so
  one family never mixes units.
- ``partywall_bench_violations{L}``, ``partywall_bench_history_events{L}``,
  ``partywall_bench_frames{L}``.

A figure the report does not have (a rate with no attempts, an unsampled
server, an actual that was never measured) is left out, never sent as 0 or
NaN: absent is what Prometheus means by "no data".
"""

from __future__ import annotations

import socket
import urllib.error
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, push_to_gateway
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from partywall.errors import HarnessError
from partywall.stats import LatencyHistogram

PREFIX = "partywall_bench_"

#: Histogram bucket upper bounds, in seconds: 1-2.5-5 steps from 1 ms to 10 s,
#: then 30 s (the bench's default request time-out), then +Inf. They span a
#: connect on loopback (about a millisecond) up to the default gate (p95 start-up
#: under 5 s, p99 under 8 s), so the gate's limits fall between neighbouring
#: bounds, and stay few, because every bound is a series per step.
BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                10.0, 30.0)

#: The report's percentile keys and the ``quantile`` label each becomes. ``max``
#: is the 1 quantile: nearest-rank at 100 % is the largest value.
QUANTILES: tuple[tuple[str, str], ...] = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"), ("max", "1"))

MIB = 1024 * 1024

_STEP_OUTCOMES = (("ok", "n"), ("failed", "failures"), ("not_attempted", "not_attempted"))
#: A threshold key's suffix → the unit of its family, and what its figure is divided by to get there.
_UNITS = (("_ms", "seconds", 1000.0), ("_mib", "bytes", 1.0 / MIB), ("_rate", "ratio", 1.0))


def _as_mapping(report: Any) -> Mapping[str, Any]:
    """The report as its JSON mapping (a typed report object is asked for its ``to_json``)."""
    if isinstance(report, Mapping):
        return report
    to_json = getattr(report, "to_json", None)
    if callable(to_json):
        return to_json()
    raise HarnessError(f"the OpenMetrics export needs a bench report (got {type(report).__name__}).")


def common_labels(report: Mapping[str, Any]) -> dict[str, str]:
    """The labels every series carries: plan fingerprint, seed, target (and shard, ``K/N``, 1-based)."""
    target = report.get("target") or {}
    kind = str(target.get("kind") or "")
    labels = {
        "plan_fingerprint": str(report.get("plan_fingerprint") or ""),
        "seed": "" if report.get("seed") is None else str(report["seed"]),
        "target": str(target.get("url") or "") if kind == "url" else kind,
    }
    shard = report.get("shard")
    if isinstance(shard, Mapping):
        labels["shard"] = f"{int(shard['index']) + 1}/{int(shard['count'])}"
    return labels


def _number(value: Any) -> float | None:
    """A figure as a float; None for no figure (None, a bool is a verdict, not a figure)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _le(bound: float) -> str:
    return repr(float(bound))


def histogram_buckets(encoded: str, bounds: Iterable[float] = BUCKETS_S) -> list[tuple[str, int]]:
    """Cumulative ``(le, count)`` pairs, in seconds, of an encoded `LatencyHistogram`, ``+Inf`` last.

    A recorded value counts below a bound when the highest value of its HDR
    bucket does (the conservative reading `LatencyHistogram` uses for its
    percentiles): with 3 significant figures a value within 0.1 % under a
    bound may count in the next bucket up, never the other way.
    """
    recorded = LatencyHistogram.decode(encoded).buckets_ms()
    out = []
    for bound in bounds:
        limit_ms = bound * 1000.0
        out.append((_le(bound), sum(c for edge_ms, c in recorded if edge_ms <= limit_ms + 1e-9)))
    out.append(("+Inf", sum(c for _, c in recorded)))
    return out


class _Families:
    """The report's metric families, each with the common labels first."""

    def __init__(self, report: Mapping[str, Any]) -> None:
        self.report = report = _as_mapping(report)
        self.labels = common_labels(report)
        self.names = list(self.labels)
        self.values = list(self.labels.values())

    def gauge(self, name: str, doc: str, samples: Iterable[tuple[Mapping[str, str], Any]], unit: str = "",
              per: float = 1.0) -> GaugeMetricFamily | None:
        """A gauge of ``(extra labels, value / per)`` samples; samples with no figure are left out.

        Dividing (by 1000 for ms, 100 for percent, 1/2**20 for MiB, all exact
        divisors or powers of two) keeps 154.4 ms as 0.1544 s, where
        multiplying by 0.001 would give 0.15440000000000001.
        """
        family: GaugeMetricFamily | None = None
        for extra, value in samples:
            number = _number(value)
            if number is None:
                continue
            if family is None:
                family = GaugeMetricFamily(PREFIX + name, doc, labels=[*self.names, *extra], unit=unit)
            family.add_metric([*self.values, *extra.values()], number / per)
        return family

    def one(self, name: str, doc: str, value: Any, unit: str = "", per: float = 1.0) -> GaugeMetricFamily | None:
        return self.gauge(name, doc, [({}, value)], unit, per)

    def run(self) -> Iterator[Metric | None]:
        r = self.report
        yield self.one("ok", "1 when the bench gate held (every threshold and invariant), else 0.",
                       1 if r.get("ok") else 0)
        yield self.one("users", "Users this run drove (this shard's, for a shard).", r.get("users"))
        yield self.one("duration", "Wall-clock time of the run.", r.get("duration_s"), "seconds")
        yield self.one("started_timestamp", "When the run started, Unix time.", r.get("started_at"), "seconds")
        counts = r.get("counts") or {}
        yield self.one("violations", "Violations the run found (failed thresholds included, as `timing`).",
                       len(r.get("violations") or []))
        yield self.one("history_events", "Events the run recorded in its history.", counts.get("history_events"))
        yield self.one("frames", "Frames the run received.", counts.get("frames"))

    def latency(self) -> Iterator[Metric | None]:
        entries: Mapping[str, Any] = self.report.get("latency_ms") or {}
        hist: HistogramMetricFamily | None = None
        for step, e in entries.items():
            if not e.get("histogram"):
                continue
            if hist is None:
                hist = HistogramMetricFamily(
                    PREFIX + "latency", "Latency of each step as the client saw it (server_startup: the "
                    "server's own account), from when its request was meant to go out.",
                    labels=[*self.names, "step"], unit="seconds")
            n = int(e.get("n") or 0)
            mean = _number(e.get("mean"))
            total_s = mean * n / 1000.0 if mean is not None else 0.0
            hist.add_metric([*self.values, step], histogram_buckets(e["histogram"]), total_s)
        yield hist
        yield self.gauge("latency_quantile", "The report's nearest-rank percentiles of each step's latency "
                         "(exact, over the raw samples; quantile 1 is the maximum).",
                         [({"step": step, "quantile": q}, e.get(key))
                          for step, e in entries.items() for key, q in QUANTILES], "seconds", 1000.0)
        yield self.gauge("steps", "Requests of each step by outcome; for the client's steps ok + failed + "
                         "not_attempted is what the plan expected.",
                         [({"step": step, "outcome": outcome}, e.get(key))
                          for step, e in entries.items() for outcome, key in _STEP_OUTCOMES])
        rates: Mapping[str, Any] = self.report.get("success_rate") or {}
        yield self.gauge("success", "Successful share of each step's attempts.",
                         [({"step": step}, value) for step, value in rates.items() if step != "overall"], "ratio")
        yield self.one("users_complete", "Share of users who completed every step.", rates.get("overall"),
                       "ratio")
        over = self.report.get("measurement_overhead_ms") or {}
        yield self.gauge("measurement_overhead", "Client-seen agent start-up minus the server's own "
                         "startup_ms, per user: what the suite and the network add.",
                         [({"quantile": q}, over.get(key)) for key, q in QUANTILES], "seconds", 1000.0)

    def resources(self) -> Iterator[Metric | None]:
        procs = [(who, self.report.get(who)) for who in ("server", "client")]
        procs = [(who, res) for who, res in procs if isinstance(res, Mapping)]

        def per_process(key: str) -> list[tuple[dict[str, str], Any]]:
            return [({"process": who}, res.get(key)) for who, res in procs]

        yield self.gauge("cpu_peak", "Peak CPU use, as a share of one core.", per_process("cpu_percent_peak"),
                         "ratio", 100.0)
        yield self.gauge("cpu_mean", "Mean CPU use over the samples, as a share of one core.",
                         per_process("cpu_percent_mean"), "ratio", 100.0)
        yield self.gauge("resident_memory_peak", "Peak resident set size.", per_process("rss_mib_peak"),
                         "bytes", 1.0 / MIB)
        yield self.gauge("resident_memory_mean", "Mean resident set size over the samples.",
                         per_process("rss_mib_mean"), "bytes", 1.0 / MIB)
        yield self.gauge("open_files_peak", "Most files open at once.", per_process("open_files_peak"))
        yield self.gauge("threads_peak", "Most threads at once.", per_process("threads_peak"))
        yield self.gauge("resource_samples", "Resource samples taken of the process.", per_process("samples"))

    def thresholds(self) -> Iterator[Metric | None]:
        found: Mapping[str, Any] = self.report.get("thresholds") or {}
        by_unit: dict[tuple[str, float], list[tuple[str, Mapping[str, Any]]]] = {}
        for name, t in found.items():
            unit, per = next(((u, d) for suffix, u, d in _UNITS if name.endswith(suffix)), ("", 1.0))
            by_unit.setdefault((unit, per), []).append((name, t))
        for (unit, per), items in by_unit.items():
            what = f" ({unit})" if unit else ""
            yield self.gauge("threshold_limit", f"The limit of each bench threshold{what}.",
                             [({"threshold": name}, t.get("limit")) for name, t in items], unit, per)
            yield self.gauge("threshold_actual", f"The measured figure of each bench threshold{what}.",
                             [({"threshold": name}, t.get("actual")) for name, t in items], unit, per)
        yield self.gauge("threshold_ok", "1 when the threshold held, else 0.",
                         [({"threshold": name}, 1 if t.get("ok") else 0) for name, t in found.items()])

    def all(self) -> list[Metric]:
        out = [m for part in (self.run(), self.latency(), self.resources(), self.thresholds()) for m in part]
        return [m for m in out if m is not None]


class ReportCollector:
    """A prometheus_client collector that yields the families of one bench report."""

    def __init__(self, report: Mapping[str, Any]) -> None:
        self._families = _Families(report).all()

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def registry(report: Mapping[str, Any]) -> CollectorRegistry:
    """A private registry holding only this report's metrics."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ReportCollector(report))
    return reg


def render(report: Mapping[str, Any]) -> bytes:
    """The report's metrics as OpenMetrics text (ends with ``# EOF``)."""
    return generate_openmetrics(registry(report))


def write(report: Mapping[str, Any], path: str | Path) -> None:
    """Write `render` to ``path`` (its folder made if needed); HarnessError names a path that cannot be written."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(render(report))
    except OSError as exc:
        raise HarnessError(f"cannot write the OpenMetrics file {target} ({exc.strerror or exc}).") from None


def check_url(url: str | None) -> None:
    """HarnessError unless ``url`` (``--pushgateway``) is an http:// or https:// URL with a host; None passes."""
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HarnessError(f"--pushgateway {url!r} is not an http:// or https:// URL of a Pushgateway "
                           "(e.g. http://127.0.0.1:9091).")


def grouping_key(report: Mapping[str, Any]) -> dict[str, str]:
    """The Pushgateway group of a report: one per plan and seed (and shard), so a rerun replaces its own."""
    labels = common_labels(_as_mapping(report))
    return {k: labels[k] for k in ("plan_fingerprint", "seed", "shard") if labels.get(k)}


def _reason(exc: BaseException, timeout_s: float) -> str:
    """A short, lower-case reason for a failed push."""
    if isinstance(exc, urllib.error.HTTPError):
        body = ""
        try:
            body = exc.read().decode("utf-8", "replace").strip().splitlines()[0][:200]
        except (OSError, IndexError):
            pass
        return f"the Pushgateway answered {exc.code} {exc.reason}" + (f" ({body})" if body else "")
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else OSError(str(exc.reason))
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror or exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def push(report: Mapping[str, Any], url: str, timeout_s: float, job: str = "partywall_bench") -> str:
    """Push the report's metrics to the Pushgateway at ``url`` (PUT: the group's previous metrics go).

    The group is `grouping_key`, under ``job``. Returns where they went;
    HarnessError, one line naming the URL and why, when the push is refused
    or nothing answers within ``timeout_s`` seconds.
    """
    check_url(url)
    key = grouping_key(report)
    try:
        push_to_gateway(url, job=job, registry=registry(report), grouping_key=key, timeout=timeout_s)
    except (OSError, ValueError) as exc:  # urllib's errors are OSErrors; a malformed URL a ValueError
        raise HarnessError(f"cannot push metrics to {url}: {_reason(exc, timeout_s)}") from None
    return f"{url.rstrip('/')} (job {job}, " + ", ".join(f"{k} {v}" for k, v in key.items()) + ")"
