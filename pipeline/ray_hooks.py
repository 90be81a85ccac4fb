"""Process set-up for a raylign job: run in the driver by `pipeline.run.start_ray` and in every Ray worker process
as `runtime_env["worker_process_setup_hook"]` (local runs and `raylign submit` jobs).

Ray Data's streaming executor (Ray 2.60) polls its running tasks with `ray.wait` for *all* of them, up to
`WAIT_FOR_TASK_COMPLETION_TIMEOUT_S` = 0.1 s. The RL stage's experience stream keeps one read task blocked on its
Feed for the whole stage, so every pass of that loop waits the full 0.1 s, and a chunk needs about three passes
from the Feed to a learner (read -> fused map -> output split). Measured on the bench's tiny GRPO step (2 cores):
0.12 s from the driver's put to the start of generation and 0.30 s from the end of the advantages to the learner
taking the chunk; with the poll at 0.02 s, 0.04 s and 0.07 s. A shorter poll costs CPU in the process that runs
the executor (more passes of its loop); 0.01 s measured no better than 0.02 s on that step."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType

RAY_DATA_POLL_S = 0.02
EXECUTOR_STATE = "ray.data._internal.execution.streaming_executor_state"
POLL_CONSTANT = "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S"


def worker_setup() -> None:
    """`worker_process_setup_hook`: shorten Ray Data's executor poll in this process, lazily (most workers never
    import Ray Data, and importing it costs ~0.5 s of CPU)."""
    module = sys.modules.get(EXECUTOR_STATE)
    if module is not None:
        set_poll(module)
    else:
        sys.meta_path.insert(0, _SetPollOnImport())


def set_poll(module: ModuleType) -> None:
    if hasattr(module, POLL_CONSTANT):  # a Ray without the constant keeps its own behaviour
        setattr(module, POLL_CONSTANT, RAY_DATA_POLL_S)


# The hook as Ray's runtime_env names it (`pipeline.run.start_ray`, `pipeline.submit.runtime_env`).
WORKER_SETUP = f"{worker_setup.__module__}.{worker_setup.__qualname__}"


class _SetPollOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when the executor-state module is first imported, it lets the normal finders locate
    it and sets the poll right after the module body runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != EXECUTOR_STATE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_set(module: ModuleType) -> None:
            exec_module(module)
            set_poll(module)

        spec.loader.exec_module = exec_and_set
        return spec
