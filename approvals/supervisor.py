"""`approvals serve --workers N`: N gateway processes on one machine, sharing its port and database.

    supervisor ──spawns──▶ worker 1 ─┐ each: `approvals serve` on the same port (SO_REUSEPORT: the
               ──spawns──▶ worker 2 ─┤ kernel spreads connections), its own internal address for
               ──spawns──▶ worker N ─┘ the session requests of the others (approvals.proxy.affinity)

The supervisor serves nothing itself. Each worker is given one end of a socket pair: it writes
`ready` there once it listens, and stops when it reads the end of it (the supervisor is gone, even
killed with SIGKILL), so workers never outlive their supervisor.

- Start: the supervisor waits until every worker is ready. A worker that stops while starting
  (a bad database URL, a port in use) stops the others and the supervisor exits 1: the cause
  would only repeat.
- Restart policy: a worker that stops after it was ready is started again, at most
  `MAX_RESTARTS` times in `RESTART_WINDOW_SECONDS`; past that the supervisor stops everything and
  exits 1, for the service manager (systemd, Kubernetes) to deal with.
- Stop: SIGTERM or SIGINT is passed on as SIGTERM; each worker finishes its calls in flight (its
  own grace period); one still running `KILL_AFTER_SECONDS` later is killed. Exit status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from approvals.config import Settings, environment_with

__all__ = ["READY", "Supervisor", "reserve_port", "serve_workers", "watch_supervisor"]

log = logging.getLogger("approvals.supervisor")

READY = b"ready\n"
START_TIMEOUT_SECONDS = 120.0
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0
KILL_AFTER_SECONDS = 15.0  # past the workers' own shutdown grace (cli.SHUTDOWN_GRACE_SECONDS)
EXIT_WAIT_SECONDS = 10.0  # a worker that closed its channel while starting is on its way out


class WorkerFailed(Exception):
    """A worker stopped while starting; the message says which and how."""


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A bound, not listening, SO_REUSEPORT socket on `host`:`port` (port 0: a free one) and its port.

    Kept by the supervisor while its workers start, so that a port 0 picked here stays this
    gateway's; never listened on, so the kernel gives it no connections.
    """
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock, int(sock.getsockname()[1])


@dataclass
class Worker:
    number: int
    process: asyncio.subprocess.Process
    channel: socket.socket  # the supervisor's end of the pair
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()


@dataclass
class Supervisor:
    """Runs `count` workers, each started as `command(channel_fd)`."""

    count: int
    command: Callable[[int], Sequence[str]]
    env: Mapping[str, str] | None = None
    clock: Callable[[], float] = time.monotonic
    workers: dict[int, Worker] = field(default_factory=dict)
    restarts: list[float] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        """Every worker, started and ready; raises WorkerFailed (the others stopped) if one is not."""
        try:
            async with asyncio.TaskGroup() as group:  # one failing cancels the others' start
                for number in range(1, self.count + 1):
                    group.create_task(self._start(number))
        except BaseExceptionGroup as errors:
            await self.stop()
            failed = [e for e in errors.exceptions if isinstance(e, WorkerFailed)]
            if failed:
                raise failed[0] from None
            raise
        except BaseException:
            await self.stop()
            raise

    async def _start(self, number: int) -> None:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=self.env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker has its copy: the pair's end now means "the worker is gone"
        reader, writer = await asyncio.open_connection(sock=ours)
        worker = Worker(number, process, ours, reader, writer)
        self.workers[number] = worker
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                line = await reader.readline()
        except TimeoutError:
            line = b""
        if line != READY:
            status = await _ended(process, EXIT_WAIT_SECONDS if not line else 0.0)
            raise WorkerFailed(
                f"worker {number} of {self.count} stopped while starting (exit status {status});"
                " its error is above"
            )

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> int:
        """Supervise until stopped (0) or until workers stop too often (1)."""
        while not self._stopping.is_set():
            stopping = asyncio.ensure_future(self._stopping.wait())
            exits = {asyncio.ensure_future(w.process.wait()): w for w in self.workers.values()}
            done, _ = await asyncio.wait({stopping, *exits}, return_when=asyncio.FIRST_COMPLETED)
            for future in (stopping, *exits):
                future.cancel()
            if self._stopping.is_set():
                break
            for future, worker in exits.items():
                replaced = future not in done or await self._replace(worker)
                if not replaced:
                    await self.stop()
                    return 1
        await self.stop()
        return 0

    async def _replace(self, worker: Worker) -> bool:
        """Start a worker in place of one that stopped; False when the restart budget is spent."""
        worker.close()
        now = self.clock()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_SECONDS] + [now]
        status = worker.process.returncode
        if len(self.restarts) > MAX_RESTARTS:
            print(
                f"error: workers stopped {len(self.restarts)} times within {RESTART_WINDOW_SECONDS:.0f} s"
                f" (the last, worker {worker.number}, with exit status {status}); stopping",
                file=sys.stderr,
                flush=True,
            )
            return False
        log.warning("worker %d stopped (exit status %s); starting it again", worker.number, status)
        try:
            await self._start(worker.number)
        except WorkerFailed as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return False
        return True

    async def stop(self) -> None:
        """SIGTERM to every worker; SIGKILL to any still running KILL_AFTER_SECONDS later."""
        running = [w for w in self.workers.values() if w.process.returncode is None]
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(KILL_AFTER_SECONDS):
                await asyncio.gather(*(w.process.wait() for w in running))
        except TimeoutError:
            for worker in running:
                if worker.process.returncode is None:
                    log.warning(
                        "worker %d did not stop within %.0f s; killing it", worker.number, KILL_AFTER_SECONDS
                    )
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
            await asyncio.gather(*(w.process.wait() for w in running))
        for worker in self.workers.values():
            worker.close()


async def _ended(process: asyncio.subprocess.Process, wait: float) -> int:
    """The exit status of a worker that failed to start: it may still be on its way out (its
    error printed, its loop closing) for up to `wait` seconds, then it is killed."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            return await process.wait()
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    return await process.wait()


def serve_workers(
    settings: Settings,
    count: int,
    command: Callable[[int, int], Sequence[str]],
    on_ready: Callable[[int], None],
) -> int:
    """`approvals serve --workers COUNT`: the exit status. `command(port, channel)` is a worker's
    command line; `on_ready(port)` runs once every worker listens (the banner)."""
    server = settings.server
    if settings.store.url is None:
        return _refuse(
            f"{count} workers need a PostgreSQL store ([store] url or APPROVALS_DATABASE_URL):"
            " the SQLite store is used by one process only"
        )
    if server.internal_url is not None and urlsplit(server.internal_url).port != 0:
        return _refuse(
            f"server.internal_url {server.internal_url} names one port, but each of {count}"
            " workers needs its own: use port 0 (each worker picks a free one)"
        )
    if not hasattr(socket, "SO_REUSEPORT"):
        return _refuse("--workers needs SO_REUSEPORT, which this system does not have")
    try:
        reservation, port = reserve_port(server.host, server.port)
    except OSError as exc:
        return _refuse(f"cannot listen on {server.host}:{server.port}: {exc.strerror or exc}")
    # No secret to hand out: without APPROVALS_SESSION_SECRET the workers share the one kept in the
    # database (approvals.gateway_secret), as replicas on other machines do.
    extra: dict[str, str] = {}

    def ready() -> None:
        reservation.close()  # every worker listens: the port stays theirs
        on_ready(port)

    with reservation:
        return asyncio.run(
            supervise(count, lambda channel: command(port, channel), ready, environment_with(extra))
        )


def _refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


async def supervise(
    count: int,
    command: Callable[[int], Sequence[str]],
    on_ready: Callable[[], None],
    env: Mapping[str, str] | None = None,
) -> int:
    """Start `count` workers (in `env`), call `on_ready` once all listen, supervise until a signal."""
    supervisor = Supervisor(count, command, env)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, supervisor.request_stop)
    try:
        await supervisor.start()
    except WorkerFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    on_ready()
    return await supervisor.run()


def watch_supervisor(channel_fd: int, stop: Callable[[], None]) -> Callable[[], None]:
    """In a worker: write READY to the supervisor (the returned function), and call `stop` when
    the supervisor is gone (its end of the pair closed)."""
    channel = socket.socket(fileno=channel_fd)
    channel.setblocking(False)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = channel.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(channel_fd)
            stop()

    loop.add_reader(channel_fd, readable)

    def ready() -> None:
        channel.send(READY)  # a few bytes into an empty socket buffer: never blocks

    return ready
