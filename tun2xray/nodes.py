"""Node switching: a folder of node configs and the ``config.json`` link.

    /etc/tun2xray/config.json -> nodes/tokyo.json
    /etc/tun2xray/nodes/tokyo.json
    /etc/tun2xray/nodes/paris.json

``tun2xray node list`` shows the nodes (``*`` marks the selected one);
``tun2xray node use NAME`` checks the node's config (our reader, then the
core's own ``-test`` when a core is installed) and repoints the link
atomically (a new link renamed over the old one).  A running ``tun2xray run
--xray-config config.json`` notices within a second, restarts the core on
the new node and resets the old node's flows; with ``--control`` the command
waits until the running instance reports the switch.  A regular file at the
link's place is never overwritten.
"""

from __future__ import annotations

import os
import sys
import time

DEFAULT_CONFIG = os.environ.get("TUN2XRAY_XRAY_CONFIG", "/etc/tun2xray/config.json")


class NodeError(Exception):
    pass


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="node_command", required=True, parser_class=type(p))
    for name, helptext in (("list", "list the nodes; * marks the selected one"),
                           ("use", "select a node: repoint the config.json link")):
        s = sub.add_parser(name, help=helptext)
        if name == "use":
            s.add_argument("name", help="a node: nodes/NAME.json")
            s.add_argument("--xray-bin", help="core used to check the node's config "
                           "(default: xray, else v2ray, on PATH; skipped when none)")
            s.add_argument("--control", help="wait until the tun2xray serving unix:///path has switched")
            s.add_argument("--wait", type=float, default=20.0, help="seconds to wait with --control")
        s.add_argument("--xray-config", default=None,
                       help="the config.json link (default: the running tun2xray's, else "
                       f"{DEFAULT_CONFIG} or $TUN2XRAY_XRAY_CONFIG)")
        s.add_argument("--device", help="NAME: the tun2xray on that device, when several run")
        s.add_argument("--nodes", help="the folder of node configs (default: nodes/ beside the link)")


def nodes_dir(config: str, nodes: str | None = None) -> str:
    return nodes or os.path.join(os.path.dirname(os.path.abspath(config)), "nodes")


def list_nodes(config: str, nodes: str | None = None) -> list:
    """[(name, path, selected)] sorted by name."""
    d = nodes_dir(config, nodes)
    try:
        names = sorted(f for f in os.listdir(d) if f.endswith(".json") and not f.startswith("."))
    except OSError as e:
        raise NodeError(f"nodes folder {d}: {e.strerror}") from None
    current = os.path.realpath(config) if os.path.lexists(config) else None
    out = []
    for f in names:
        path = os.path.join(d, f)
        out.append((f[:-5], path, current is not None and os.path.realpath(path) == current))
    return out


def node_path(config: str, name: str, nodes: str | None = None) -> str:
    d = nodes_dir(config, nodes)
    base = name if name.endswith(".json") else name + ".json"
    if os.sep in base or base.startswith("."):
        raise NodeError(f'node "{name}": a node is a file name in {d}')
    path = os.path.join(d, base)
    if not os.path.isfile(path):
        known = ", ".join(n for n, _, _ in list_nodes(config, nodes)) or "none"
        raise NodeError(f'no node "{name}" in {d} (nodes: {known})')
    return path


def check_node(path: str, binary: str | None = None) -> None:
    """Our reader must find a usable setup; the core (when installed) must accept it."""
    from . import xray
    xray.derive(path, write=False)
    try:
        core = xray.find_binary(binary)
    except xray.CoreError:
        if binary:
            raise
        return                       # no core here: our own check only
    xray.check_config(core, path)


def use_node(config: str, name: str, nodes: str | None = None, binary: str | None = None) -> str:
    """Repoint the ``config`` link at node ``name`` atomically; returns the node's path."""
    path = node_path(config, name, nodes)
    if os.path.lexists(config) and not os.path.islink(config):
        raise NodeError(f"{config} is a regular file, not a link: move it into "
                        f"{nodes_dir(config, nodes)} first (it is never overwritten)")
    check_node(path, binary)
    target = os.path.relpath(path, os.path.dirname(os.path.abspath(config)))
    tmp = f"{config}.tmp-{os.getpid()}"
    try:
        os.symlink(target, tmp)
        os.replace(tmp, config)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise NodeError(f"cannot repoint {config}: {e.strerror}") from None
    return path


def wait_switched(control: str, node: str, timeout: float) -> dict:
    """Poll the running tun2xray until it runs ``node`` with a live core."""
    from .control import query
    want = os.path.realpath(node)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            st = query(control, timeout=2.0).get("xray") or {}
            core = st.get("core") or {}
            if st.get("node") == want and core.get("alive"):
                return st
            last = f"running {st.get('node')}, core alive={core.get('alive')}"
        except (OSError, ValueError) as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise NodeError(f"the running tun2xray did not switch within {timeout:g}s ({last})")
        time.sleep(0.2)


def running_link(args) -> tuple:
    """(config link, control URL or None): --xray-config when given, else
    the link the tun2xray running here was started with (and its control
    socket, to wait for the switch), else DEFAULT_CONFIG."""
    from .control import query
    from .instance import find_instance
    url = getattr(args, "control", None)    # (`node use` has --control)
    if args.xray_config:
        return args.xray_config, url
    if not url:
        info = find_instance(args.device)   # InstanceError: several, or none on --device
        url = (info or {}).get("control")
        if not url:
            return DEFAULT_CONFIG, None     # none runs here (or it serves no socket)
    try:
        xst = query(url, timeout=3.0).get("xray") or {}
    except (OSError, ValueError) as e:
        raise NodeError(f"cannot ask the running tun2xray ({url}): {e}") from None
    if not xst.get("config"):
        return DEFAULT_CONFIG, None         # it runs without --xray-config
    return xst["config"], url


def main(args) -> int:
    from .instance import InstanceError
    from .xray import XrayError
    try:
        args.xray_config, control = running_link(args)
        if args.node_command == "use":
            args.control = control
        if args.node_command == "list":
            rows = list_nodes(args.xray_config, args.nodes)
            for name, path, selected in rows:
                print(f"{'*' if selected else ' '} {name}")
            if os.path.islink(args.xray_config) and not os.path.exists(args.xray_config):
                print(f"tun2xray: warning: {args.xray_config} is a dangling link to "
                      f"{os.readlink(args.xray_config)}", file=sys.stderr)
            return 0
        path = use_node(args.xray_config, args.name, args.nodes, args.xray_bin)
        print(f"{args.xray_config} -> {path}")
        if args.control:
            wait_switched(args.control, path, args.wait)
            print("switched")
        return 0
    except (NodeError, XrayError, InstanceError) as e:
        print(f"tun2xray: error: {e}", file=sys.stderr)
        return 2
