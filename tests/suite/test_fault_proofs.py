"""Proofs that each check can fail: the generated suite finds each planted fault, and only it.

Rules: each proof starts the reference server with one planted fault
(`partywall_agentserver/faults.py`, selected with ``--fault`` at start), runs
``partywall run --profile ci`` against it exactly as a user would (the
generated state machine, not a scripted scenario), and requires:

- exit 1 and the reported violation named by its invariant *and* by the
  registered check that found it (so no other check can stand in);
- a shrunk program of a few steps that holds a generated step beside the
  fixed opening `world` (a proof of the opening alone proves no generation),
  unless the proof says why the opening alone shows the fault (`in_opening`);
- re-runs of the shrunk program that reproduce it: 3 of 3 where the fault is
  deterministic; otherwise at least once (the run's 3 re-runs, then up to 3
  replays of the file on fresh servers);
- a control: the same server options and suite options without the fault
  pass the whole `ci` profile (one shared clean run per option set), and the
  proof needed no more examples than the control ran. A busy machine that
  trips a tuned limit trips the control too.

No wall-clock bound is asserted: time to catch is a benchmark
(``ci/bench_faults.py``), not a test. The `ci` profile's seed is fixed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from partywall_agentserver.faults import FAULTS

#: Low but non-zero latency: each generated example costs less, so generation and
#: shrinking stay short, while replies still stream while later steps run.
FAST = "--startup-ms 0:5 --chunk-delay-ms 1:3"
#: Faults that need a turn to be streaming when the next message arrives.
STREAMING = "--startup-ms 0:5 --chunk-delay-ms 20:40"

#: Option sets: (server options beside ``--fault``, options of ``partywall run``). Each has
#: one control run, and its proofs run on one xdist worker beside it (``--dist loadgroup``).
OPTION_SETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fast": (FAST, ()),
    "streaming": (STREAMING, ()),
    # A lost message is only known to be lost when its limit passes: a short one keeps the proof
    # short. Turns of 20-40 ms still queue behind each other when messages come in a burst,
    # and a thread's queue of generated turns stays well inside 1.5 s (the control shows it).
    "short_reply_limit": ("--startup-ms 0:5 --chunk-delay-ms 5:10", ("--set", "reply_timeout_s=1.5")),
    # Start-ups of 100-110 ms against a 180 ms limit: one start-up stays 70 ms below it, two at
    # the same instant exceed it only if they run one after the other. Every generated start-up
    # waits this long, so the delay sets the control's length. Used by ci/bench_faults.py only
    # (see serial_startup).
    "startup_limit": ("--startup-ms 100:110 --chunk-delay-ms 1:3", ("--set", "timing.start_agent_ms=180")),
}


@attrs.frozen
class Proof:
    """How one planted fault must be caught."""

    invariant: str
    check: str
    """The registered check (its function's name) that must report it."""
    option_set: str = attrs.field(validator=attrs.validators.in_(OPTION_SETS))
    deterministic: bool = True
    """Every re-run of the shrunk program must reproduce it (else one of three is enough)."""
    also: tuple[str, ...] = ()
    """Other ``invariant/check`` that may name it first, where the bug breaks that clause too."""
    in_opening: str = ""
    """Why the fixed opening alone shows this fault (every example catches it), so its shrunk program
    may be the opening alone: the proof is of the check, not of generation."""
    bench_only: str = ""
    """Why this proof runs only in ``ci/bench_faults.py`` (three seeds, medians in the README), not in
    ``.ci/run``: a fault whose shrunk program depends on timing too tight to replay every time."""

    def names(self, invariant: str, check: str) -> bool:
        return (invariant, check) == (self.invariant, self.check) or f"{invariant}/{check}" in self.also

    @property
    def server(self) -> str:
        return OPTION_SETS[self.option_set][0]

    @property
    def options(self) -> tuple[str, ...]:
        return OPTION_SETS[self.option_set][1]


def proven_by(fault: str) -> str:
    """The reason of a proof kept out of ``.ci/run`` for its time: its check is proven there by ``fault``."""
    return f"CI time: its check is proven in .ci/run by {fault}; this fault is proven in ci/bench_faults.py"


PROOFS: dict[str, Proof] = {
    # The lookup that forgets the tenant also answers a message to a foreign thread with "join first"
    # (bad_request) where an unknown thread gets not_found: the same bug, seen by right_outcome.
    # Which a re-run sees first follows the joins and probes in flight, so a re-run may see none.
    # The same lookup also answers a probe of a foreign id unlike one of an unknown id.
    "foreign_thread_lookup": Proof("isolation", "no_foreign_data", "fast", deterministic=False,
                                   also=("protocol/right_outcome", "isolation/foreign_like_absent")),
    "assistant_by_name": Proof("isolation", "no_foreign_data", "fast"),
    "not_found_names_owner": Proof("isolation", "foreign_like_absent", "fast"),
    "case_insensitive_user": Proof("isolation", "identity_as_token", "fast"),
    # A connection that left and joined again also gets the rest of the turn that was streaming.
    "sticky_subscription": Proof("routing", "fanout_to_members", "streaming", also=("routing/turn_whole_or_nothing",)),
    # The acked message lost in the crash is also missing from the thread's count: a list_threads
    # read after the restart may see that first.
    "lazy_commit": Proof("durability", "history_keeps_commits", "fast", deterministic=False,
                         also=("durability/threads_kept",)),
    "queued_turn_double_reply": Proof("exactly-once", "one_complete_reply", "short_reply_limit", deterministic=False),
    # Random message ids put a message and its reply in the right order half the time. Read with
    # a limit, the same bug picks the wrong messages for the window (the newest by id).
    "history_by_id": Proof("ordering", "history_in_commit_order", "fast", deterministic=False,
                           also=("durability/history_keeps_commits",)),
    "lost_wakeup": Proof("liveness", "answered_in_time", "short_reply_limit", deterministic=False),
    "serial_startup": Proof("timing", "within_limits", "startup_limit", deterministic=False,
                            bench_only="a per-operation time limit against a machine's load: beside the other "
                                       "worker of .ci/run, one clean start-up of 110 ms took 209 ms (its control "
                                       "failed), and wider margins made the control outlast its time limit"),
    "content_limit_code": Proof("protocol", "frames_match_schema", "fast"),
    "alg_none": Proof("isolation", "identity_as_token", "fast"),
    "expired_accepted": Proof("isolation", "identity_as_token", "fast"),
    # A server that serves every path also answers a refused token there with 401, not 404.
    "any_path_accepted": Proof("isolation", "identity_as_token", "fast", also=("protocol/refused_as_specified",)),
    "query_wins": Proof("isolation", "identity_as_token", "fast"),
    "token_before_path": Proof("protocol", "refused_as_specified", "fast"),
    "refusal_says_why": Proof("protocol", "refused_as_specified", "fast"),
    # The first bad_token of an example mints a token whose exp is the last thousandth of the
    # server's current second (waiting for the next second when less than 0.2 s of it is left).
    "exp_whole_seconds": Proof("liveness", "valid_token_accepted", "fast"),
    "list_all_tenants": Proof("isolation", "no_foreign_data", "fast"),
    "echo_to_requester": Proof("routing", "no_copy_to_requester", "fast"),
    # The user's second device (the opening's c3) asks; the first one gets the reply.
    # Found the moment the reply reaches the first device, but every replay then waits out the reply
    # limit for the reply the asking device never gets: a short one keeps shrinking short.
    "reply_to_first_device": Proof("routing", "replies_to_sender", "short_reply_limit", deterministic=False),
    # The leave and the join must both fall inside a streaming turn: the rejoin rule has another
    # connection talk first and sends them on its ack, but a re-run's timing may still miss it.
    "rejoin_mid_turn": Proof("routing", "turn_whole_or_nothing", "streaming", deterministic=False),
    # A read with limit first lets the thread's turns in flight finish, so the window is known.
    "limit_keeps_oldest": Proof("durability", "history_keeps_commits", "fast", deterministic=False),
    # A list raced by the replies it counts can come first; after a settle each tenant lists its
    # threads with every turn committed, and the shrinker puts a settle before a list that saw it
    # only sometimes (ci/bench_faults.py: 3- and 4-step programs, 3/3 re-runs under two seeds, 2/3 under one).
    "count_user_messages_only": Proof("durability", "threads_kept", "fast", deterministic=False),
    # A count over the assistant's threads: one thread's message_count takes in its siblings'.
    "count_per_assistant": Proof("durability", "threads_kept", "fast", deterministic=False,
                                 bench_only=proven_by("count_user_messages_only")),
    # The SIGKILL must fall inside a turn (committed, not yet answered). The audit waits the reply limit
    # for the missing reply: a short one keeps each replay of shrinking short. A message sent to the
    # thread after the restart lands behind the unanswered one.
    "recovery_uncommitted": Proof("ordering", "chunks_in_order", "short_reply_limit", deterministic=False,
                                  also=("ordering/history_in_commit_order",),
                                  bench_only="found under the ci seed, but every replay waits out the audit and "
                                             "the crash, so 25 s of shrinking left 15 steps (before the budget became 40 s)"),
    # The chunk tasks' delays are random: a turn's 4 chunks still arrive in order 1 time in 24.
    "chunks_race": Proof("ordering", "chunks_in_order", "fast", deterministic=False),
    "verbose_errors": Proof("protocol", "errors_say_no_internals", "fast"),
    "parse_before_size": Proof("protocol", "frames_match_schema", "fast"),
    # A ping right behind the oversized frame gets its pong from a server that stays open.
    "oversize_stays_open": Proof("protocol", "oversize_closes_1009", "fast"),
    # The transport closes while the 16 MiB frame is still going out: the driver keeps that code.
    "transport_cut_1mib": Proof("protocol", "oversize_closes_1009", "fast"),
    "bool_is_int_limit": Proof("protocol", "right_outcome", "fast"),
    "surrogates_pass": Proof("protocol", "frames_match_schema", "fast"),
    "threads_newest_first": Proof("ordering", "threads_in_start_order", "fast"),
    "created_at_millis": Proof("protocol", "times_are_unix_seconds", "fast"),
    "binary_closes_1003": Proof("protocol", "closes_only_for_too_large", "fast"),
    "counter_thread_ids": Proof("isolation", "ids_are_opaque", "fast",
                                in_opening="the opening starts two threads, one after the other: the second id counts on"),
    "startup_in_microseconds": Proof("timing", "startup_within_latency", "fast",
                                     in_opening="the opening's first start-up already says more than it took"),
    # The leave_joined rule posts once more to the thread it left, once the leave is answered.
    "leave_only_mutes": Proof("protocol", "right_outcome", "fast", bench_only=proven_by("bool_is_int_limit")),
    # The reply that never comes is only known missing when the reply limit passes: a short one
    # keeps each replay of shrinking short.
    "leave_stops_own_turn": Proof("exactly-once", "one_complete_reply", "short_reply_limit"),
    # The copy reaches only the watchers joined when the turn begins, which a re-run's joins may miss.
    "fanout_trims_content": Proof("exactly-once", "fanout_copies_match", "fast", deterministic=False),
    "assistant_id_is_agent_id": Proof("protocol", "replies_as_predicted", "fast"),
    "shutdown_closes_1000": Proof("protocol", "shutdown_closes_1001", "fast"),
    # The pipeline rule's 16 to 64 reads at once empty the bucket of 8, however fast they are answered.
    "rate_limit_bucket": Proof("protocol", "right_outcome", "fast"),
    "bearer_case_sensitive": Proof("liveness", "valid_token_accepted", "fast",
                                   in_opening="the opening's header handshakes spell the scheme bearer, Bearer, "
                                              "BEARER in turn"),
    "exp_optional": Proof("isolation", "identity_as_token", "fast", bench_only=proven_by("alg_none")),
    "final_reply_trimmed": Proof("exactly-once", "one_complete_reply", "fast", bench_only=proven_by("leave_stops_own_turn")),
    "history_first_author": Proof("durability", "history_keeps_commits", "fast", bench_only=proven_by("limit_keeps_oldest")),
    "listed_assistant_id": Proof("protocol", "replies_as_predicted", "fast", bench_only=proven_by("assistant_id_is_agent_id")),
    "blank_content_refused": Proof("protocol", "right_outcome", "fast", bench_only=proven_by("bool_is_int_limit")),
    "history_needs_join": Proof("protocol", "right_outcome", "fast", bench_only=proven_by("bool_is_int_limit"),
                                in_opening="every example ends by reading each thread's history from a fresh "
                                           "connection of its tenant, which has not joined it"),
    "leave_needs_join": Proof("protocol", "right_outcome", "fast", bench_only=proven_by("bool_is_int_limit")),
    # Races between requests at one instant: a re-run's timing may miss the window. A list made for
    # the other tenant also leaves out the asker's own threads, which threads_kept sees first.
    "current_tenant_race": Proof("isolation", "no_foreign_data", "fast", deterministic=False,
                                 also=("durability/threads_kept",)),
    "limit_plus_one": Proof("durability", "history_keeps_commits", "fast"),
    "tenant_nocase": Proof("isolation", "no_foreign_data", "fast"),
    "content_limit_in_chars": Proof("protocol", "right_outcome", "fast", bench_only=proven_by("bool_is_int_limit")),
    # The frame is parsed, so its id is read: the pong that answers it is seen first.
    "frame_limit_in_chars": Proof("protocol", "frames_match_schema", "fast", also=("protocol/oversize_closes_1009",),
                                  bench_only=proven_by("surrogates_pass")),
    "connection_id_per_user": Proof("protocol", "replies_as_predicted", "fast",
                                    in_opening="the opening connects alice of the first tenant twice"),
    "query_skips_exp": Proof("isolation", "identity_as_token", "fast"),
    "unknown_type_without_re": Proof("protocol", "frames_match_schema", "fast"),
    "history_by_assistant": Proof("durability", "history_keeps_commits", "fast"),
    "claims_any_string": Proof("isolation", "identity_as_token", "fast", bench_only=proven_by("alg_none")),
    "assistant_name_trimmed": Proof("protocol", "right_outcome", "fast", bench_only=proven_by("bool_is_int_limit")),
    "name_limit_in_bytes": Proof("protocol", "right_outcome", "fast", bench_only=proven_by("bool_is_int_limit")),
    # A turn's frames go to whichever connection sent its id last: of another tenant (isolation),
    # or of the same one, where they answer that connection's own request of the same id, before
    # its ack, twice, or with another thread's chunks. Which comes first follows the turns' timing.
    "stream_by_request_id": Proof("isolation", "no_foreign_data", "streaming", deterministic=False,
                                  also=("protocol/frames_match_schema", "exactly-once/one_complete_reply",
                                        "ordering/chunks_in_order", "protocol/replies_as_predicted"),
                                  bench_only=proven_by("assistant_by_name")),
    # The chat rule hangs up once its first message is acked; the turn's reply must still be
    # stored. The next message to the thread then follows the unanswered one; without one, the
    # audit waits the reply limit for the reply (a short limit keeps replays short).
    # A watcher of the thread then never gets the rest of the turn, which the settle after it sees.
    "abandon_unheard": Proof("ordering", "history_in_commit_order", "short_reply_limit",
                             also=("ordering/chunks_in_order", "routing/fanout_reaches_members")),
    # A closed connection's slot goes to the next connection to join a thread, with the closed
    # one's subscriptions: of the same tenant (routing) or of another (isolation). Slots outlive
    # examples, so a re-run may find its slot taken by one of the run's earlier connections.
    "slot_reuse": Proof("routing", "fanout_to_members", "fast", deterministic=False,
                        also=("isolation/no_foreign_data",),
                        bench_only="a slot left by an earlier example's connection leaks that example's threads: "
                                   "in one CI run the shrunk program was the opening alone (bench: 1, 4 and 4 "
                                   "steps); its check is proven in .ci/run by sticky_subscription"),
    "request_id_limit_in_bytes": Proof("protocol", "right_outcome", "fast", bench_only=proven_by("bool_is_int_limit"),
                                       in_opening="the opening's c3 sends ids of 64 characters, two- and three-byte "
                                                  "ones"),
    # A watcher's copy is owed once the requester has its reply; the settle steps and the audit
    # wait for the copies (timing.fanout_lag_ms), so the finding falls at the settle after the turn.
    "rejoin_unsubscribed": Proof("routing", "fanout_reaches_members", "fast",
                                 bench_only=proven_by("fanout_skips_own_user")),
    "fanout_skips_own_user": Proof("routing", "fanout_reaches_members", "fast"),
    # The watcher's agent_response arrives after its thread_message with no chunk between them.
    "watchers_miss_chunks": Proof("exactly-once", "one_complete_reply", "fast",
                                  bench_only=proven_by("leave_stops_own_turn")),
    # The first bad_token of an example also connects with a valid token carrying aud, iss, nbf and iat.
    "other_claims_checked": Proof("liveness", "valid_token_accepted", "fast"),
    # The chat rule hangs up once its first message is acked; a watcher joined to the thread must
    # still get the rest of that turn. Turns of 20-40 ms per chunk keep it streaming past the hang-up.
    "stream_stops_unheard": Proof("routing", "fanout_reaches_members", "streaming", deterministic=False,
                                  bench_only=proven_by("fanout_skips_own_user")),
    # The bad_frame rule's invalid JSON gets no error: known when the reply limit passes (a short
    # one keeps each replay of shrinking short).
    "unparsable_ignored": Proof("liveness", "answered_in_time", "short_reply_limit"),
    "claims_coerced": Proof("isolation", "identity_as_token", "fast", bench_only=proven_by("alg_none")),
    "assistant_create_race": Proof("protocol", "frames_match_schema", "fast", deterministic=False,
                                   also=("protocol/right_outcome",),
                                   bench_only=proven_by("surrogates_pass")),
}

SECRET = "proof-secret-" + "x" * 32


@attrs.frozen
class Outcome:
    code: int
    report: dict[str, Any]
    output: str


def run_suite(folder: Path, server: str, options: tuple[str, ...], fault: str | None) -> Outcome:
    """``partywall run --profile ci`` against a fresh reference server (with ``fault`` planted, if given)."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = f"{sys.executable} -m partywall_agentserver --port 0 --db {folder / 'server.db'} {server}"
    if fault is not None:
        cmd += f" --fault {fault}"
    report = folder / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "partywall.cli", "run", "--profile", "ci", "--server-cmd", cmd,
         "--auth-secret", SECRET, "--report", str(report), "--replay-dir", str(folder),
         "--set", "shrink_seconds=40", *options],
        capture_output=True, text=True, timeout=900, cwd=folder,
    )
    return Outcome(proc.returncode, json.loads(report.read_text()), proc.stdout + proc.stderr)


def replay_finds(folder: Path, replay: Path, proof: Proof, fault: str) -> bool:
    """Whether ``partywall replay FILE`` against a fresh faulty server finds the violation again."""
    folder.mkdir(parents=True)
    server, options = OPTION_SETS[proof.option_set]
    cmd = f"{sys.executable} -m partywall_agentserver --port 0 --db {folder / 'server.db'} {server} --fault {fault}"
    proc = subprocess.run([sys.executable, "-m", "partywall.cli", "replay", str(replay), "--server-cmd", cmd,
                           "--auth-secret", SECRET, *options], capture_output=True, text=True, timeout=300, cwd=folder)
    return proc.returncode == 1


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Outcome]:
    """The clean run of an option set, made once (per worker) and shared by its proofs."""
    runs: dict[str, Outcome] = {}

    def get(option_set: str) -> Outcome:
        if option_set not in runs:
            server, options = OPTION_SETS[option_set]
            runs[option_set] = run_suite(tmp_path_factory.mktemp("control"), server, options, None)
        return runs[option_set]

    return get


def test_fault_proofs_cover_every_planted_fault() -> None:
    assert sorted(PROOFS) == sorted(FAULTS)
    # Proven by ci/bench_faults.py only: few, and each says why.
    assert [f for f, p in PROOFS.items() if p.bench_only and not p.bench_only.startswith("CI time")] == [
        "serial_startup", "recovery_uncommitted", "slot_reuse"]
    # Kept out of .ci/run for its time only where another fault proves the same check there.
    in_ci = {(p.invariant, p.check) for p in PROOFS.values() if not p.bench_only}
    assert all((p.invariant, p.check) in in_ci for p in PROOFS.values() if p.bench_only.startswith("CI time"))
    # Shown by the fixed opening of every example: few, and each says why.
    assert [f for f, p in PROOFS.items() if p.in_opening] == ["counter_thread_ids", "startup_in_microseconds",
                                                              "bearer_case_sensitive", "history_needs_join",
                                                              "connection_id_per_user", "request_id_limit_in_bytes"]


#: In .ci/run (not bench-only), in name order.
IN_CI = sorted(fault for fault, proof in PROOFS.items() if not proof.bench_only)


def xdist_group(fault: str) -> str:
    """The xdist group a proof runs in: its option set's, whose control runs once on that worker.
    The `fast` set holds most proofs, so they go in two groups, one on each worker, each with
    a control of its own."""
    option_set = PROOFS[fault].option_set
    if option_set != "fast":
        return option_set
    fast = [f for f in IN_CI if PROOFS[f].option_set == "fast"]
    return f"fast-{fast.index(fault) % 2}"


@pytest.mark.slow
@pytest.mark.timeout(600)  # a whole ci profile; its length is the option set's latencies, and the machine's load
@pytest.mark.parametrize("group", [pytest.param(group, marks=pytest.mark.xdist_group(group))
                                   for group in sorted({xdist_group(fault) for fault in IN_CI})])
def test_fault_proof_control_passes_without_the_fault(control: Callable[[str], Outcome], group: str) -> None:
    option_set = group.partition("-")[0]
    clean = control(option_set)
    assert clean.code == 0, f"the clean server fails under {OPTION_SETS[option_set]}:\n{clean.output[-3000:]}"
    assert clean.report["violations"] == [] and clean.report["error"] is None
    assert clean.report["stats"]["examples"] >= 100  # the whole ci profile ran


@pytest.mark.slow
@pytest.mark.timeout(600)  # the first proof of an option set also makes its control run
@pytest.mark.parametrize("fault", [pytest.param(fault, marks=pytest.mark.xdist_group(xdist_group(fault)))
                                   for fault in IN_CI])
def test_fault_is_found_by_the_generated_suite(tmp_path: Path, fault: str, control: Callable[[str], Outcome]) -> None:
    proof = PROOFS[fault]
    found = run_suite(tmp_path, proof.server, proof.options, fault)
    assert found.code == 1, f"expected exit 1 (a violation) against {fault}, got {found.code}:\n{found.output[-3000:]}"
    v = found.report["violations"][0]
    assert proof.names(v["invariant"], v["check"]), (
        f"{fault} must be caught by {proof.invariant}/{proof.check}, got {v['invariant']}/{v['check']}: {v['title']}")
    program = json.loads(Path(v["replay"]).read_text())["program"]
    rules = [step["rule"] for step in program]
    assert len(program) <= 8, f"shrunk program too long: {rules}"
    assert rules[0] == "world", f"the shrunk program does not begin with the opening: {rules}"
    assert len(rules) > 1 or proof.in_opening, f"the shrunk program has no generated step: {rules}"
    reproduced, runs = map(int, v["reproduced"].split("/"))
    assert runs == 3
    if proof.deterministic:
        assert reproduced == 3, f"a deterministic fault reproduced {v['reproduced']}"
    elif reproduced == 0:
        # Random by nature (history_by_id's shrunk program fails half the time), 0 of 3 happens
        # one run in eight: the replay file itself, on fresh faulty servers, must bring it back.
        assert any(replay_finds(tmp_path / f"again{n}", Path(v["replay"]), proof, fault) for n in range(3)), (
            "the shrunk program reproduced 0 of 3 times, and not once in three replays either")
    clean = control(proof.option_set)
    assert clean.code == 0, f"the control without {fault} fails too, so the fault proves nothing:\n{clean.output[-2000:]}"
    # The control ran at least as many examples as it took to find the fault.
    assert found.report["stats"]["found_at_example"] <= clean.report["stats"]["examples"]
