"""`tun2xray node list/use`: the config.json link over a folder of nodes
(with the real core's -test when one is installed)."""

import json
import os
import subprocess
import sys

import pytest

from tun2xray import nodes

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
    (d / "broken.json").write_text(json.dumps({"inbounds": [{"port": 1, "protocol": "nosuch"}]}))
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
