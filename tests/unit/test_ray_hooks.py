import subprocess
import sys

from pipeline.ray_hooks import POLL_CONSTANT, RAY_DATA_POLL_S

# In a fresh interpreter: the hook must not import Ray Data itself, and must set the poll once Ray Data is imported.
PROBE = f"""
import sys
from pipeline.ray_hooks import worker_setup
worker_setup()
assert "ray.data" not in sys.modules, "the hook imported Ray Data"
import ray.data
from ray.data._internal.execution import streaming_executor_state as state
print(state.{POLL_CONSTANT})
"""


def test_the_worker_hook_sets_ray_datas_executor_poll_when_ray_data_is_imported_and_not_before():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) == RAY_DATA_POLL_S < 0.1  # Ray 2.60's own: 0.1 s

