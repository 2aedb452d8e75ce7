"""Runs checks in a gloo process group on 127.0.0.1, one spawned process per rank.

A check is a function `check(rank, world)` at the top level of a test module, named by its
module (e.g. `__name__` of the caller) and its name, so that the spawned processes can import
it. `spawn` returns once every rank has run every check; it fails the test when a rank raises
or when the ranks do not finish within the deadline."""
import datetime
import importlib
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GROUP_TIMEOUT_S = 60.0  # the process group's timeout of a collective
SPAWN_DEADLINE_S = 170.0  # the default time the ranks have to run every check


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_checks(rank, world, port, module, checks):
    """One rank: joins the group, runs the checks in order with a barrier after each."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        functions = importlib.import_module(module)
        for name in checks:
            getattr(functions, name)(rank, world)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world, module, checks, deadline_s=SPAWN_DEADLINE_S):
    """Runs the checks (names of functions of `module`) on `world` ranks; a rank's exception
    is raised here, and the processes are killed and the test failed after `deadline_s`."""
    context = mp.spawn(_run_checks, args=(world, free_port(), module, checks), nprocs=world,
                       join=False)
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"world size {world}: the processes did not finish in {deadline_s} s")
