"""Process selection from /proc: by listening port, by executable, per netns."""

import os
import socket
import subprocess
import sys

import pytest

from obi import config, discovery

LISTENER = """
import socket, sys, time
s = socket.socket(socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET)
s.bind(("::" if sys.argv[1] == "6" else "127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True)
time.sleep(60)
"""


@pytest.fixture(params=["4", "6"])
def listener(request):
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, request.param], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    yield proc.pid, port
    proc.kill()
    proc.wait()


def test_selected_by_listening_port(listener):
    pid, port = listener
    cfg = config.load(env={"OTEL_EBPF_OPEN_PORT": str(port)})
    sel = discovery.scan(cfg, discovery.netns_inode("/proc/self/ns/net"))
    assert sel.pids == {pid} and sel.ports == {port} and sel.port_pid == {port: pid}
    assert sel.exes[pid] == os.path.realpath(sys.executable)


def test_not_selected_on_other_ports_or_other_netns(listener):
    pid, port = listener
    other = config.load(env={"OTEL_EBPF_OPEN_PORT": str(port + 1 if port < 65535 else port - 1)})
    assert pid not in discovery.scan(other, discovery.netns_inode("/proc/self/ns/net")).pids
    same = config.load(env={"OTEL_EBPF_OPEN_PORT": str(port)})
    assert discovery.scan(same, netns_ino=-1).pids == set()  # no process lives in that netns


def test_selected_by_executable(listener):
    pid, port = listener
    cfg = config.load(env={"OTEL_EBPF_AUTO_TARGET_EXE": os.path.realpath(sys.executable)})
    sel = discovery.scan(cfg, discovery.netns_inode("/proc/self/ns/net"), skip_pid=os.getpid())
    assert pid in sel.pids and port in sel.ports  # every port of a process picked by name


def test_socket_inodes_and_tcp_table():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        table = discovery.tcp_table(listening=True)
        inode = table[(port, 0)]
        assert inode in discovery.socket_inodes(os.getpid())
        assert (port, 0) not in discovery.tcp_table(listening=False)
    assert discovery.socket_inodes(2**22 + 12345) == set()  # no such process
