"""tun2xray command line: run, status, replay."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys

log = logging.getLogger("tun2xray")


class UsageError(Exception):
    """A bad flag or config: one line on stderr, exit status 2."""


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter without its `import shutil` (for the
    terminal width; shutil brings zlib, bz2 and lzma, about 0.3 MB of RSS
    every `run` would keep): the same width, from $COLUMNS or the terminal."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            width = _columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else stdout's
    terminal, else 80."""
    import os
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # one line, not the usage block: scripts and hosts log the reason
        self.exit(2, f"tun2xray: error: {message} (see --help)\n")


class _VersionAction(argparse.Action):
    """--version, looked up only when asked: the distribution's metadata
    (importlib.metadata and the email/csv modules it pulls in) would cost
    every `tun2xray run` about 0.9 MB of RSS."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show the version and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import version
        sys.stdout.write(f"tun2xray {version()}\n")
        parser.exit()


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The parser; for an argv that starts with `run` the `node` and `doctor`
    subcommands are named but left without their flags: filling them imports
    tun2xray.xray.doctor and .nodes (about 0.5 MB of RSS a run would keep)."""
    p = _Parser(prog="tun2xray", description="TUN packet flows to Xray inbounds")
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="carry a TUN device's flows to Xray inbounds")
    r.add_argument("--device", help="tun://NAME, fd://N[?header=af], unix:///path (required, here or as "
                   "the profile's \"device\")")
    r.add_argument("--proxy", help="the Xray socks inbound: socks5://[user:pass@]host:port")
    r.add_argument("--address", help="IPv4 address/prefix for a tun:// device (default 198.18.0.1/15)")
    r.add_argument("--address6", help="IPv6 address/prefix for a tun:// device (default fd00:7478::1/64)")
    r.add_argument("--mtu", type=int, help="device MTU (default 1500)")
    r.add_argument("--map", action="append", default=[], metavar="PROTO:PORT=URL",
                   help="send flows to that port to another inbound, e.g. udp:53=dokodemo://127.0.0.1:10853, "
                   "or refuse them: udp:443=block")
    r.add_argument("--dns", choices=["fake-ip", "remember", "off"],
                   help="answer DNS in the engine and dial flows by name: fake-ip (fake addresses), remember "
                   "(real answers, remembered), off (default: DNS flows are ordinary flows); docs/dns.md")
    r.add_argument("--dns-upstream", metavar="URL", help="where real queries go: dokodemo://HOST:PORT or "
                   "socks5://HOST:PORT[?server=IP[:PORT]] (default: the target of a udp:53 rule)")
    r.add_argument("--config", help="profile JSON (docs/profile.md): every run flag has a key; flags "
                   "override keys")
    r.add_argument("--control", help="serve JSON status on unix:///path (default: "
                   "unix:///run/tun2xray/NAME.sock, per device; none: no socket)")
    r.add_argument("--record", metavar="FILE.pcap", help="write every packet crossing the device to a pcap")
    r.add_argument("--record-wire", action="store_true", default=None,
                   help="record wire-sized packets: cut an offload device's TCP super-segments to the MTU")
    r.add_argument("--record-max-mb", type=float, metavar="N",
                   help="rotate the capture (FILE.pcap -> FILE.pcap.1) when it reaches N MB "
                   "(default 256, 0 = no cap)")
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="default info; debug adds each flow's life: rule, dial, SOCKS reply, close; drop summaries")
    r.add_argument("--log-format", choices=["text", "json"],
                   help="text (default): one timestamped line per record; json: one JSON object per line")
    r.add_argument("--xray-config", help="start and supervise Xray with this config.json (may be a "
                   "link to the selected node); its socks/dokodemo inbounds become the proxy and rules")
    r.add_argument("--xray-bin", help="the core binary (default: xray, else v2ray, on PATH)")
    r.add_argument("--auto-route", action="store_true", default=None,
                   help="route everything through the TUN (policy routing; needs --xray-config)")
    r.add_argument("--workers", type=int, metavar="N",
                   help="worker processes, one per queue of a multi-queue tun:// device "
                   "(default: one per two cores for a tun:// device, else 1)")

    s = sub.add_parser("status", help="print a running tun2xray's status as JSON")
    s.add_argument("--control", help="unix:///path (default: the running tun2xray's, found "
                   "under /run/tun2xray/)")
    s.add_argument("--device", help="NAME or tun://NAME: the instance on that device, when several run")

    rp = sub.add_parser("replay", help="feed a capture to the stack offline and print its flows")
    rp.add_argument("pcap", nargs="+")
    rp.add_argument("--json", action="store_true", help="one JSON object per capture instead of text")
    rp.add_argument("--checksums", choices=["auto", "verify", "ignore"], default="auto",
                    help="client TCP/UDP checksums: auto (default) completes them where the capture was "
                    "taken with checksum offload (and says so), verify feeds them as captured, ignore "
                    "completes every wrong one")
    rp.add_argument("--ladder", metavar="FLOW", help="draw flow FLOW (its number in the report, or "
                    "addr:port-addr:port) as a ladder diagram; needs --svg and one capture")
    rp.add_argument("--svg", metavar="FILE", help="where --ladder writes its SVG")

    node = sub.add_parser("node", help="list or select Xray node configs (the config.json link)")
    doc = sub.add_parser("doctor", help="check a running setup: one line per check")
    if not _runs(argv):
        from .xray import doctor, nodes
        nodes.add_arguments(node)
        doctor.add_arguments(doc)
    return p


def _runs(argv) -> bool:
    """Does argv name the `run` command (its first word; the top level has
    no options that take a value)?"""
    return bool(argv) and argv[0] == "run"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if args.command == "replay":
        from .replay import main as replay_main
        return replay_main(args)
    if args.command == "status":
        return cmd_status(args)
    if args.command in ("node", "doctor"):
        from .xray import doctor, nodes
        return (nodes if args.command == "node" else doctor).main(args)
    if args.command == "run":
        from . import logs
        from .host import HostError
        from .instance import InstanceError
        from .xray.errors import XrayError     # not the package's: that loads every room
        try:
            apply_profile(args)             # profile keys fill unset flags (log_level, log_format too)
        except UsageError as e:
            logs.setup("info", args.log_format or "text")
            logs.error_line(str(e))
            return 2
        logs.setup(args.log_level, args.log_format)
        try:
            return cmd_run_claimed(args)
        except (UsageError, HostError, XrayError) as e:
            logs.error_line(str(e))
            return 2
        except InstanceError as e:          # the device is another instance's
            logs.error_line(str(e))
            return 1
    return 2


def cmd_status(args) -> int:
    from .control import query
    from .instance import InstanceError, find_control
    try:
        url = find_control(args.control, args.device)
    except InstanceError as e:
        print(f"tun2xray: error: {e}", file=sys.stderr)
        return 1
    try:
        reply = query(url)
    except (OSError, ValueError) as e:
        print(f"tun2xray: error: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0


class RunSettings:
    """What `run` needs, merged from the profile and the flags (flags win)."""

    def __init__(self, args):
        from .rules import Router, parse_map
        from .upstream.url import DokodemoUpstream, parse_upstream

        profile = getattr(args, "profile", None)
        if profile is None and args.config:
            profile = _load_profile_file(args.config)
        proxy = args.proxy or (profile.proxy if profile else None)
        if not proxy:
            raise UsageError("--proxy is required (or a profile with \"proxy\")")
        try:
            up = parse_upstream(proxy)
        except ValueError as e:
            raise UsageError(f"--proxy: {e}") from None
        if isinstance(up, DokodemoUpstream):
            raise UsageError(f'--proxy "{proxy}": the default route must be a socks5:// inbound')
        rules = []
        for spec in args.map:
            try:
                rules.append(parse_map(spec))
            except ValueError as e:
                raise UsageError(str(e)) from None
        if profile:
            rules.extend(profile.rules)
        self.proxy = up
        self.router = Router(default=up, default_url=proxy, rules=rules)
        mtu = args.mtu if args.mtu is not None else (profile.mtu if profile else 1500)
        if not 576 <= mtu <= 65535:
            raise UsageError(f"--mtu {mtu}: must be between 576 and 65535")
        self.mtu = mtu
        self.address = args.address or (profile.ipv4.address if profile else "198.18.0.1/15")
        self.address6 = args.address6 or (profile.ipv6.address if profile else "fd00:7478::1/64")
        import ipaddress
        for flag, value, version in (("--address", self.address, 4), ("--address6", self.address6, 6)):
            try:
                iface = ipaddress.ip_interface(value)
            except ValueError:
                raise UsageError(f'{flag} "{value}": not an address/prefix') from None
            if iface.version != version:
                raise UsageError(f'{flag} "{value}": not an IPv{version} address')
        self.profile = profile
        self.udp_timeout = profile.udp_timeout if profile else 60.0
        self.connect_timeout = profile.tcp_connect_timeout if profile else 10.0
        self.refusal_window = profile.tcp_refusal_window if profile else 1.5
        self.max_flows = profile.max_flows if profile else 65536
        self.icmp_echo = profile.icmp_echo if profile else "reply"
        from .host import stack_limits
        self.limits = stack_limits(profile)     # max_udp_flows, udp_port_timeouts, tcp_buffer_kb, memory_budget_mb
        from .tunroutes import Network
        self.net = Network(profile, args.device, [self.address, self.address6],
                           auto_route=bool(getattr(args, "auto_route", False)), mtu=self.mtu)
        self.dns_settings = _dns_settings(args, profile, [self.address, self.address6], self.net)
        self.dns = self.dns_settings if self.dns_settings.on else None     # what the engine gets
        self.control = args.control
        self.instance = getattr(args, "instance", None)     # pid, device, control (status)
        if self.control:
            from .control import control_path
            try:
                control_path(self.control)
            except ValueError as e:
                raise UsageError(str(e)) from None


def _dns_settings(args, profile, addresses, net):
    """The run's DNS settings (tun2xray.dns.settings); with fake-ip the
    pools are routed into a TUN tun2xray configures (net.fake)."""
    from .dns.settings import DnsSettings, DnsSettingsError
    try:
        ds = DnsSettings.from_run(args, profile, addresses)
    except DnsSettingsError as e:
        raise UsageError(str(e)) from None
    if not ds.on and getattr(args, "dns_upstream", None) and not (profile and "dns.upstream" in profile.values):
        raise UsageError("--dns-upstream: DNS handling is off (give --dns fake-ip or --dns remember)")
    if ds.mode == "fake-ip":
        net.fake = [p for p in (ds.fake_ipv4, ds.fake_ipv6) if p]
    return ds


def _check_dns_upstream(settings) -> None:
    """With the rules complete (the Xray config's too): remember mode has an upstream."""
    if settings.dns is None:
        return
    from .dns.settings import DnsSettingsError, check_upstream
    try:
        check_upstream(settings.dns, settings.router)
    except DnsSettingsError as e:
        raise UsageError(str(e)) from None


def _dns_workers(args, settings, n: int) -> int:
    """One process holds the name book: DNS handling runs with one worker."""
    if settings.dns is None or n <= 1:
        return n
    if getattr(args, "workers", None) is not None:
        raise UsageError(f"--workers {n}: --dns {settings.dns.mode} needs one worker (the name book "
                         "lives in one process)")
    return 1


def _check_reachable(up, timeout: float = 3.0) -> None:
    try:
        socket.create_connection((up.host, up.port), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"proxy {up.host}:{up.port} is unreachable: {e.strerror or e}") from None


def _load_profile_file(path: str):
    """The profile in *path*; UsageError (one line, naming --config) when it
    cannot be read or is not a valid profile."""
    from .profile import ProfileError, load_profile
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"--config {path}: {e.strerror}") from None
    try:
        return load_profile(text)
    except ProfileError as e:
        raise UsageError(f"--config {path}: {e}") from None


def apply_profile(args):
    """Read --config (if any) and fill every run flag left unset from its
    key (tun2xray.profile.KEYS: one entry per flag), else the key's default.
    Keeps the loaded profile on args.profile; a second call does nothing."""
    if getattr(args, "profile_applied", False):
        return args.profile
    from .profile import apply_to_args
    profile = _load_profile_file(args.config) if getattr(args, "config", None) else None
    apply_to_args(profile, args)
    args.profile = profile
    args.profile_applied = True
    if not args.device:
        raise UsageError('--device is required (or "device" in the --config profile)')
    return profile


def cmd_run_claimed(args) -> int:
    """cmd_run holding the device's instance lock: a second run on the same
    device fails here (InstanceError), before the core starts or the device
    opens; the control socket defaults to the device's own."""
    from .instance import claim
    apply_profile(args)                     # device and control may come from the profile
    lock, args.device, args.control = claim(args.device, args.control)
    args.instance = lock.info
    try:
        return cmd_run(args)
    finally:
        lock.release()


def cmd_run(args) -> int:
    apply_profile(args)
    xs = None
    if args.xray_config or args.auto_route:
        from .xray import session_from_args
        xs = session_from_args(args)        # reads the config; sets args.proxy from it
    try:
        return _cmd_run(args, xs)
    finally:
        if xs is not None:
            xs.close()                      # routes, rules, core, runtime config


def _cmd_run(args, xs) -> int:
    settings = RunSettings(args)
    try:
        settings.record = _record_options(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from .device import DeviceError, open_device
    from .workers.channel import WorkerError
    from .workers.count import worker_count
    try:
        n = _dns_workers(args, settings, worker_count(args))
    except WorkerError as e:
        raise UsageError(str(e)) from None
    if n > 1:
        return _run_workers(args, settings, xs, n)
    if xs is not None:
        xs.start_with(settings)
    _check_dns_upstream(settings)
    _check_reachable(settings.proxy)
    try:
        device = open_device(args.device, mtu=settings.mtu,
                             addresses=[settings.address, settings.address6])
    except DeviceError as e:
        raise UsageError(f"--device {args.device}: {e}") from None
    from .host import routes_up
    recorder = None
    try:
        routes_up(settings, device.name)
        if settings.record is not None:
            from . import record
            try:
                recorder = record.recorder(settings.record, device.mtu)
            except OSError as e:
                raise UsageError(f"--record {args.record}: {e.strerror}") from None
            record.notice(settings.record, device.capabilities.offload)
        if xs is not None:
            xs.route_up(device.name)
        return _run_loop(_serve(settings, device, recorder, xs))
    finally:
        settings.net.down()
        device.close()
        if recorder is not None:
            recorder.close()
            from .record import closed
            closed(recorder)


def _record_options(args):
    """RecordOptions for --record (tun2xray.record, with the pcap writer,
    loaded only when a --record flag is given); None without them."""
    if not (getattr(args, "record", None) or getattr(args, "record_wire", False)
            or getattr(args, "record_max_mb", None) is not None):
        return None
    from .record import RecordOptions
    return RecordOptions.from_args(args)


def _run_workers(args, settings, xs, n: int) -> int:
    """`run` with n worker processes: the zygote they are forked from is
    forked first, before the core's threads start (tun2xray.workers.zygote)."""
    from .workers.channel import WorkerError
    from .workers.supervisor import run_supervised
    from .workers.zygote import Zygote

    zygote = Zygote.start()
    try:
        if xs is not None:
            xs.start_with(settings)
        _check_reachable(settings.proxy)
        return run_supervised(args, settings, xs, n, zygote)
    except WorkerError as e:
        raise UsageError(str(e)) from None
    finally:
        if zygote is not None:
            zygote.close()


def _run_loop(coro) -> int:
    from .host import run
    return run(coro)


async def _serve(settings, device, recorder, xs=None) -> int:
    """One process: the host shell (tun2xray.host) around one engine."""
    from .host import Host, make_engine

    engine = make_engine(device, settings, recorder)
    return await Host(engine, settings, xs).serve(
        f"running on {device.name} (mtu {device.mtu}), proxy {settings.router.default_url}")


if __name__ == "__main__":
    sys.exit(main())
