"""Versioned weight sync from the policy learner to the rollout engines.

One entry point, `broadcast_weights(named_tensors, version, rollout_actors)`, with the transport chosen by where
the tensors live:
- CPU: the update goes once into the Ray object store and every rollout actor reloads it in place
  (vLLM's `reload_weights` via the rollout's `WeightSyncExtension`, or `load_state_dict` for the HF backend).
- GPU: vLLM's NCCL weight-transfer engine broadcasts straight from the learner's GPU into the engines' GPUs
  (vLLM 0.32's `NCCLTrainerWeightTransferEngine`; its status is in docs/gpu.md).

Every update carries a version; rollouts report the version that produced them, so the learner can tell
on-policy samples from stale ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import ray
import torch

from pipeline.types import WeightUpdate

Tensor = torch.Tensor


class WeightBoard:
    """Where restarted workers catch up (a Ray actor of the RL stage). It holds the newest weight update (a ref,
    one copy in the object store): a rollout worker that Ray restarted after a crash loads it before it samples
    again. Every worker signs in when it sets up, so sign-ins beyond the first per worker count restarts."""

    def __init__(self):
        self._latest: list = []  # [ObjectRef[WeightUpdate]]: in a list, so Ray passes the ref, not the value
        self._sign_ins = 0

    def publish(self, update: list) -> None:
        self._latest = update

    def latest(self) -> list:
        return self._latest

    def sign_in(self) -> None:
        self._sign_ins += 1

    def sign_ins(self) -> int:
        return self._sign_ins


def broadcast_weights(
    named_tensors: dict[str, Tensor] | Sequence[tuple[str, Tensor]],
    version: int,
    rollout_actors: Sequence[Any],
    board: Any = None,
    adapter: dict[str, Any] | None = None,
) -> float:
    """Load `named_tensors` (HF names; a dict or the (name, tensor) pairs `gather_weights` returns) as weight
    version `version` into every rollout actor (`RolloutWorker` Ray actor handles); returns the seconds spent.
    Blocks until every actor has the new weights. `board` (a WeightBoard actor) gets the update first, for
    workers restarted later (CPU path only). `adapter`: a LoRA adapter's peft config, when the tensors are that
    adapter's (peft names) for engines serving it on their base weights; small, so always through the object store."""
    start = time.perf_counter()
    named_tensors = dict(named_tensors)
    on_gpu = any(t.is_cuda for t in named_tensors.values())
    if on_gpu and adapter is None:
        _broadcast_nccl(named_tensors, version, rollout_actors)
    else:
        _broadcast_object_store(named_tensors, version, rollout_actors, board, adapter)
    return time.perf_counter() - start


def _broadcast_object_store(
    named_tensors: dict[str, Tensor], version: int, rollout_actors: Sequence[Any], board: Any, adapter: dict | None
) -> None:
    tensors = {name: t.detach().cpu().contiguous() for name, t in named_tensors.items()}
    update = WeightUpdate(version, tensors, adapter)
    ref = ray.put(update)  # one copy in the object store, read by every actor
    if board is not None:
        ray.get(board.publish.remote([ref]))
    ray.get([actor.load_weights.remote(ref) for actor in rollout_actors])


# ---- GPU transport: vLLM's NCCL weight-transfer engine (docs/gpu.md). ----

# The NCCL group between this learner process (rank 0) and the engines' GPU workers is built once and reused
# by every later sync; keyed by the actors so a new set of rollout actors gets its own group.
_NCCL_SENDERS: dict[tuple[str, ...], tuple[Any, _RolloutClient, _NamedTensorSource]] = {}


def _broadcast_nccl(named_tensors: dict[str, Tensor], version: int, rollout_actors: Sequence[Any]) -> None:
    """NCCL broadcast from this process's GPU into every engine's GPU workers.

    Must run in the process that holds the CUDA tensors (learner rank 0); the engines must have been started
    with `weight_transfer_config=nccl` (RolloutWorker does this on GPU). Per sync, vLLM's trainer engine calls
    `start_weight_update`, then `update_weights` on the actors concurrently with its own broadcast, then
    `finish_weight_update`; the actors' methods of those names forward to their vLLM workers."""
    key = tuple(actor._actor_id.hex() for actor in rollout_actors)
    if key not in _NCCL_SENDERS:
        _NCCL_SENDERS[key] = _init_nccl_sender(rollout_actors)
    sender, client, source = _NCCL_SENDERS[key]
    client.version = version
    source.named_tensors = named_tensors
    sender.send_weights()


def _init_nccl_sender(rollout_actors: Sequence[Any]):
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine
    from vllm.utils.network_utils import get_ip, get_open_port

    engine_sizes = ray.get([actor.engine_world_size.remote() for actor in rollout_actors])
    client = _RolloutClient(rollout_actors, engine_sizes)
    source = _NamedTensorSource()
    init_info = NCCLTrainerInitInfo(
        master_address=get_ip(), master_port=get_open_port(), world_size=1 + sum(engine_sizes), rank=0
    )
    sender = NCCLTrainerWeightTransferEngine.trainer_init(init_info, client=client, source=source)
    return sender, client, source


class _RolloutClient:
    """vLLM's `VLLMWeightSyncClient` protocol over RolloutWorker actors. Unlike vLLM's own Ray client, it gives
    each engine its own NCCL rank offset: independent engines would otherwise all claim ranks 1..tp."""

    def __init__(self, rollout_actors: Sequence[Any], engine_sizes: list[int]):
        self.actors = list(rollout_actors)
        self.offsets = [1 + sum(engine_sizes[:i]) for i in range(len(engine_sizes))]  # rank 0 is the learner
        self.version = 0  # set before each send; handed to the actors when the update finishes

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        calls = [
            a.init_weight_transfer.remote({**init_info, "rank_offset": o})
            for a, o in zip(self.actors, self.offsets, strict=True)
        ]
        ray.get(calls)

    def start_weight_update(self) -> None:
        ray.get([a.start_weight_update.remote() for a in self.actors])

    def update_weights(self, update_info: dict[str, Any]) -> None:
        ray.get([a.update_weights.remote(update_info) for a in self.actors])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        ray.get([a.finish_weight_update.remote(self.version) for a in self.actors])


class _NamedTensorSource:
    """vLLM's `WeightSource` protocol (metadata and iteration, in the same order) over one sync's tensors;
    `_broadcast_nccl` swaps in each sync's tensors, since the trainer engine holds one source for its life."""

    def __init__(self):
        self.named_tensors: dict[str, Tensor] = {}

    def metadata(self) -> list:
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.named_tensors.items()]

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        return ((name, t.detach()) for name, t in self.named_tensors.items())
