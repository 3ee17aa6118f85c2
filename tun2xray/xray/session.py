"""`run --xray-config`: the session around the engine.

``XraySession`` reads and derives the config, starts the core, and from the
engine's loop watches the config link (node switching: the core reloads on
the node the link points at now, the old node's flows are reset) and, with
--auto-route, the default route (the core reloads on a new egress).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket

from ..upstream.url import format_hostport
from .config import DEFAULT_MARK, Derived, derive, outbound_servers, resolve_servers
from .core import Core, check_config, find_binary
from .errors import CoreError, XrayConfigError

log = logging.getLogger("tun2xray.xray")

_RTMGRP_LINK, _RTMGRP_IPV4_ROUTE, _RTMGRP_IPV6_ROUTE = 0x1, 0x40, 0x400


def user_rejection(binary: str, d: Derived, err: CoreError) -> CoreError:
    """A rejection of the runtime config, told about the user's file: when
    the core rejects the user's file too, its own reason and line there;
    otherwise the reason with the user's file named first."""
    if d.runtime_path is None or err.path != d.runtime_path:
        return err
    try:
        check_config(binary, d.real_source)
    except CoreError as own:
        return own
    return CoreError(f"{os.path.basename(binary)} rejected {d.real_source} (run as tun2xray's "
                     f"runtime copy {d.runtime_path}): {err.reason}", d.real_source, err.reason)


# --------------------------------------------------------------------------
# `run --xray-config`: the core, its config link, and the engine's routes

class XraySession:
    """Everything `run --xray-config` adds around the engine.

    prepare() reads and derives the config (no process, nothing written but
    the runtime config); start() starts the core; attach(engine, router)
    watches the config link (node switching) and the default route (with
    --auto-route) from the engine's loop; close() undoes it all.
    """

    def __init__(self, source: str, *, binary: str | None = None, mark: int | None = None,
                 poll: float = 1.0):
        self.source = source
        self.binary_arg = binary
        self.mark = mark
        self.poll = poll
        self.binary = None
        self.derived = None
        self.core = None
        self.owns_proxy = True          # False when --proxy overrides the config's socks inbound
        self.router = None
        self.engine = None
        self.autoroute = None
        self.switches = 0
        self._stamp = None
        self._egress = None
        self._task = None
        self._runtime_paths = set()
        self.extra_excluded = []        # the profile's excluded_routes
        self.route_prefixes = None      # the profile's routes and DNS hosts (None: default routes)
        self._nl = None                 # netlink socket: route/link change events
        self._nl_loop = None
        self._route_dirty = False

    # -- before the engine

    def prepare(self) -> Derived:
        self.binary = find_binary(self.binary_arg)
        self._stamp = self._target_stamp()
        self.derived = self._derive()
        return self.derived

    def _derive(self) -> Derived:
        d = derive(self.source, mark=self.mark)
        if d.runtime_path:
            self._runtime_paths.add(d.runtime_path)
        return d

    def _core_config(self, d: Derived) -> str:
        return d.runtime_path or d.real_source

    def start(self) -> None:
        d = self.derived
        self.core = Core(self.binary, self._core_config(d), d.ready_checks())
        try:
            self.core.start()
        except CoreError as e:
            raise user_rejection(self.binary, d, e) from None
        log.info("core %s running (pid %d) on %s; socks %s%s", os.path.basename(self.binary),
                 self.core.proc.pid, self.core.config_path, format_hostport(d.proxy.host, d.proxy.port),
                 f"; added inbounds {', '.join(d.added)}" if d.added else "")
        for note in d.notes:
            log.info("config: %s", note)

    def server_addresses(self, d: Derived | None = None) -> list:
        return resolve_servers(outbound_servers((d or self.derived).config))

    def _target_stamp(self):
        real = os.path.realpath(self.source)
        try:
            st = os.stat(real)
        except OSError:
            return (real, None)
        return (real, st.st_mtime_ns, st.st_size)

    def start_with(self, settings) -> None:
        """Add the config's rules to the router and start the core."""
        settings.router.rules.extend(self.derived.rules)
        profile = getattr(settings, "profile", None)
        if profile is not None:
            self.extra_excluded = [ipaddress.ip_network(x, strict=False) for x in
                                   list(profile.ipv4.excluded_routes) + list(profile.ipv6.excluded_routes)]
        net = getattr(settings, "net", None)
        if net is not None:
            self.route_prefixes = net.autoroute_prefixes()
        self.start()

    def route_up(self, tun: str) -> None:
        """--auto-route: the default routes through ``tun`` (after the device is up)."""
        if self.mark is None:
            return
        from .autoroute import AutoRoute
        from .autoroute import default_egress
        ar = AutoRoute(tun, mark=self.mark, excluded=self.excluded_routes(), routes=self.route_prefixes)
        self.autoroute = ar
        ar.up()
        # (pyroute2 runs its own asyncio loop: call it here, before ours
        # runs, and later only from executor threads)
        try:
            self._egress = default_egress()
        except Exception as e:                      # netlink trouble: no watching
            log.warning("cannot read the default route: %s", e)

    # -- with the engine

    def attach(self, engine, router) -> None:
        import asyncio
        loop = asyncio.get_running_loop()
        self.engine = engine
        self.router = router
        if self.autoroute is not None and self._egress is not None:
            # route and link changes arrive as netlink multicast messages; a
            # lookup of the default route follows only when something changed
            try:
                s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)   # NETLINK_ROUTE
                s.setblocking(False)
                s.bind((0, _RTMGRP_LINK | _RTMGRP_IPV4_ROUTE | _RTMGRP_IPV6_ROUTE))
            except OSError as e:
                log.warning("cannot watch the default route: %s", e)
            else:
                self._nl = s
                self._nl_loop = loop
                loop.add_reader(s.fileno(), self._on_route_event)
        self._task = loop.create_task(self._watch())

    def _on_route_event(self) -> None:
        s = self._nl
        try:
            while s.recv(65536):
                pass
        except OSError:              # drained (EAGAIN), or ENOBUFS after a burst: check anyway
            pass
        self._route_dirty = True

    async def _watch(self) -> None:
        import asyncio
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll)
            stamp = self._target_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                if stamp[1] is None:
                    log.error("%s now points at %s, which does not exist: keeping the running node",
                              self.source, stamp[0])
                    continue
                await self.switch(loop)
                continue
            if self._route_dirty and self.autoroute is not None:
                self._route_dirty = False
                from .autoroute import default_egress
                try:
                    eg = await loop.run_in_executor(None, default_egress)
                except Exception as e:                 # netlink trouble: try at the next event
                    log.warning("cannot read the default route: %s", e)
                    continue
                if eg and eg != self._egress:
                    log.info("default route moved from %s to %s: reloading the core", self._egress, eg)
                    self._egress = eg
                    await self.switch(loop, why="egress")

    async def switch(self, loop, why: str = "node") -> bool:
        """Reload the core on what the config link points at now; reset the
        old node's flows.  On a bad config the running node stays."""
        old = self.derived
        try:
            d = await loop.run_in_executor(None, self._reload_blocking)
        except (XrayConfigError, CoreError) as e:
            log.error("%s switch failed, keeping %s: %s", why, old.real_source, e)
            return False
        r = self.router
        if self.owns_proxy:
            r.default = d.proxy
            r.default_url = d.proxy_url
        old_ids = {id(x) for x in old.rules}
        r.rules[:] = [x for x in r.rules if id(x) not in old_ids] + list(d.rules)
        n = self.engine.reset_flows() if self.engine is not None else 0
        self.switches += 1
        log.info("switched to %s (%s): %d flows of the old node reset", d.real_source, why, n)
        return True

    def _reload_blocking(self) -> Derived:
        d = self._derive()
        cfg = self._core_config(d)
        try:
            check_config(self.binary, cfg)
            self.core.reload(cfg, d.ready_checks(), timeout=self.core.ready_timeout + 10)
        except CoreError as e:
            raise user_rejection(self.binary, d, e) from None
        if self.autoroute is not None:
            self.autoroute.set_excluded(self.excluded_routes(d))
        self.derived = d
        return d

    def excluded_routes(self, d: Derived | None = None) -> list:
        return list(self.extra_excluded) + [ipaddress.ip_network(a) for a in self.server_addresses(d)]

    def status(self) -> dict:
        d = self.derived
        return {"config": os.path.abspath(self.source), "node": d.real_source if d else None,
                "runtime_config": d.runtime_path if d else None, "binary": self.binary,
                "switches": self.switches,
                "mark": self.mark, "auto_route": self.autoroute is not None,
                "core": self.core.status() if self.core is not None else None}

    def health(self) -> tuple:
        """(ok, reason) of the core for the state: ok while it runs; else
        e.g. (False, "core exited: killed by SIGKILL, restarting in 2s")."""
        if self.core is None:
            return False, "core not started"
        return self.core.health()

    def wrap_status(self, status_fn):
        def status():
            st = status_fn()
            st["xray"] = self.status()
            return st
        return status

    def detach(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._nl is not None:
            with contextlib.suppress(Exception):
                self._nl_loop.remove_reader(self._nl.fileno())
            self._nl.close()
            self._nl = None

    def close(self) -> None:
        self.detach()
        if self.autoroute is not None:
            try:
                self.autoroute.down()
            except Exception as e:                  # keep cleaning up
                log.error("auto-route cleanup: %s", e)
            self.autoroute = None
        if self.core is not None:
            self.core.stop()
            self.core = None
        for p in self._runtime_paths:
            with contextlib.suppress(OSError):
                os.unlink(p)
        self._runtime_paths.clear()


def session_from_args(args) -> XraySession:
    """`run` flags -> a prepared session (config read and derived, nothing
    started).  Sets ``args.proxy`` to the config's socks inbound unless
    --proxy was given."""
    if args.auto_route and not args.xray_config:
        raise XrayConfigError("--auto-route needs --xray-config (the core's sockets must carry "
                              "the mark that keeps them out of the TUN)")
    if args.auto_route and not args.device.startswith("tun://"):
        raise XrayConfigError("--auto-route needs a tun:// device")
    xs = XraySession(args.xray_config, binary=args.xray_bin,
                     mark=DEFAULT_MARK if args.auto_route else None)
    xs.prepare()
    if args.proxy:
        xs.owns_proxy = False
    else:
        args.proxy = xs.derived.proxy_url
    return xs
