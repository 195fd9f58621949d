"""Disaggregated placement (`parallel.rollout_ranks: K`): the engine on a rank of its own.

The torchrun job's last K ranks only generate; the first K only train, and trainer rank i streams
from rollout rank i. A trainer rank holds a `RemoteEngine` where a colocated one holds its engine,
so the asynchronous trainer (`training.async_rollout`) runs unchanged: its driver thread steps a
`RemoteStream`, whose decoding happens on the rollout rank, while the actor trains. The rollout
rank runs `serve`: its engine, the engine's own stream (`rollout.streaming.open_stream`, continuous
batching) decoding in a thread of its own, and a loop answering its trainer.

The wire (`platform.rollout_channels`):
- the pair's `link` (gloo, 2 ranks) carries pickled requests and replies: submit, step (what
  finished since the last step, waiting up to `step_wait_s` for something), abort, clear_queue,
  hold / release (decoding parked between two steps while the trainer holds the stream: the
  colocated driver's pause), version, generate (evaluation), load, shutdown;
- the `weights` group (trainer rank 0 and every rollout rank; NCCL on GPU) carries the weights:
  after each version, trainer rank 0 broadcasts the bridge's Hugging Face-named tensors in buckets
  of `rollout.weight_sync.bucket_mb` (one header and one flat byte buffer each), and every rollout
  rank loads them into its engine in one `update_weights` stream, as a colocated sync does.

Faults: a peer that dies closes the link, and the next message on either side raises a one-line
`RolloutRankError` naming the rank (no hang); an error inside the rollout rank (its engine, its
stream) is sent back and raised on its trainer with the remote traceback's last line. Either way
the job stops and the same command resumes from the last complete checkpoint (in-flight
trajectories are discarded on resume, as in colocated async mode).

Scope: the rollout rank decodes only; grading and the tool agent's sandbox run on the trainer
rank (a trajectory waiting on tools has left the rollout rank's slots). The GPU path (NCCL weight
group, the engine on its own GPU) has not run on a GPU.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
import time
import traceback
from typing import Any, Iterable, Sequence

import torch

from megatron_spo import platform
from megatron_spo.errors import UserError
from megatron_spo.rollout.streaming import EngineStream, StreamRequest, StreamResult, open_stream
from megatron_spo.rollout.types import GenerationRequest, GenerationResult, RolloutEngine
from megatron_spo.rollout.weight_sync import WeightSyncConfig, iter_buckets

_ALIGN = 16  # bytes: every tensor of a weight bucket starts at a multiple, so it can be viewed in place


class RolloutRankError(UserError):
    """The other end of a disaggregated pair stopped (died, or failed inside)."""


class Link:
    """Framed pickles over a 2-rank gloo group; `peer_name` says who is at the other end."""

    def __init__(self, group, rank: int, peer_name: str):
        self.group, self.peer, self.peer_name = group, 1 - rank, peer_name

    def send(self, obj: Any) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        try:
            self.group.send([torch.tensor([data.numel()], dtype=torch.int64)], self.peer, 0).wait()
            self.group.send([data], self.peer, 1).wait()
        except RuntimeError as err:  # gloo: the peer closed the connection (died)
            self._wait_failed(err, self.peer_name)

    def recv(self) -> Any:
        size = torch.zeros(1, dtype=torch.int64)
        try:
            self.group.recv([size], self.peer, 0).wait()
            data = torch.empty(int(size[0]), dtype=torch.uint8)
            self.group.recv([data], self.peer, 1).wait()
        except RuntimeError as err:
            self._wait_failed(err, self.peer_name)
        return pickle.loads(data.numpy().tobytes())

    def _wait_failed(self, err: RuntimeError, what: str):
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RolloutRankError(f"{what} stopped ({reason}); the job stops: run the same command again to resume "
                               "from the last complete checkpoint") from None


# ---------------------------------------------------------------------------------- trainer side


class RemoteEngine(RolloutEngine):
    """The trainer rank's handle on its rollout rank's engine (see the module docstring). Calls
    are serialised: the async trainer's driver thread and main thread take turns."""

    spmd = False

    def __init__(self, channels, weight_sync: WeightSyncConfig | None = None):
        self.channels = channels
        self.link = Link(channels.link, channels.link_rank, f"rollout rank {channels.peer} (parallel.rollout_ranks)")
        self.bucket_bytes = int((weight_sync or WeightSyncConfig()).bucket_mb * 1e6)
        self._lock = threading.RLock()
        self._closed = False

    def call(self, op: str, arg: Any = None) -> Any:
        with self._lock:
            self._send((op, arg))
            return self._reply()

    def _send(self, message) -> None:
        try:
            self.link.send(message)
        except RolloutRankError:
            self._closed = True  # the rank is gone: nothing to shut down
            raise

    def _reply(self) -> Any:
        try:
            status, value = self.link.recv()
        except RolloutRankError:
            self._closed = True
            raise
        if status == "error":  # the rank failed inside and still serves
            raise RolloutRankError(f"{self.link.peer_name} failed: {value}")
        return value

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return self.call("generate", list(requests))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Trainer rank 0 broadcasts the buckets to every rollout rank; each trainer rank tells
        its own rollout rank to receive them (the others only drain the bridge's stream)."""
        with self._lock:
            self._send(("load", None))
            group = self.channels.weights
            if group is None:
                for _ in named_tensors:
                    pass
            else:
                try:
                    for bucket in iter_buckets(named_tensors, self.bucket_bytes):
                        _broadcast_bucket(group, bucket)
                    _broadcast_header(group, None)
                except RuntimeError as err:  # a rollout rank died mid-broadcast
                    self._closed = True
                    self.link._wait_failed(err, "the weight broadcast to the rollout ranks")
            self._reply()

    def open_stream(self, max_inflight: int) -> "RemoteStream":
        return RemoteStream(self, max_inflight)

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.call("shutdown")


class RemoteStream(EngineStream):
    """An `EngineStream` whose slots are on the rollout rank: requests travel at `submit`, each
    `step` returns what finished there since the last one (the rollout rank decodes meanwhile)."""

    def __init__(self, engine: RemoteEngine, max_inflight: int):
        self.engine = engine
        self._requests: dict[int, StreamRequest] = {}  # sent, not yet returned, by id
        self._ids = 0
        self._version = 0
        super().__init__(max_inflight)
        engine.call("open_stream", max_inflight)

    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, value: int) -> None:
        if value != self._version:
            self.engine.call("version", value)
        self._version = value

    def submit(self, requests: Sequence[StreamRequest]) -> None:
        self._check(requests)
        sent = []
        for request in requests:
            self._ids += 1
            self._requests[self._ids] = request
            sent.append((self._ids, request.prompt_token_ids, request.params))
        if sent:
            self.engine.call("submit", sent)

    @property
    def num_queued(self) -> int:
        return 0  # the rollout rank's queue and slots are one count here

    @property
    def num_inflight(self) -> int:
        return len(self._requests)

    def step(self) -> list[StreamResult]:
        finished, self.refills = self.engine.call("step")
        return [StreamResult(tag=self._requests.pop(i).tag, completion=c, token_versions=v) for i, c, v in finished]

    def abort(self) -> list[StreamRequest]:
        return [self._requests.pop(i) for i in self.engine.call("abort")]

    def clear_queue(self) -> list[StreamRequest]:
        return [self._requests.pop(i) for i in self.engine.call("clear_queue")]

    @contextlib.contextmanager
    def held(self):
        self.engine.call("hold")
        try:
            yield
        finally:
            self.engine.call("release")


# ---------------------------------------------------------------------------------- the weight wire


def _broadcast_header(group, header) -> Any:
    """Broadcast a picklable header from group rank 0; returns it on every rank."""
    device = platform.device()
    root = group.rank() == 0
    if root:
        data = torch.frombuffer(bytearray(pickle.dumps(header)), dtype=torch.uint8).to(device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    _broadcast(group, size)
    if not root:
        data = torch.empty(int(size[0]), dtype=torch.uint8, device=device)
    _broadcast(group, data)
    return header if root else pickle.loads(data.cpu().numpy().tobytes())


def _broadcast(group, tensor: torch.Tensor) -> None:
    options = torch.distributed.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def _broadcast_bucket(group, bucket: list[tuple[str, torch.Tensor]]) -> None:
    layout, offset = [], 0
    for name, tensor in bucket:
        nbytes = tensor.numel() * tensor.element_size()
        layout.append((name, tensor.dtype, tuple(tensor.shape), offset))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    _broadcast_header(group, (layout, offset))
    flat = torch.empty(offset, dtype=torch.uint8, device=platform.device())
    for (name, tensor), (_, _, _, start) in zip(bucket, layout):
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        flat[start:start + raw.numel()].copy_(raw)
    _broadcast(group, flat)


def _received_weights(group) -> Iterable[tuple[str, torch.Tensor]]:
    """The rollout rank's side of `RemoteEngine.update_weights`: bucket after bucket, lazily."""
    while True:
        header = _broadcast_header(group, None)
        if header is None:
            return
        layout, size = header
        flat = torch.empty(size, dtype=torch.uint8, device=platform.device())
        _broadcast(group, flat)
        for name, dtype, shape, start in layout:
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            yield name, flat[start:start + nbytes].view(dtype).view(shape)
        del flat


# ---------------------------------------------------------------------------------- rollout side


class RolloutServer:
    """The rollout rank: answers its trainer over the link while a thread decodes the stream."""

    def __init__(self, engine, channels, *, step_wait_s: float = 0.05):
        self.engine, self.channels, self.step_wait_s = engine, channels, step_wait_s
        self.link = Link(channels.link, channels.link_rank, f"trainer rank {channels.peer}")
        self.stream: EngineStream | None = None
        self._finished: list[StreamResult] = []
        self._cv = threading.Condition()
        self._holds = 0
        self._parked = True
        self._stop = False
        self._error: BaseException | None = None
        self._decoder: threading.Thread | None = None

    def serve(self) -> None:
        """Answer requests until the trainer's `shutdown` (or until it is gone: RolloutRankError)."""
        try:
            while True:
                op, arg = self.link.recv()
                try:
                    value = getattr(self, f"_op_{op}")(arg)
                except Exception as err:  # noqa: BLE001 - the trainer raises it, naming this rank
                    lines = traceback.format_exception_only(type(err), err)
                    self.link.send(("error", lines[-1].strip()))
                    continue
                self.link.send(("ok", value))
                if op == "shutdown":
                    return
        finally:
            self._halt()

    # ------------------------------------------------------------------ the decoding thread

    def _decode(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and (self._holds or self.stream.idle):
                        self._parked = True
                        self._cv.notify_all()
                        self._cv.wait()
                    self._parked = False
                    if self._stop:
                        return
                done = self.stream.step()
                if done:
                    with self._cv:
                        self._finished += done
                        self._cv.notify_all()
        except BaseException as err:  # noqa: BLE001 - handed to the trainer by the next `step`
            with self._cv:
                self._error, self._parked = err, True
                self._cv.notify_all()

    def _park(self) -> None:
        """Hold decoding: returns once the decoding thread is parked between two steps."""
        with self._cv:
            self._holds += 1
            while not self._parked:
                self._cv.wait()

    def _unpark(self) -> None:
        with self._cv:
            self._holds -= 1
            self._cv.notify_all()

    @contextlib.contextmanager
    def _held(self):
        """Decoding parked between two steps while the body runs."""
        self._park()
        try:
            yield
        finally:
            self._unpark()

    def _halt(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._decoder is not None:
            self._decoder.join(timeout=60)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the stream failed: {self._error!r}") from self._error

    # ------------------------------------------------------------------ requests

    def _op_open_stream(self, max_inflight: int) -> None:
        self.stream = open_stream(self.engine, max_inflight)
        self._decoder = threading.Thread(target=self._decode, name="rollout-decoder", daemon=True)
        self._decoder.start()

    def _op_submit(self, sent) -> None:
        with self._held():
            self.stream.submit([StreamRequest(tag=i, prompt_token_ids=ids, params=params) for i, ids, params in sent])

    def _op_step(self, _):
        deadline = time.monotonic() + self.step_wait_s
        with self._cv:
            while not self._finished and self._error is None and not self.stream.idle:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            self._raise_error()
            done, self._finished = self._finished, []
        return [(r.tag, r.completion, r.token_versions) for r in done], self.stream.refills

    def _op_abort(self, _) -> list[int]:
        with self._held():
            return [r.tag for r in self.stream.abort()]

    def _op_clear_queue(self, _) -> list[int]:
        with self._held():
            return [r.tag for r in self.stream.clear_queue()]

    def _op_hold(self, _) -> None:
        self._park()
        self._raise_error()

    def _op_release(self, _) -> None:
        self._unpark()

    def _op_version(self, version: int) -> None:
        with self._held():
            self.stream.version = version

    def _op_generate(self, requests):
        with self._held():
            return self.engine.generate(requests)

    def _op_load(self, _) -> None:
        with self._held():
            self.engine.update_weights(_received_weights(self.channels.weights))

    def _op_shutdown(self, _) -> None:
        self._halt()
        self.engine.shutdown()


def serve(config) -> int:
    """A rollout rank of a disaggregated job (`megatron-spo train` on the job's last
    parallel.rollout_ranks ranks): its engine, serving its trainer rank until the run ends."""
    from megatron_spo.models.checkpoint import hf_side_dir_of
    from megatron_spo.rollout.engine import make_engine

    channels = platform.rollout_channels(config.parallel.rollout_ranks)
    with platform.standalone_rollout_rank():
        engine = make_engine(config.rollout.engine_config(str(hf_side_dir_of(config.model.hf_dir)), seed=config.seed,
                                                          load_weights=False))
        RolloutServer(engine, channels).serve()
    return 0


__all__ = ["RemoteEngine", "RemoteStream", "RolloutServer", "RolloutRankError", "serve"]
