"""The loopback watch used by the integration tests must be able to fail."""

import os
import socket
import subprocess
import sys
import time

import psutil

from netwatch import LoopbackWatch, is_loopback


def test_loopback_addresses_are_recognised_in_every_spelling():
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.5") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.2")


def test_a_wildcard_listener_in_a_child_is_a_violation():
    child = subprocess.Popen([sys.executable, "-c",
                              "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); time.sleep(30)"])
    try:
        time.sleep(1.0)
        watch = LoopbackWatch(child.pid)
        watch.sample()
        assert any("0.0.0.0" in v for v in watch.violations), watch.violations
        allowed = LoopbackWatch(child.pid, wildcard_listeners_allowed=("python",))
        allowed.sample()
        assert not allowed.violations and allowed.wildcard_listeners
    finally:
        child.kill()


def test_a_listener_counts_once_when_its_process_retitles_itself():
    # Ray workers retitle themselves per task (ray::RayTrainWorker, ray::RayTrainWorker.poll_status):
    # one socket must stay one allowed listener, not one per title.
    child = subprocess.Popen([sys.executable, "-c",
                              "import socket, sys; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen();"
                              "print('bound', flush=True); sys.stdin.readline();"
                              "open('/proc/self/comm', 'w').write('pyretitled');"
                              "print('retitled', flush=True); sys.stdin.readline()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        watch = LoopbackWatch(child.pid, wildcard_listeners_allowed=("py",))
        assert child.stdout.readline() == "bound\n"
        watch.sample()
        names_seen = {psutil.Process(child.pid).name()}
        child.stdin.write("\n"); child.stdin.flush()
        assert child.stdout.readline() == "retitled\n"
        watch.sample()
        names_seen.add(psutil.Process(child.pid).name())
        assert len(names_seen) == 2, names_seen  # the watch did see two titles
        assert not watch.violations and len(watch.wildcard_listeners) == 1, watch.wildcard_listeners
    finally:
        child.kill()


def test_an_allowed_name_matches_when_the_kernel_has_cut_it_to_15_characters():
    watch = LoopbackWatch(os.getpid(), wildcard_listeners_allowed=("ray::RayTrainWorker",))
    assert watch._is_allowed("ray::RayTrainWorker.run") and watch._is_allowed("ray::RayTrainWo")
    assert not watch._is_allowed("ray::RayTrainXx") and not watch._is_allowed("ray::RayTrain") and not watch._is_allowed("python")


def test_a_loopback_listener_is_fine():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        watch = LoopbackWatch(os.getpid())
        watch.sample()
        assert watch.sockets_seen >= 1 and not watch.violations
    finally:
        server.close()


def test_a_network_of_the_tests_own_is_allowed_and_no_other():
    watch = LoopbackWatch(os.getpid(), networks=("10.213.77.0/24",))
    assert watch._ok("10.213.77.1") and watch._ok("10.213.77.254") and watch._ok("127.0.0.1")
    assert not watch._ok("10.213.78.1") and not watch._ok("192.0.2.2") and not watch._ok("0.0.0.0")
    assert not LoopbackWatch(os.getpid())._ok("10.213.77.1")


def test_sockets_in_another_network_namespace_are_seen():
    # A pod's processes live in a network namespace of their own, whose sockets are not in the
    # watcher's /proc/net tables: the watch reads that process's own tables.
    child = subprocess.Popen(["unshare", "--net", sys.executable, "-c",
                              "import socket, sys; l = socket.socket(); l.bind(('0.0.0.0', 4321)); l.listen();"
                              "t = socket.socket(); t.bind(('127.0.0.1', 4322)); t.listen();"
                              "print('bound', flush=True); sys.stdin.readline()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "bound\n"
        pid = next(p.pid for p in [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
                   if p.name().startswith("python"))
        watch = LoopbackWatch(pid)
        watch.sample()
        assert watch.sockets_seen == 2, watch.sockets_seen
        assert [v for v in watch.violations if ":4321 -> LISTEN" in v] and not [v for v in watch.violations if "4322" in v]
        pod_network = LoopbackWatch(pid, networks=("10.213.77.0/24",))
        pod_network.sample()
        assert pod_network.sockets_seen == 2 and not pod_network.violations
    finally:
        child.kill()
