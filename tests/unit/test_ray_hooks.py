import subprocess
import sys

from pipeline.ray_hooks import POLL_CONSTANT, RAY_DATA_POLL_S

# In a fresh interpreter: the hook must not import Ray Data itself, and must set the poll once Ray Data is imported.
LAZY = f"""
import sys
from pipeline.ray_hooks import worker_setup
worker_setup()
assert "ray.data" not in sys.modules, "the hook imported Ray Data"
import ray.data
from ray.data._internal.execution import streaming_executor_state as state
print(state.{POLL_CONSTANT})
"""
# A process that imported Ray Data before the hook ran (a driver that built a Dataset first) gets the poll at once.
EAGER = f"""
from ray.data._internal.execution import streaming_executor_state as state
assert state.{POLL_CONSTANT} == 0.1, state.{POLL_CONSTANT}  # Ray 2.60's own
from pipeline.ray_hooks import worker_setup
worker_setup()
print(state.{POLL_CONSTANT})
"""


def poll_after(probe: str) -> float:
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


def test_the_worker_hook_sets_ray_datas_executor_poll_when_ray_data_is_imported_and_not_before():
    assert poll_after(LAZY) == RAY_DATA_POLL_S < 0.1


def test_the_worker_hook_sets_the_poll_of_a_ray_data_already_imported():
    assert poll_after(EAGER) == RAY_DATA_POLL_S
