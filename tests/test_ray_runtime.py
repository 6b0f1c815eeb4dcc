"""A local Ray instance started by dermray works beside another Ray instance on the same machine.

Ray Train's placement-group cleaner asks Ray's state API whether a run's controller is alive, and the state API
finds "the" dashboard by scanning the machine's processes: with two Ray instances it raised, the cleaner died, an
ASHA-stopped trial's workers kept their CPUs, and the next trial of the sweep waited forever for Ray Data."""

import os
import subprocess
import sys

from tests.cluster_helpers import kill_matching

STATE_API_FROM_A_TASK = """
import ray
from dermray.ray_runtime import ensure_ray

ensure_ray()

@ray.remote
def dashboard_seen_from_a_worker():
    # What Ray Train's PlacementGroupCleaner does, inside a worker process of this instance.
    from ray.util.state import list_actors
    return ray.get_runtime_context().get_job_id(), len(list_actors())

print(ray.get(dashboard_seen_from_a_worker.remote()))
"""

UNPINNED = STATE_API_FROM_A_TASK.replace(
    "from dermray.ray_runtime import ensure_ray\n\nensure_ray()",
    "ray.init(include_dashboard=True, logging_level='WARNING')")


def _run_beside(code: str, temp_dir: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_TMPDIR=temp_dir)
    env.pop("RAY_ADDRESS", None)
    try:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    finally:
        kill_matching([temp_dir])


def test_workers_of_a_second_local_instance_reach_its_own_dashboard(ray_local):
    # ray_local is the first instance on this machine; the subprocess starts the second.
    result = _run_beside(STATE_API_FROM_A_TASK, f"/tmp/drr-{os.getpid()}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Found multiple active Ray instances" not in result.stderr


def test_without_the_pinned_address_the_state_api_fails_beside_another_instance(ray_local):
    """The failure the pinned address prevents, shown with a bare ray.init: if Ray ever stops guessing, this
    test fails and the workaround in dermray.ray_runtime can go."""
    result = _run_beside(UNPINNED, f"/tmp/drr-bare-{os.getpid()}")
    assert result.returncode != 0
    assert "Found multiple active Ray instances" in result.stderr
