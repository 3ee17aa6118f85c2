"""One tun2xray per device, and finding the one that runs.

Every ``tun2xray run`` claims its device before it opens it (before the
core starts, before anything is written): an exclusive ``flock`` on
``RUN_DIR/NAME.lock``, a small JSON file that tells who holds it::

    {"pid": 1234, "name": "tun0", "device": "tun://tun0",
     "control": "unix:///run/tun2xray/tun0.sock", "started": 1700000000.0}

A second ``run`` on the same device finds the lock taken and stops at
once with one line naming the first (its pid and control socket).  The
kernel drops a flock when its holder dies, so a lock file left by a
SIGKILLed run is simply taken over (and its stale control socket replaced,
see control.serve_control).

The lock only knows tun2xray.  For a ``tun://NAME`` that already exists the
claim also looks at every process's open TUN fds (``/proc/PID/fdinfo``
shows ``iff: NAME`` for them) and refuses a TUN that another process holds:
attaching to a multi-queue TUN someone else serves would silently take part
of its flows.  The supervisor's own workers attach their queues later,
without this check, so worker restarts keep working.

Where (``RUN_DIR``): ``/run/tun2xray`` (``$TUN2XRAY_RUN_DIR`` to move it;
other users than root: ``$XDG_RUNTIME_DIR/tun2xray``, else ``/tmp/tun2xray-UID``);
interface names are per network namespace, so a run in a named one (``ip
netns``) uses ``RUN_DIR/netns/NSNAME``.  Names per device URL: ``tun://NAME`` -> NAME (``tun://``
alone -> the first free ``tunN``); ``fd://N`` -> the TUN's interface name
when N is a TUN, else ``fdN-PID``; ``unix:///PATH`` -> ``unix-PATH`` with
``/`` as ``_``.

Every run serves its control socket at ``RUN_DIR/NAME.sock`` unless
``--control unix:///PATH`` puts it elsewhere (the lock records where) or
``--control none`` turns it off.  ``find_control()`` is how ``status``,
``doctor`` and ``node`` find the running instance without flags.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time

RUN_DIR = "/run/tun2xray"
NO_CONTROL = ("none", "off")
SUN_PATH_MAX = 107              # sockaddr_un.sun_path, minus the NUL


class InstanceError(Exception):
    """The device is taken, or which instance was meant is unclear: one line."""


# --------------------------------------------------------------------- where

def _netns_tag() -> str | None:
    """The ``ip netns`` name of our network namespace; None for PID 1's
    namespace and for one without a name (containers have their own /run)."""
    try:
        me = os.stat("/proc/self/ns/net")
    except OSError:
        return None
    try:
        init = os.stat("/proc/1/ns/net")
    except OSError:
        pass                        # PID 1 is not ours to look at: go by the names
    else:
        if (init.st_dev, init.st_ino) == (me.st_dev, me.st_ino):
            return None
    for d in ("/run/netns", "/var/run/netns"):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for n in names:
            try:
                st = os.stat(os.path.join(d, n))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
                return n
    return None


def base_dir() -> str:
    """$TUN2XRAY_RUN_DIR, else /run/tun2xray for root; other users (a
    unix:// or fd:// device needs no privileges) get their own folder."""
    env = os.environ.get("TUN2XRAY_RUN_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return RUN_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "tun2xray") if xdg else f"/tmp/tun2xray-{os.geteuid()}"


def run_dir() -> str:
    """This network namespace's folder of locks and control sockets."""
    base = base_dir()
    tag = _netns_tag()
    return base if tag is None else os.path.join(base, "netns", tag)


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.@:+-]", "_", name).lstrip(".") or "_"
    return s[:64]


def lock_path(name: str, where: str | None = None) -> str:
    return os.path.join(where or run_dir(), _safe(name) + ".lock")


def default_control(name: str, where: str | None = None) -> str:
    path = os.path.join(where or run_dir(), _safe(name) + ".sock")
    if len(path.encode()) > SUN_PATH_MAX:
        raise InstanceError(f"the default control socket {path} is longer than a socket path "
                            "may be: give --control unix:///shorter/path")
    return "unix://" + path


# ----------------------------------------------------------------- the name

TUNGETIFF = 0x800454D2


def tun_name_of_fd(fd: int) -> str | None:
    """The interface name of a TUN fd (None for anything else)."""
    try:
        r = fcntl.ioctl(fd, TUNGETIFF, b"\0" * 40)
    except OSError:
        return None
    name = r[:16].split(b"\0", 1)[0].decode(errors="replace")
    return name or None


def _link_exists(name: str) -> bool:
    """In this network namespace (/sys may show another one's after a setns)."""
    try:
        return socket.if_nametoindex(name) > 0
    except OSError:
        return False


def _free_tun_name() -> str:
    for i in range(4096):
        name = f"tun{i}"
        if not _link_exists(name):
            return name
    raise InstanceError("no free tunN interface name: give tun://NAME")


def device_name(url: str) -> tuple:
    """(name, url): the instance name of a device URL, and the URL to open
    (``tun://`` alone gets the name chosen here)."""
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "tun":
        name, q, query = rest.partition("?")
        if not name:
            name = _free_tun_name()
            url = f"tun://{name}{q}{query}"
        return name, url
    if scheme == "fd":
        n = rest.partition("?")[0].rstrip("/")
        if n.isdigit():
            return tun_name_of_fd(int(n)) or f"fd{n}-{os.getpid()}", url
        return f"fd-{os.getpid()}", url
    if scheme == "unix":
        path = rest.partition("?")[0]
        return "unix-" + path.strip("/").replace("/", "_"), url
    return f"{scheme or 'device'}-{os.getpid()}", url


# ---------------------------------------------------------- who holds a TUN

def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    short = [os.path.basename(argv[0])] + argv[1:4]
    return " ".join(" ".join(short).split())[:80]


def _same_netns(pid: int, me) -> bool:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == me


def tun_holders(name: str, exclude=()) -> list:
    """PIDs (in our network namespace, not in ``exclude``) with an open TUN
    fd attached to interface ``name``, from /proc/PID/fdinfo."""
    try:
        st = os.stat("/proc/self/ns/net")
        me = (st.st_dev, st.st_ino)
    except OSError:
        me = None
    want = f"iff:\t{name}"
    skip = {os.getpid(), *exclude}
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        pid = int(entry)
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != "/dev/net/tun":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    info = f.read()
            except OSError:
                continue
            if want in info.splitlines():
                if me is None or _same_netns(pid, me):
                    out.append(pid)
                break
    return out


# ------------------------------------------------------------------ the lock

def _read_info(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _describe(info: dict) -> str:
    if "pid" not in info:
        return "starting just now"      # its lock file is being written
    ctl = info.get("control") or "no control socket"
    return f"pid {info['pid']}, control {ctl}"


class InstanceLock:
    """The claim on one device; ``release()`` (idempotent) gives it back."""

    def __init__(self, name: str, path: str, fd: int, info: dict):
        self.name = name
        self.path = path
        self.fd = fd
        self.info = info

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            # unlink while still holding it: a run that opened this inode
            # before and locks it after us sees that the path moved on
            if _same_file(self.fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def acquire(name: str, info: dict, where: str | None = None) -> InstanceLock:
    """Take the device's lock or raise InstanceError naming its holder."""
    where = where or run_dir()
    try:
        os.makedirs(where, mode=0o755 if os.geteuid() == 0 else 0o700, exist_ok=True)
    except OSError as e:
        raise InstanceError(f"cannot make {where}: {e.strerror}") from None
    path = lock_path(name, where)
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise InstanceError(f"cannot open {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise InstanceError(f"cannot lock {path}: {e.strerror}") from None
            other = _read_info(path)
            raise InstanceError(f"{info.get('device') or name} is already served by another "
                                f"tun2xray ({_describe(other)})") from None
        if not _same_file(fd, path):
            os.close(fd)            # its holder removed it as we locked it: again
            continue
        data = json.dumps(dict(info, name=name, pid=os.getpid(), started=round(time.time(), 3)))
        os.ftruncate(fd, 0)
        os.pwrite(fd, data.encode() + b"\n", 0)
        return InstanceLock(name, path, fd, json.loads(data))
    raise InstanceError(f"cannot lock {path}: it keeps being replaced")


def claim(device_url: str, control: str | None) -> tuple:
    """For ``run``: (lock, device_url, control_url or None).

    Takes the device's lock (InstanceError naming the other instance when
    taken), refuses a ``tun://`` whose TUN another process holds open, and
    picks the default control socket when ``control`` is None."""
    name, device_url = device_name(device_url)
    where = run_dir()
    if control is None:
        control = default_control(name, where)
    elif control.lower() in NO_CONTROL:
        control = None
    lock = acquire(name, {"device": device_url, "control": control}, where)
    try:
        if device_url.lower().startswith("tun://") and _link_exists(name):
            holders = tun_holders(name)
            if holders:
                who = ", ".join(f"pid {p} ({_comm(p)})" for p in holders[:4])
                raise InstanceError(f"{device_url}: the TUN {name} is already open in {who}: "
                                    "refusing to attach to it (stop that process first)")
    except BaseException:
        lock.release()
        raise
    return lock, device_url, control


# -------------------------------------------------------- finding instances

def _held_inodes() -> set | None:
    """(major, minor, inode) of every flock'ed file, from /proc/locks."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = set()
    for ln in lines:
        parts = ln.split()
        if "FLOCK" not in parts:
            continue
        for p in parts:
            bits = p.split(":")
            if len(bits) == 3 and bits[2].isdigit():
                try:
                    out.add((int(bits[0], 16), int(bits[1], 16), int(bits[2])))
                except ValueError:
                    pass
                break
    return out


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] not in "ZX"
    except (OSError, IndexError):
        return False


def list_instances(where: str | None = None) -> list:
    """Live instances in this network namespace: their lock files' contents
    (name, pid, device, control), sorted by name.  Locks left by dead runs
    are skipped (and left for the next run of that device to take over)."""
    where = where or run_dir()
    try:
        files = sorted(f for f in os.listdir(where) if f.endswith(".lock"))
    except OSError:
        return []
    held = _held_inodes()
    out = []
    for f in files:
        path = os.path.join(where, f)
        try:
            st = os.stat(path)
        except OSError:
            continue
        key = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        if held is not None and key not in held:
            continue
        info = _read_info(path)
        if not _pid_alive(info.get("pid")):
            continue
        info.setdefault("name", f[:-5])
        out.append(info)
    return out


def _strip_tun(device: str) -> str:
    return device[len("tun://"):].partition("?")[0] if device.startswith("tun://") else device


def find_instance(device: str | None = None, where: str | None = None) -> dict | None:
    """The running instance meant: the one on ``device`` (NAME or tun://NAME)
    when given, else the only one running here.  None when none runs;
    InstanceError when several run and none was named."""
    live = list_instances(where)
    if device:
        name = _strip_tun(device)
        for info in live:
            if info.get("name") == name or info.get("device") == device:
                return info
        raise InstanceError(f"no running tun2xray on {name} here"
                            + (f" (running: {', '.join(i['name'] for i in live)})" if live else ""))
    if not live:
        return None
    if len(live) > 1:
        listing = "; ".join(f"{i['name']} ({_describe(i)})" for i in live)
        raise InstanceError(f"{len(live)} tun2xray instances run here: {listing}: "
                            "choose one with --control URL or --device NAME")
    return live[0]


def find_control(control: str | None = None, device: str | None = None) -> str:
    """The control URL to ask: ``control`` when given, else the running
    instance's (see find_instance); InstanceError when there is none."""
    if control:
        return control
    info = find_instance(device)
    if info is None:
        raise InstanceError(f"no running tun2xray found in {run_dir()} "
                            "(start `tun2xray run`, or give --control URL)")
    if not info.get("control"):
        raise InstanceError(f"the tun2xray on {info['name']} (pid {info.get('pid')}) "
                            "serves no control socket (it runs with --control none)")
    return info["control"]

