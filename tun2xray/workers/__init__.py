"""Many cores: one worker process per queue of a multi-queue TUN (``--workers N``).

The supervisor is the ``tun2xray run`` process. It creates the TUN with
``IFF_MULTI_QUEUE`` (MTU, addresses and link up once), keeps the first queue
as a *keeper* that it detaches at once (``TUNSETQUEUE`` / ``IFF_DETACH_QUEUE``:
the interface stays while a detached queue is open, but the kernel steers no
packets to it), and starts N workers::

    tun2xray run (supervisor)            keeper fd (detached queue)
      ├── zygote                         the template the workers are forked from
      ├── worker 0                       queue fd 0, its own Stack + Engine + upstreams
      └── worker 1                       queue fd 1, ...

Workers share memory: the supervisor imports what a worker runs, freezes
its objects for the collector and forks the *zygote* before the core's
threads start and before any event loop exists; every worker (a restarted
one too) is forked from the zygote, so all of them share the imported code
and the interpreter's pages with the supervisor (zygote.py). The supervisor
is a child subreaper, so the workers are its own children. Without a zygote
(it died, or no fork) a worker is started as a new program
(``python -m tun2xray.workers``, or the binary's hidden ``_worker``).

Each worker slot gets a queue fd (``keeper.open_queue()`` in the supervisor,
passed to the zygote over its socket, or inherited through ``pass_fds``) and
one end of a socketpair, the *channel*.
The kernel keeps each flow on one queue (by the queue that last wrote the
flow's packets, else by hash over the number of queues), so each flow lives
in one worker's stack. The supervisor keeps its copy of every queue fd and
hands the same queue to a restarted worker: a queue that closed would change
the number of queues and the kernel would move the survivors' idle flows to
a worker that does not know them (it answers them with a RST). While a
worker is down, packets for its queue wait in the queue (the kernel drops
what does not fit); the replacement resets the dead worker's flows and
answers the new ones.

Channel messages are length-prefixed pickles of small dicts, between a
parent and its own child only: the first one carries the worker's spec
(device fd, router, stack settings), the worker answers ``{"ready": pid}``
(or ``{"error": reason}``), then requests ``{"id": n, "cmd": "status"}`` or
``{"id": n, "cmd": "router", "router": ...}`` (node switch: new router,
reset every flow) get one reply each carrying the same ``id``.

How many: ``--workers N``; without it the TUN2XRAY_WORKERS environment
variable, else one per two cores (``sched_getaffinity``; at least 1) when the device can be a
multi-queue TUN (`multiqueue_possible`), else 1. ``--workers 1`` (and every
fd:// or unix:// run) is the single-process path of cli.py: no
supervisor, no extra process.

``--record``: each worker records its own packets to a part file and the
supervisor merges the parts into the one capture when it ends (see
tun2xray.record).

The supervisor is a backend of the host shell (tun2xray.host.Host: signals,
control socket, proxy/core watch, Xray session, exit summary): `start()`
starts the workers, `run()` restarts them until `stop()`, `finish()` stops
them, and `status()` asks every worker at once on the loop, each within
REQUEST_TIMEOUT, so a slow or stopped worker never blocks the loop.

The supervisor's ``--control`` socket answers with `aggregate()`: counters
summed over the workers, flows concatenated with a ``worker`` id, and a
``workers`` list (pid, alive, restarts), rates summed, and the newest closed
flows of all workers. A worker that dies is restarted with backoff (and
counted); its counters restart from zero with it.

A deleted TUN ends the run: the supervisor watches the interface's index,
and when it is gone (or a new interface has its name) it stops the workers
and exits with status 1 and the one-line error a worker reports (the
single-process run's words). A restart never re-creates the TUN: opening a
queue by name would make a bare one (down, no addresses, no routes).

Shutdown: SIGINT/SIGTERM to the supervisor -> SIGTERM to every worker, wait
(SIGKILL after a grace), close the keeper: the kernel deletes the TUN with
its last queue. Workers and the zygote ask for SIGTERM when the supervisor
dies (``PR_SET_PDEATHSIG``) and also stop when their socket reaches EOF, so
none outlives it. Workers ignore SIGINT (a Ctrl-C reaches the whole
process group; the supervisor decides).

The rooms: count.py (how many workers, the multi-queue TUN facts),
channel.py (framing, both ends of the channel), supervisor.py (the
supervisor, aggregation, backoff, run_supervised), zygote.py (forking
workers that share memory) and worker.py (the worker process; __main__.py
runs it when it is started as a program).

The package's top level imports nothing: a worker's RSS is what it imports
plus its flows (no argparse, no pyroute2 in workers).
"""

# module -> the names it exports through the package, imported when first
# named: `run` with one worker needs only count.py (and channel.py's
# WorkerError), not the supervisor and worker (pickle, the worker's parser)
_EXPORTS = {
    "channel": ("MAX_MESSAGE", "READY_TIMEOUT", "REQUEST_TIMEOUT", "WorkerChannel", "WorkerError", "WorkerHandle",
                "frame", "unframe"),
    "count": ("MAX_WORKERS", "default_workers", "detach_queue", "multiqueue_possible", "multiqueue_url",
              "worker_count"),
    "supervisor": ("BACKOFF_FIRST", "BACKOFF_MAX", "CLOSED_HISTORY", "DEVICE_GONE_WAIT", "STABLE_AFTER",
                   "STOP_GRACE", "Supervisor", "aggregate", "next_backoff", "run_supervised"),
    "worker": ("worker_device", "worker_main"),
}
_HOME = {name: mod for mod, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    """A re-exported name, or one of the four modules (as before, when this
    file imported them)."""
    import importlib
    if name in _EXPORTS:
        return importlib.import_module(f".{name}", __name__)
    mod = _HOME.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_HOME) | set(_EXPORTS))


__all__ = ["BACKOFF_FIRST", "BACKOFF_MAX", "CLOSED_HISTORY", "DEVICE_GONE_WAIT", "MAX_MESSAGE", "MAX_WORKERS",
           "READY_TIMEOUT", "REQUEST_TIMEOUT", "STABLE_AFTER", "STOP_GRACE", "Supervisor", "WorkerChannel",
           "WorkerError", "WorkerHandle", "aggregate", "default_workers", "detach_queue", "frame",
           "multiqueue_possible", "multiqueue_url", "next_backoff", "run_supervised", "unframe", "worker_count",
           "worker_device", "worker_main"]
