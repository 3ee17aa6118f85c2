"""Node switching: node configs and the ``config.json`` link that selects one.

    /etc/tun2xray/config.json -> nodes/tokyo.json
    /etc/tun2xray/nodes/tokyo.json
    /etc/tun2xray/nodes/paris.json

Node configs are found wherever the link points: in the link target's
folder, in the link's own folder and in ``nodes/`` beside the link (or only
in ``--nodes DIR``).  A node config is a ``*.json`` file that reads as an Xray
config (the core's own JSON rules) with a non-empty ``outbounds`` list; the
link itself, hidden files (the runtime configs tun2xray writes,
``.NAME.tun2xray.json``) and other JSON (a tun2xray profile, say) are not
nodes.  A node's name is its file name without ``.json`` (``DIR/NAME`` when
two folders hold the same name).

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

import collections
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
            s.add_argument("name", help="a node, as `node list` shows it")
            s.add_argument("--xray-bin", help="core used to check the node's config "
                           "(default: xray, else v2ray, on PATH; skipped when none)")
            s.add_argument("--control", help="wait until the tun2xray serving unix:///path has switched")
            s.add_argument("--wait", type=float, default=20.0, help="seconds to wait with --control")
        s.add_argument("--xray-config", default=None,
                       help="the config.json link (default: the running tun2xray's, else "
                       f"{DEFAULT_CONFIG} or $TUN2XRAY_XRAY_CONFIG)")
        s.add_argument("--device", help="NAME: the tun2xray on that device, when several run")
        s.add_argument("--nodes", help="the folder of node configs (default: the link target's "
                       "folder, the link's folder and nodes/ beside the link)")


def search_dirs(config: str, nodes: str | None = None) -> list:
    """The folders that may hold node configs, in order, each once."""
    if nodes:
        return [os.path.abspath(nodes)]
    link = os.path.abspath(config)
    here = os.path.dirname(link)
    dirs = [os.path.dirname(os.path.realpath(link))] if os.path.islink(link) else []
    dirs += [here, os.path.join(here, "nodes")]
    out, seen = [], set()
    for d in dirs:
        key = os.path.realpath(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def node_problem(path: str) -> tuple | None:
    """None when ``path`` is a node config; else (unreadable, why): a file
    the core could not read either (unreadable=True: maybe a node with a
    typo), or JSON that is no node config."""
    from .. import xray
    try:
        cfg = xray.load_config(path)
    except xray.NotAnObjectError as e:
        return False, str(e)
    except xray.XrayConfigError as e:
        return True, str(e)
    outs = cfg.get("outbounds")
    if not (isinstance(outs, list) and outs and all(isinstance(o, dict) for o in outs)):
        return False, f"{path}: not an Xray node config (no outbounds)"
    return None


def _candidates(config: str, nodes: str | None) -> list:
    """[(dir, file name)] of every *.json that may be a node (not the link,
    not hidden, not a runtime config)."""
    from .config import RUNTIME_SUFFIX
    link = os.path.abspath(config)
    dirs = search_dirs(config, nodes)
    out = []
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            if nodes:
                raise NodeError(f"nodes folder {d}: No such file or directory") from None
            continue
        except OSError as e:
            raise NodeError(f"nodes folder {d}: {e.strerror}") from None
        for f in names:
            path = os.path.join(d, f)
            if (not f.endswith(".json") or f.startswith(".") or f.endswith(RUNTIME_SUFFIX)
                    or os.path.abspath(path) == link or not os.path.isfile(path)):
                continue
            out.append((d, f))
    return out


def scan(config: str, nodes: str | None = None) -> tuple:
    """([(name, path, selected)] sorted by name, [why a *.json was skipped])."""
    found, skipped = [], []
    for d, f in _candidates(config, nodes):
        path = os.path.join(d, f)
        problem = node_problem(path)
        if problem is None:
            found.append((d, f, path))
        elif problem[0]:
            skipped.append(problem[1])       # a node with a typo: say so, do not hide it
    if not found and not skipped:
        raise NodeError(f"no node configs in {', '.join(search_dirs(config, nodes))} "
                        f"(give the nodes folder with --nodes DIR)")
    stems = collections.Counter(f[:-5] for _, f, _ in found)
    here = os.path.dirname(os.path.abspath(config))
    current = os.path.realpath(config) if os.path.lexists(config) else None
    rows = []
    for d, f, path in found:
        name = f[:-5]
        if stems[name] > 1:
            name = os.path.relpath(os.path.join(d, name), here)
        rows.append((name, path, current is not None and os.path.realpath(path) == current))
    return sorted(rows), skipped


def list_nodes(config: str, nodes: str | None = None) -> list:
    """[(name, path, selected)] sorted by name."""
    return scan(config, nodes)[0]


def node_path(config: str, name: str, nodes: str | None = None) -> str:
    base = name.removesuffix(".json")
    rows, _ = scan(config, nodes)
    known = ", ".join(n for n, _, _ in rows) or "none"
    exact = [p for n, p, _ in rows if n == base]
    if exact:
        return exact[0]
    by_stem = [(n, p) for n, p, _ in rows if os.path.basename(p)[:-5] == base]
    if len(by_stem) == 1:
        return by_stem[0][1]
    if by_stem:
        raise NodeError(f'node "{name}" is in more than one folder: use one of '
                        f'{", ".join(n for n, _ in by_stem)}')
    for d, f in _candidates(config, nodes):
        if f[:-5] == base:          # there, but not a usable node: say why
            problem = node_problem(os.path.join(d, f))
            raise NodeError(problem[1] if problem else f'node "{name}"')
    if os.sep in base or base.startswith("."):
        raise NodeError(f'node "{name}": a node is a file name that `node list` shows (nodes: {known})')
    raise NodeError(f'no node "{name}" in {", ".join(search_dirs(config, nodes))} (nodes: {known})')


def check_node(path: str, binary: str | None = None) -> None:
    """Our reader must find a usable setup; the core (when installed) must accept it."""
    from .. import xray
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
                        f"{search_dirs(config, nodes)[-1]} first (it is never overwritten)")
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
    from ..control import query
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
    from ..control import query
    from ..instance import find_instance
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
    from ..instance import InstanceError
    from .errors import XrayError
    try:
        args.xray_config, control = running_link(args)
        if args.node_command == "use":
            args.control = control
        if args.node_command == "list":
            rows, skipped = scan(args.xray_config, args.nodes)
            for name, path, selected in rows:
                print(f"{'*' if selected else ' '} {name}")
            for why in skipped:
                print(f"tun2xray: warning: skipped {why}", file=sys.stderr)
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
