"""`tun2xray node list/use`: the config.json link over a folder of nodes
(with the real core's -test when one is installed)."""

import json
import os
import subprocess
import sys

import pytest

from tun2xray.xray import nodes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def node(port=10808):
    return ("// a node\n" + json.dumps({
        "inbounds": [{"listen": "127.0.0.1", "port": port, "protocol": "socks",
                      "settings": {"auth": "noauth", "udp": True}}],
        "outbounds": [{"protocol": "freedom"}]}))


@pytest.fixture
def tree(tmp_path):
    d = tmp_path / "nodes"
    d.mkdir()
    (d / "tokyo.json").write_text(node(10808))
    (d / "paris.json").write_text(node(10809))
    (d / "broken.json").write_text(json.dumps({"inbounds": [{"port": 1, "protocol": "nosuch"}],
                                               "outbounds": [{"protocol": "freedom"}]}))
    (d / "notes.txt").write_text("not a node")
    link = tmp_path / "config.json"
    os.symlink("nodes/tokyo.json", link)
    return tmp_path, str(link)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tun2xray", "node", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_list_marks_the_selected_node(tree):
    _, link = tree
    assert [(n, s) for n, _, s in nodes.list_nodes(link)] == [
        ("broken", False), ("paris", False), ("tokyo", True)]
    r = cli("list", "--xray-config", link)
    assert r.returncode == 0 and r.stdout.splitlines() == ["  broken", "  paris", "* tokyo"]


def test_use_repoints_the_link_atomically(tree):
    root, link = tree
    before = os.stat(root / "nodes" / "tokyo.json").st_mtime_ns
    r = cli("use", "paris", "--xray-config", link)
    assert r.returncode == 0, r.stderr
    assert os.readlink(link) == os.path.join("nodes", "paris.json")     # relative: the tree can move
    assert os.stat(root / "nodes" / "tokyo.json").st_mtime_ns == before
    assert sorted(os.listdir(root)) == ["config.json", "nodes"]          # no temporary link left


@pytest.mark.parametrize("name, needle", [
    ("nowhere", 'no node "nowhere"'),
    ("../config", "a node is a file name"),
    ("broken", "nosuch"),                 # the core's own -test reason
])
def test_use_bad_node_is_one_line_and_keeps_the_link(tree, name, needle):
    _, link = tree
    r = cli("use", name, "--xray-config", link)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("tun2xray: error:")
    assert needle in lines[0], lines[0]
    assert os.readlink(link) == "nodes/tokyo.json"


def test_regular_file_is_never_overwritten(tmp_path):
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes" / "a.json").write_text(node())
    cfg = tmp_path / "config.json"
    cfg.write_text(node(1234))
    with pytest.raises(nodes.NodeError, match="regular file, not a link"):
        nodes.use_node(str(cfg), "a")
    assert cfg.read_text() == node(1234)


def test_dangling_link_lists_nodes_and_warns(tree):
    root, link = tree
    os.unlink(link)
    os.symlink("nodes/gone.json", link)
    r = cli("list", "--xray-config", link)
    assert r.returncode == 0 and "* " not in r.stdout
    assert "dangling link to nodes/gone.json" in r.stderr
    # use repairs it
    assert cli("use", "tokyo", "--xray-config", link).returncode == 0
    assert os.path.exists(link)


def test_missing_nodes_folder(tmp_path):
    r = cli("list", "--xray-config", str(tmp_path / "config.json"))
    assert r.returncode == 2 and "nodes folder" in r.stderr and len(r.stderr.splitlines()) == 1


def test_wait_switched_times_out_without_a_runner(tree, tmp_path):
    with pytest.raises(nodes.NodeError, match="did not switch within 0.3s"):
        nodes.wait_switched(f"unix://{tmp_path}/none.sock", str(tree[0] / "nodes" / "paris.json"), 0.3)


# --- where the nodes are: wherever the link points -----------------------------

def listed(link, *extra):
    r = cli("list", "--xray-config", str(link), *extra)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines(), r.stderr


def test_link_into_a_nodes_folder_elsewhere(tmp_path):
    (tmp_path / "nodes").mkdir()
    (tmp_path / "conf").mkdir()
    for name, port in (("a", 10808), ("b", 10809)):
        (tmp_path / "nodes" / f"{name}.json").write_text(node(port))
    link = tmp_path / "conf" / "config.json"
    os.symlink("../nodes/a.json", link)
    (tmp_path / "conf" / "profile.json").write_text(json.dumps({"proxy": "socks5://127.0.0.1:1"}))
    assert listed(link) == (["* a", "  b"], "")
    r = cli("use", "b", "--xray-config", str(link))
    assert r.returncode == 0, r.stderr
    assert os.readlink(link) == "../nodes/b.json"
    assert sorted(os.listdir(tmp_path / "conf")) == ["config.json", "profile.json"]


def test_nodes_beside_the_link_not_the_link_a_runtime_config_or_other_json(tmp_path):
    from tun2xray import xray
    (tmp_path / "a.json").write_text(node(10808))
    (tmp_path / "b.json").write_text(node(10809))
    # c has no socks inbound: deriving it writes a runtime config beside the link
    (tmp_path / "c.json").write_text(json.dumps({"outbounds": [{"protocol": "freedom"}]}))
    (tmp_path / "profile.json").write_text(json.dumps({"proxy": "socks5://127.0.0.1:10808"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    link = tmp_path / "config.json"
    os.symlink("c.json", link)
    d = xray.derive(str(link))
    assert os.path.dirname(d.runtime_path) == str(tmp_path)
    assert listed(link) == (["  a", "  b", "* c"], "")
    r = cli("use", "a", "--xray-config", str(link))
    assert r.returncode == 0, r.stderr
    assert os.readlink(link) == "a.json"
    for name, needle in (("config", 'no node "config"'), ("profile", "not an Xray node config"),
                         (".config.tun2xray", 'a node is a file name that `node list` shows')):
        r = cli("use", name, "--xray-config", str(link))
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert os.readlink(link) == "a.json"


def test_nodes_option_names_the_folder(tree, tmp_path_factory):
    root, link = tree
    other = tmp_path_factory.mktemp("elsewhere")
    (other / "x.json").write_text(node(10810))
    (other / "y.json").write_text(node(10811))
    assert listed(link, "--nodes", str(other)) == (["  x", "  y"], "")
    r = cli("use", "y", "--xray-config", link, "--nodes", str(other))
    assert r.returncode == 0, r.stderr
    assert os.path.realpath(link) == str(other / "y.json")
    assert listed(link, "--nodes", str(other)) == (["  x", "* y"], "")
    r = cli("list", "--xray-config", link, "--nodes", str(root / "nope"))
    assert r.returncode == 2 and "nodes folder" in r.stderr and "nope" in r.stderr


def test_a_node_with_a_typo_is_named_not_hidden(tree):
    root, link = tree
    (root / "nodes" / "typo.json").write_text('{\n "outbounds": [\n  {"protocol": "freedom"},\n ]\n}')
    rows, err = listed(link)
    assert rows == ["  broken", "  paris", "* tokyo"]
    assert err.strip() == (f"tun2xray: warning: skipped {root}/nodes/typo.json: line 3 column 26: "
                           f"trailing comma before ']' (Xray and v2ray reject it)")
    r = cli("use", "typo", "--xray-config", link)
    assert r.returncode == 2 and "typo.json: line 3 column 26: trailing comma" in r.stderr
    assert os.readlink(link) == "nodes/tokyo.json"


def test_same_name_in_two_folders(tree):
    root, link = tree
    (root / "paris.json").write_text(node(10812))
    rows, _ = listed(link)
    assert rows == ["  broken", "  nodes/paris", "  paris", "* tokyo"]
    r = cli("use", "paris", "--xray-config", link)
    assert r.returncode == 0 and os.readlink(link) == "paris.json", r.stderr
    r = cli("use", "nodes/paris", "--xray-config", link)
    assert r.returncode == 0 and os.readlink(link) == "nodes/paris.json", r.stderr
