"""The HTTP server under the Flask app: waitress, set up so that no client can starve the others.

Three things keep `/health` answering while the server is under abuse or simply full:

* waitress reads requests on one asynchronous loop, so idle sockets (slowloris) cost no thread,
  only a connection: the limit is high (`--connection-limit`) and idle connections close
  after `--idle-timeout` seconds;
* a request waiting for a slot holds a thread, so there are enough threads for every slot and
  every queued task (`--max-queue`; past it the scheduler answers 503) plus SPARE_THREADS;
* the cheap paths a load balancer and a monitor poll (RESERVED_PATHS) run on a thread of their
  own, whatever the other threads are doing.
"""
from __future__ import annotations

import resource

from waitress.server import create_server
from waitress.task import ThreadedTaskDispatcher

RESERVED_PATHS = frozenset({"/health", "/v1/health", "/metrics"})
RESERVED_THREADS = 2
SPARE_THREADS = 8          # for the routes that return at once (/tokenize, /props, /slots, ...)
FDS_PER_CONNECTION = 2     # a socket, and a file waitress may buffer a large body in


class ReservedPathDispatcher(ThreadedTaskDispatcher):
    """waitress's thread pool, plus a small pool that serves only RESERVED_PATHS.

    waitress hands a connection to the dispatcher once per request, with that request first
    in `channel.requests` (and holds the channel's requests_lock while it does), so the path
    of the request about to be served is known here."""

    def __init__(self, threads: int):
        super().__init__()
        self.set_thread_count(threads)
        self.reserved = ThreadedTaskDispatcher()
        self.reserved.set_thread_count(RESERVED_THREADS)

    def add_task(self, channel):
        requests = getattr(channel, "requests", None)
        first = requests[0] if requests else None
        if first is not None and first.command in ("GET", "HEAD") and first.path in RESERVED_PATHS:
            self.reserved.add_task(channel)
        else:
            super().add_task(channel)

    def shutdown(self, cancel_pending=True, timeout=5):
        self.reserved.shutdown(cancel_pending, timeout)
        return super().shutdown(cancel_pending, timeout)


def raise_fd_limit(connections: int) -> None:
    """Enough file descriptors for the connection limit, within what the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections * FDS_PER_CONNECTION + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def serve(app, args) -> None:
    """Serve the app on every --host address until the process ends."""
    n_slots = args.parallel if args.parallel > 0 else 4
    max_queue = max(0, args.max_queue)
    raise_fd_limit(args.connection_limit)
    # --host may list several addresses ("127.0.0.1,::1"): one listening socket each
    listen = " ".join(f"[{h}]:{args.port}" if ":" in h else f"{h}:{args.port}"
                      for h in args.host.split(",") if h)
    # our own socket map, so that a drain can see what the connections have yet to send
    channels = app.extensions["numllama_channels"] = {}
    server = create_server(
        app, map=channels, listen=listen,
        _dispatcher=ReservedPathDispatcher(max(n_slots + max_queue + SPARE_THREADS, args.threads_http)),
        connection_limit=args.connection_limit, channel_timeout=args.idle_timeout,
        cleanup_interval=max(1, min(30, args.idle_timeout // 2)),
        # lets a request thread see that its client went away
        channel_request_lookahead=1, ident="llama.cpp",
        # waitress's own (plain-text) 413 is only a safety net above the app's JSON one
        max_request_body_size=int(args.max_body_mb * 2 * 1024 * 1024) + (1 << 20))
    if args.verbose:
        server.print_listen("Serving on http://{}:{}")
    server.run()


def unsent_bytes(channels: dict) -> int:
    """What waitress's connections hold to send still (an answer whose app side is done may
    not have reached its client yet)."""
    return sum(getattr(ch, "total_outbufs_len", 0) for ch in list(channels.values()))
