"""SQLite storage: schema, migrations, a group-committing writer, and reads.

All database work runs off the event loop. Writes go to one writer thread
that drains whatever has queued up while the previous commit was being
fsynced and commits it as one transaction (group commit): with WAL and
`synchronous=FULL` every commit is an fsync, and at a few thousand writes a
second one fsync per write would be the bottleneck. Each write still waits
for its own commit before the caller sees a result, so an `ack` is never
sent for a message that is not on disk. Reads run in `trio.to_thread`
workers, each with its own read-only connection (WAL lets them read while
the writer writes).
"""

from __future__ import annotations

import logging
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

import attrs
import trio

from .protocol import THREAD_NOT_FOUND_MESSAGE

log = logging.getLogger("agentserver.storage")

T = TypeVar("T")

#: SQLite integers are signed 64-bit; a larger `limit` means "everything".
_MAX_LIMIT: Final = 2**62
#: Concurrent reads (and so read-only connections).
_READERS: Final = 4
#: Upper bound on writes committed in one transaction, so one commit never
#: holds a long tail of waiters hostage.
_MAX_BATCH: Final = 2048


def new_id() -> str:
    """An opaque random id (128 bits), never a counter."""
    return secrets.token_urlsafe(16)


class StorageError(Exception):
    """The database cannot be used (bad file, schema from the future)."""


class ThreadNotFound(Exception):
    """No thread of that id for that tenant; carries the client-facing message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------


@attrs.frozen
class ThreadRecord:
    thread_id: str
    """Opaque random id."""
    tenant: str
    """Owning tenant; every lookup by a client filters on it."""
    assistant_id: str
    """The tenant's assistant this thread runs."""
    assistant: str
    """The assistant's name."""
    agent_id: str
    """The agent instance started for this thread."""
    created_at: float
    """Unix seconds."""


@attrs.frozen
class MessageRecord:
    message_id: str
    """Opaque random id."""
    thread_id: str
    role: str
    """"user" or "assistant"."""
    user: str | None
    """The author's user id, for role "user"."""
    content: str
    created_at: float
    """Unix seconds, taken when the writer inserted the row."""

    def to_wire(self) -> dict[str, Any]:
        item: dict[str, Any] = {"message_id": self.message_id, "role": self.role}
        if self.user is not None:
            item["user"] = self.user
        item["content"] = self.content
        item["created_at"] = self.created_at
        return item


@attrs.frozen
class ThreadSummary:
    thread_id: str
    assistant: str
    created_at: float
    message_count: int
    """User messages and replies."""


@attrs.frozen
class Unanswered:
    """A stored user message with no reply: left by a crash, answered at start."""

    thread: ThreadRecord
    message: MessageRecord


# --------------------------------------------------------------------------
# Schema and migrations
# --------------------------------------------------------------------------


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits any open transaction first, and a
    # migration must be one transaction with its user_version bump.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _migrate_1(db: sqlite3.Connection) -> None:
    """The first schema: assistants, threads, messages in commit order."""
    _run_script(
        db,
        """
        CREATE TABLE assistants (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            name TEXT NOT NULL,
            instructions TEXT,
            created_at REAL NOT NULL,
            UNIQUE (tenant, name)
        );
        CREATE TABLE threads (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            assistant_id TEXT NOT NULL REFERENCES assistants (id),
            agent_id TEXT NOT NULL,
            instructions TEXT,
            created_at REAL NOT NULL
        );
        CREATE INDEX threads_by_tenant ON threads (tenant);
        CREATE TABLE messages (
            pos INTEGER PRIMARY KEY,  -- commit order
            id TEXT NOT NULL UNIQUE,
            thread_id TEXT NOT NULL REFERENCES threads (id),
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            user_id TEXT,
            content TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE INDEX messages_by_thread ON messages (thread_id, pos);
        """,
    )


def _migrate_2(db: sqlite3.Connection) -> None:
    """The user base, and replies that name the message they answer.

    `reply_to` makes "a user message without a reply" one indexed query for
    crash recovery. Existing replies are linked to the user message right
    before them in their thread, which is what one-turn-at-a-time
    guarantees.
    """
    _run_script(
        db,
        """
        CREATE TABLE userbase (
            tenant TEXT NOT NULL,
            user_id TEXT NOT NULL,
            first_seen REAL NOT NULL,
            PRIMARY KEY (tenant, user_id)
        ) WITHOUT ROWID;
        INSERT OR IGNORE INTO userbase (tenant, user_id, first_seen)
            SELECT t.tenant, m.user_id, MIN(m.created_at)
            FROM messages m JOIN threads t ON t.id = m.thread_id
            WHERE m.role = 'user' GROUP BY t.tenant, m.user_id;
        ALTER TABLE messages ADD COLUMN reply_to TEXT;
        UPDATE messages SET reply_to = (
            SELECT u.id FROM messages u
            WHERE u.thread_id = messages.thread_id AND u.pos < messages.pos
              AND u.role = 'user'
            ORDER BY u.pos DESC LIMIT 1
        ) WHERE role = 'assistant';
        CREATE INDEX messages_by_reply ON messages (reply_to) WHERE reply_to IS NOT NULL;
        """,
    )


@attrs.frozen
class Migration:
    version: int
    """The `PRAGMA user_version` after this migration."""
    apply: Callable[[sqlite3.Connection], None]
    """Runs inside the migration's transaction."""


MIGRATIONS: Final = (Migration(1, _migrate_1), Migration(2, _migrate_2))
SCHEMA_VERSION: Final = MIGRATIONS[-1].version


def _connect(path: str, *, readonly: bool = False) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so the writer
    # controls exactly what one transaction holds.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    db.execute("PRAGMA busy_timeout = 30000")
    if readonly:
        db.execute("PRAGMA query_only = 1")
    else:
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
    return db


def migrate(path: str) -> int:
    """Bring the database at `path` to SCHEMA_VERSION; returns the version found.

    Raises StorageError for a file that is not a database or whose schema is
    newer than this server knows (never guessing at a future schema).
    """
    try:
        db = _connect(path)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path!r}: {exc}") from None
    try:
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StorageError(f"database {path!r} cannot use WAL mode (got {mode!r})")
        found = int(db.execute("PRAGMA user_version").fetchone()[0])
        if found > SCHEMA_VERSION:
            raise StorageError(
                f"database {path!r} has schema version {found}, newer than this agentserver "
                f"supports ({SCHEMA_VERSION}); refusing to start (use a newer agentserver)"
            )
        for migration in MIGRATIONS:
            if migration.version <= found:
                continue
            db.execute("BEGIN IMMEDIATE")
            try:
                migration.apply(db)
                db.execute(f"PRAGMA user_version = {migration.version:d}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            log.info("migrated %s to schema version %d", path, migration.version)
        return found
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"cannot use database {path!r}: {exc}") from None
    finally:
        db.close()


# --------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------


class _Write:
    """One queued write: a function of the writer's connection, and its outcome."""

    __slots__ = ("fn", "result", "error", "done")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = trio.Event()


def _wake(batch: list[_Write]) -> None:
    for write in batch:
        write.done.set()


_STOP: Final = object()


class Storage:
    """The server's database. Subclassed by planted faults, one method each."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._token: trio.lowlevel.TrioToken | None = None
        self._threads: dict[str, ThreadRecord] = {}
        self._known_users: set[tuple[str, str]] = set()
        self._readers: list[sqlite3.Connection] = []
        self._idle_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._read_limiter = trio.CapacityLimiter(_READERS)

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        """Migrate (synchronously, before the event loop starts serving)."""
        migrate(self.path)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer thread until `stop()`; every queued write is finished first."""
        self._token = trio.lowlevel.current_trio_token()
        db = _connect(self.path)
        task_status.started()
        try:
            # Not abandonable: the writer must finish the batch it holds, and
            # stop() tells it to leave once the queue is drained.
            await trio.to_thread.run_sync(self._writer_loop, db)
        finally:
            db.close()
            with self._readers_lock:
                for reader in self._readers:
                    reader.close()
                self._readers.clear()
                self._idle_readers.clear()

    def stop(self) -> None:
        self._queue.put(_STOP)

    def _writer_loop(self, db: sqlite3.Connection) -> None:
        assert self._token is not None
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stopping = False
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._commit(db, batch)
            try:
                self._token.run_sync_soon(_wake, batch)
            except trio.RunFinishedError:
                log.error("event loop ended with %d writes unacknowledged", len(batch))
                return
            if stopping:
                return

    def _commit(self, db: sqlite3.Connection, batch: list[_Write]) -> None:
        try:
            db.execute("BEGIN IMMEDIATE")
            for write in batch:
                # A savepoint per write: one failing write must not take the
                # others of its batch down with it.
                db.execute("SAVEPOINT w")
                try:
                    write.result = write.fn(db)
                except Exception as exc:
                    db.execute("ROLLBACK TO w")
                    write.error = exc
                    log.exception("write failed")
                db.execute("RELEASE w")
            db.execute("COMMIT")
        except Exception as exc:
            log.exception("commit of %d writes failed", len(batch))
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("rollback failed")
            for write in batch:
                write.result = None
                write.error = write.error or exc

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in the writer's transaction; return once it is committed."""
        op = _Write(fn)
        self._queue.put(op)
        await op.done.wait()
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[no-any-return]

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await trio.to_thread.run_sync(self._read, fn, limiter=self._read_limiter)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # A pool, not thread-locals: trio retires idle worker threads, and a
        # connection tied to a dead thread would leak its file descriptors.
        # The limiter caps the pool at _READERS connections.
        with self._readers_lock:
            db = self._idle_readers.pop() if self._idle_readers else None
        if db is None:
            db = _connect(self.path, readonly=True)
            with self._readers_lock:
                self._readers.append(db)
        try:
            return fn(db)
        finally:
            with self._readers_lock:
                self._idle_readers.append(db)

    # -- assistants and threads -------------------------------------------

    def _find_assistant(self, db: sqlite3.Connection, tenant: str, name: str) -> str | None:
        row = db.execute(
            "SELECT id FROM assistants WHERE tenant = ? AND name = ?", (tenant, name)
        ).fetchone()
        return row[0] if row else None

    def _note_user(self, tenant: str, user: str) -> Callable[[sqlite3.Connection], None] | None:
        """The userbase insert for a user not seen yet by this process, if any."""
        if (tenant, user) in self._known_users:
            return None

        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR IGNORE INTO userbase (tenant, user_id, first_seen) VALUES (?, ?, ?)",
                (tenant, user, time.time()),
            )

        return insert

    # Seams for planted faults: what a record's `created_at` says, and how a new
    # thread's id is made.

    def _clock(self) -> float:
        """`created_at` of a new record: Unix seconds."""
        return time.time()

    def _new_id(self, kind: str) -> str:
        """A new server id of ``kind`` (thread, ...): opaque and random."""
        return new_id()

    async def create_thread(
        self, tenant: str, user: str, assistant: str, instructions: str | None
    ) -> ThreadRecord:
        """Find or create the tenant's assistant, and open a new thread on it."""
        note_user = self._note_user(tenant, user)
        thread_id, agent_id = self._new_id("thread"), new_id()

        def create(db: sqlite3.Connection) -> ThreadRecord:
            now = self._clock()
            if note_user is not None:
                note_user(db)
            assistant_id = self._find_assistant(db, tenant, assistant)
            if assistant_id is None:
                assistant_id = new_id()
                db.execute(
                    "INSERT INTO assistants (id, tenant, name, instructions, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (assistant_id, tenant, assistant, instructions, now),
                )
            db.execute(
                "INSERT INTO threads (id, tenant, assistant_id, agent_id, instructions, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (thread_id, tenant, assistant_id, agent_id, instructions, now),
            )
            return ThreadRecord(thread_id, tenant, assistant_id, assistant, agent_id, now)

        record = await self.write(create)
        self._known_users.add((tenant, user))
        self._threads[record.thread_id] = record
        return record

    async def _load_thread(self, thread_id: str) -> ThreadRecord | None:
        cached = self._threads.get(thread_id)
        if cached is not None:
            return cached

        def load(db: sqlite3.Connection) -> ThreadRecord | None:
            row = db.execute(
                "SELECT t.id, t.tenant, t.assistant_id, a.name, t.agent_id, t.created_at"
                " FROM threads t JOIN assistants a ON a.id = t.assistant_id WHERE t.id = ?",
                (thread_id,),
            ).fetchone()
            return ThreadRecord(*row) if row else None

        record = await self.read(load)
        if record is not None:
            self._threads[thread_id] = record
        return record

    async def find_thread(self, tenant: str, thread_id: str) -> ThreadRecord:
        """The tenant's thread, or ThreadNotFound with the one message for all misses."""
        record = await self._load_thread(thread_id)
        if record is None or record.tenant != tenant:
            raise ThreadNotFound(THREAD_NOT_FOUND_MESSAGE)
        return record

    # -- messages ------------------------------------------------------------

    @staticmethod
    def _message_writer(
        record: MessageRecord, reply_to: str | None
    ) -> Callable[[sqlite3.Connection], None]:
        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO messages"
                " (id, thread_id, role, user_id, content, created_at, reply_to)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.message_id,
                    record.thread_id,
                    record.role,
                    record.user,
                    record.content,
                    record.created_at,
                    reply_to,
                ),
            )

        return insert

    async def _store_message(
        self, tenant: str, record: MessageRecord, reply_to: str | None
    ) -> None:
        """Return once the message is committed (the durability point of an ack)."""
        insert = self._message_writer(record, reply_to)
        note_user = self._note_user(tenant, record.user) if record.user is not None else None
        if note_user is None:
            await self.write(insert)
        else:

            def both(db: sqlite3.Connection) -> None:
                note_user(db)
                insert(db)

            await self.write(both)
            self._known_users.add((tenant, record.user))  # type: ignore[arg-type]

    async def add_user_message(
        self, thread: ThreadRecord, user: str, content: str
    ) -> MessageRecord:
        record = MessageRecord(new_id(), thread.thread_id, "user", user, content, self._clock())
        await self._store_message(thread.tenant, record, None)
        return record

    async def add_reply(self, thread: ThreadRecord, reply_to: str, content: str) -> MessageRecord:
        record = MessageRecord(new_id(), thread.thread_id, "assistant", None, content, self._clock())
        await self._store_message(thread.tenant, record, reply_to)
        return record

    _HISTORY_SQL = (
        "SELECT id, thread_id, role, user_id, content, created_at FROM messages"
        " WHERE thread_id = ? ORDER BY pos"
    )
    _HISTORY_TAIL_SQL = (
        "SELECT id, thread_id, role, user_id, content, created_at FROM messages"
        " WHERE thread_id = ? ORDER BY pos DESC LIMIT ?"
    )

    async def history(self, thread: ThreadRecord, limit: int | None) -> list[MessageRecord]:
        """The thread's messages in commit order; with `limit`, the newest `limit`."""

        def load(db: sqlite3.Connection) -> list[MessageRecord]:
            if limit is None:
                rows = db.execute(self._HISTORY_SQL, (thread.thread_id,)).fetchall()
            else:
                rows = db.execute(
                    self._HISTORY_TAIL_SQL, (thread.thread_id, min(limit, _MAX_LIMIT))
                ).fetchall()
                rows.reverse()
            return [MessageRecord(*row) for row in rows]

        return await self.read(load)

    #: A listed thread ``t``'s `message_count`, as SQL: its user messages and replies.
    MESSAGE_COUNT_SQL = "(SELECT COUNT(*) FROM messages m WHERE m.thread_id = t.id)"

    async def list_threads(self, tenant: str) -> list[ThreadSummary]:
        def load(db: sqlite3.Connection) -> list[ThreadSummary]:
            rows = db.execute(
                f"SELECT t.id, a.name, t.created_at, {self.MESSAGE_COUNT_SQL}"
                " FROM threads t JOIN assistants a ON a.id = t.assistant_id"
                " WHERE t.tenant = ? ORDER BY t.rowid",
                (tenant,),
            ).fetchall()
            return [ThreadSummary(*row) for row in rows]

        return await self.read(load)

    # -- crash recovery ------------------------------------------------------

    def unanswered(self) -> list[Unanswered]:
        """User messages without a reply, oldest first (synchronous: start-up only)."""
        db = _connect(self.path, readonly=True)
        try:
            rows = db.execute(
                "SELECT t.id, t.tenant, t.assistant_id, a.name, t.agent_id, t.created_at,"
                " m.id, m.thread_id, m.role, m.user_id, m.content, m.created_at"
                " FROM messages m JOIN threads t ON t.id = m.thread_id"
                " JOIN assistants a ON a.id = t.assistant_id"
                " WHERE m.role = 'user' AND NOT EXISTS"
                " (SELECT 1 FROM messages r WHERE r.reply_to = m.id)"
                " ORDER BY m.pos"
            ).fetchall()
        finally:
            db.close()
        return [Unanswered(ThreadRecord(*row[:6]), MessageRecord(*row[6:])) for row in rows]

    def store_replies(self, replies: Sequence[tuple[Unanswered, str]]) -> None:
        """Store recovery replies in one transaction (synchronous: start-up only)."""
        db = _connect(self.path)
        try:
            db.execute("BEGIN IMMEDIATE")
            for item, content in replies:
                record = MessageRecord(
                    new_id(), item.thread.thread_id, "assistant", None, content, self._clock()
                )
                self._message_writer(record, item.message.message_id)(db)
            self._end_recovery(db)
        finally:
            db.close()

    def _end_recovery(self, db: sqlite3.Connection) -> None:
        """Commit the recovery replies' transaction."""
        db.execute("COMMIT")
