"""Shared test setup: offline data, one thread per process, no stray downloads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Set before datasets / huggingface_hub are imported anywhere in the test session.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture
def task_identity():
    """Messages built outside a running Flower app need a task identity (set here, restored after)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="session", autouse=True)
def _one_ray_instance_per_session():
    """Keep the Ray instance the first ``run_simulation`` starts until the session ends.

    Flower's Ray backend starts Ray for every simulation and shuts it down after it (about 5.5 s on 2 cores, and
    this suite runs over twenty simulations). Each simulation still builds and terminates its own actor pool, on
    the real engine; only the Ray instance under it is shared. Its temp dir is short (socket paths are limited in
    length) and removed at the end.
    """
    import ray

    temp_dir = Path("/tmp") / f"rays{os.getpid()}"
    real_init, real_shutdown = ray.init, ray.shutdown

    def init(*args, **kwargs):
        kwargs.setdefault("_temp_dir", str(temp_dir))
        return real_init(*args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(ray, "init", init)
    patch.setattr(ray, "shutdown", lambda *args, **kwargs: None)
    try:
        yield
    finally:
        patch.undo()
        if ray.is_initialized():
            real_shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
