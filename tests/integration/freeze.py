"""Stop some threads of a process and let the rest run on: a worker alive but stuck.

SIGSTOP stops a whole process, heartbeat threads included, and TensorFlow notices that within
seconds. A hung GPU or kernel is different: the step never ends while every other thread (the
heartbeats, Ray's health checks) answers. Stopping just the compute threads with ptrace
(seize, then interrupt: the Linux way to stop one thread) makes that happen for real.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager

PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
WALL = 0x40000000  # __WALL: wait for threads, not only processes

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def threads_named(pid: int, name: str) -> list[int]:
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                if comm.read().strip() == name:
                    found.append(int(tid))
        except OSError:
            pass  # the thread ended meanwhile
    return found


@contextmanager
def frozen_threads(pid: int, name: str):
    """Stop the threads of `pid` called `name` until the block ends; yields their ids.

    Call it from one thread: ptrace answers only the thread that attached."""
    tids = threads_named(pid, name)
    if not tids:
        raise RuntimeError(f"process {pid} has no thread called {name!r}")
    stopped = []
    try:
        for tid in tids:
            _ptrace(PTRACE_SEIZE, tid)
            stopped.append(tid)
            _ptrace(PTRACE_INTERRUPT, tid)
            os.waitpid(tid, WALL)  # until it has stopped
        yield tids
    finally:
        for tid in stopped:
            _libc.ptrace(PTRACE_DETACH, tid, None, None)  # fails for a thread that has died: fine
            try:
                os.waitpid(tid, WALL | os.WNOHANG)  # reap it if it has
            except ChildProcessError:
                pass


def _ptrace(request: int, tid: int) -> None:
    if _libc.ptrace(request, tid, None, None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"ptrace({request:#x}) of thread {tid}: {os.strerror(error)}")
