"""The thread policy (issue 17): one torch thread, single-threaded workers up to the CPUs allowed,
the user's OMP_NUM_THREADS / GESIM_THREADS respected, the cgroup quota read."""

import os

import numpy as np
import pytest

from gesim import threads
from gesim.errors import GesimError


def _cgroup(tmp_path, text):
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def test_cgroup_v2_quota_is_read(tmp_path):
    assert threads.cpu_quota(_cgroup(tmp_path, "150000 100000\n")) == 1.5
    assert threads.cpu_quota(_cgroup(tmp_path, "max 100000\n")) is None


def test_cgroup_v1_quota_is_read(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cpu_quota(tmp_path) == 0.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert threads.cpu_quota(tmp_path) is None


def test_the_process_own_cgroup_quota_is_read(tmp_path):
    """A quota set on this process's cgroup (from /proc/self/cgroup), not at the mount's root."""
    (tmp_path / "box" / "job").mkdir(parents=True)
    (tmp_path / "box" / "job" / "cpu.max").write_text("120000 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/box/job\n")
    assert threads.cpu_quota(tmp_path, proc) == 1.2
    (tmp_path / "cpu.max").write_text("max 100000\n")  # unlimited at the root: the own quota still wins
    assert threads.cpu_quota(tmp_path, proc) == 1.2
    (tmp_path / "cpu" / "grp").mkdir(parents=True)  # v1, hybrid hierarchy
    (tmp_path / "cpu" / "grp" / "cpu.cfs_quota_us").write_text("80000\n")
    (tmp_path / "cpu" / "grp" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("1:cpu,cpuacct:/grp\n0::/\n")
    assert threads.cpu_quota(tmp_path, proc) == 0.8


def test_available_cpus_is_the_smaller_of_affinity_and_rounded_up_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert threads.available_cpus(_cgroup(tmp_path, "max 100000")) == affinity
    assert threads.available_cpus(_cgroup(tmp_path, "50000 100000")) == 1  # half a CPU: one worker
    assert threads.available_cpus(_cgroup(tmp_path, "100001 100000")) == min(affinity, 2)
    assert threads.available_cpus(tmp_path / "missing") == affinity


def test_the_users_environment_wins(tmp_path):
    root = _cgroup(tmp_path, "400000 100000")
    assert threads.env_threads({}) is None
    assert threads.env_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert threads.env_threads({"OMP_NUM_THREADS": "3", "GESIM_THREADS": "2"}) == 2
    assert threads.env_threads({"MKL_NUM_THREADS": "5"}) == 5
    assert threads.torch_threads({}) == 1 and threads.torch_threads({"OMP_NUM_THREADS": "4"}) == 4
    assert threads.workers(10, {"OMP_NUM_THREADS": "3"}, root) == 3
    assert threads.workers(2, {"OMP_NUM_THREADS": "3"}, root) == 2  # never more than the tasks
    assert threads.workers(10, {}, root) == min(len(os.sched_getaffinity(0)), 4)
    with pytest.raises(GesimError, match="OMP_NUM_THREADS must be a positive integer"):
        threads.env_threads({"OMP_NUM_THREADS": "many"})
    with pytest.raises(GesimError, match="GESIM_THREADS"):
        threads.env_threads({"GESIM_THREADS": "0"})


def test_configure_writes_one_thread_but_keeps_workers_free(tmp_path):
    """configure() sets one torch thread through the environment (marked as its own), so that
    the workers still count the CPUs, and never overrides a user's choice."""
    env = {}
    assert threads.configure(env) == 1
    assert env["OMP_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "PASSIVE" and env[threads.AUTO]
    assert threads.env_threads(env) is None
    root = _cgroup(tmp_path, "200000 100000")
    assert threads.workers(8, env, root) == min(len(os.sched_getaffinity(0)), 2)
    user = {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.configure(user) == 2
    assert user == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}


def test_configure_sets_torch_threads_when_torch_is_loaded():
    import torch

    before = torch.get_num_threads()
    try:
        assert threads.configure({}) == 1 and torch.get_num_threads() == 1
        with threads.single():
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_simulator_numbers_do_not_depend_on_the_worker_count():
    from gesim.simulate import FIELDS, SimConfig, simulate

    cfg = SimConfig(instances=40, steps=2, vocab=24, dim=8, suffix=4, chunk=20)
    runs = [simulate(cfg, workers=w).arrays for w in (1, 2, 3)]
    for other in runs[1:]:
        for key in FIELDS:
            np.testing.assert_array_equal(runs[0][key], other[key], err_msg=key)
