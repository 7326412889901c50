"""Batch work on a Ray cluster (--engine ray): the images of extract, predict, audit, select
and bases --rank go through the model on Ray's workers, by Ray Data's `map_batches` over a
pool of actors that each build the model once (Ray's documented pattern for batch inference).

What the workers run is a `BatchJob`: a small picklable recipe that builds the model and runs
it on a list of image files, the same code the local path runs, so both give the same
numbers. Results come back in the order of the input. Ray retries a task whose worker died
and restarts the actor; the driver keeps the feature cache (keyed by content), so a repeated
run sends only the images it has not seen. Every worker reads the images by their paths: on a
cluster of several machines, the files (and transferkit) must be on each of them, e.g. a
shared file system.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from transferkit.errors import ClusterError, MissingPackageError
from transferkit.quiet import quiet_native_output
from transferkit.reporting import Reporter
from transferkit.runtime import PAYS_OFF, worker_env

if TYPE_CHECKING:
    import keras

    from transferkit.config import EngineConfig

ROWS_PER_TASK = 64  # images per Ray task: small enough to spread, large enough to batch
CONNECT_TIMEOUT_S = 10  # how long a named cluster's address may take to answer


class BatchJob(Protocol):
    """What a Ray worker runs: build the model once, then run it on lists of image files."""

    batch_size: int

    def build(self) -> keras.Model: ...

    def run(self, model: keras.Model, sources: list[str]) -> np.ndarray | list[np.ndarray]: ...


class _Worker:
    """One Ray actor: the job's model, built once, over batches of (index, source) rows."""

    def __init__(self, job: BatchJob, convert: bool) -> None:
        import transferkit  # noqa: F401  (sets the Keras backend before Keras loads)
        from transferkit.runtime import live_long

        if convert:  # the whole job is long enough for ONNX Runtime, as a local pass would be
            live_long()
        self.job = job
        self.model = job.build()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sources = [os.fsdecode(bytes(s)) for s in batch["source"]]
        outputs = self.job.run(self.model, sources)
        listed = outputs if isinstance(outputs, list) else [outputs]
        return {"index": batch["index"],
                **{f"output{k}": np.asarray(o, np.float32) for k, o in enumerate(listed)}}


# The start of an HTTP/2 connection (its preface and an empty SETTINGS frame): a gRPC server,
# as Ray's GCS and its client server are, answers with a SETTINGS frame of its own
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS = 4  # the frame type, in a frame header's fourth byte


def _check_reachable(address: str) -> None:
    """A cluster named by host:port (or ray://host:port) answers there as a gRPC server
    within CONNECT_TIMEOUT_S. Ray itself would retry a silent or foreign address for
    minutes, inside C++ code that no signal interrupts.

    Raises:
        ClusterError: nothing accepts a connection there, or what does is not Ray's.
    """
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not port.isdigit() or not host:
        return  # auto, local, or a form Ray parses (and refuses) itself
    fix = ("Check the address (ray://head:10001, head:6379) and that `ray start --head` runs "
           "there, or use --engine local.")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S) as s:
            s.settimeout(CONNECT_TIMEOUT_S)
            s.sendall(_HTTP2_HELLO)
            answer = s.recv(9)
    except OSError as exc:
        raise ClusterError(f"Nothing answers at the Ray cluster address {address} "
                           f"({exc.strerror or exc}, within {CONNECT_TIMEOUT_S} s). {fix}"
                           ) from exc
    if len(answer) < 4 or answer[3] != _SETTINGS:
        raise ClusterError(f"Something answers at {address}, but not a Ray cluster (it does "
                           f"not speak gRPC). {fix}")


def connect(address: str | None, reporter: Reporter) -> Any:
    """Ray, connected to the cluster at `address` (else RAY_ADDRESS, else a new local one),
    quiet: no dashboard, no progress bars, workers' logs kept off the terminal. A named
    address must answer within CONNECT_TIMEOUT_S first.

    Raises:
        MissingPackageError: Ray is not installed.
        ClusterError: the cluster cannot be reached.
    """
    if importlib.util.find_spec("ray") is None:
        raise MissingPackageError.needs("--engine ray", ["Ray"], "ray",
                                        " (or use --engine local).")
    import ray
    import ray.data

    if not ray.is_initialized():
        named = address or os.environ.get("RAY_ADDRESS")
        reporter.info(f"Connecting to the Ray cluster at {named} ..." if named else
                      "Starting a Ray cluster on this machine ...")
        if named:
            _check_reachable(named)
        try:
            with quiet_native_output():
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR, configure_logging=False,
                         runtime_env={"env_vars": worker_env()})
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
            token = "Authentication" in f"{exc} {exc.__cause__}"
            raise ClusterError(
                f"Could not reach the Ray cluster at {where} ({exc}). " + (
                    "It asks for a token: set RAY_AUTH_MODE=token, with the cluster's token "
                    "in ~/.ray/auth_token or RAY_AUTH_TOKEN." if token else
                    "Check the address (ray://head:10001, head:6379, or auto for the one "
                    "`ray start --head` started here).")) from exc
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray


def run_on_ray(job: BatchJob, sources: Sequence[str], engine: EngineConfig,
               reporter: Reporter, description: str) -> np.ndarray | list[np.ndarray]:
    """`job`'s outputs for every source, in order, computed by a pool of Ray actors (one per
    CPU the cluster offers, at most one per task)."""
    ray = connect(engine.ray_address, reporter)
    # absolute paths: a worker's working folder is Ray's own
    rows = [{"index": i, "source": os.fsencode(os.path.abspath(s))}
            for i, s in enumerate(sources)]
    tasks = max(1, -(-len(rows) // ROWS_PER_TASK))
    actors = max(1, min(int(ray.cluster_resources().get("CPU", 1)), tasks))
    reporter.info(f"{description} on Ray: {len(rows)} images in {tasks} tasks, up to "
                  f"{actors} workers.")
    started = time.perf_counter()
    data = ray.data.from_items(rows, override_num_blocks=tasks)
    convert = len(rows) >= PAYS_OFF
    mapped = data.map_batches(_Worker, fn_constructor_args=(job, convert),
                              batch_size=ROWS_PER_TASK,
                              concurrency=(1, actors), num_cpus=1, batch_format="numpy")
    # Ray's own lines (its C++ core logs each actor's start) stay off the terminal
    with quiet_native_output():
        parts = list(mapped.iter_batches(batch_format="numpy", batch_size=None))
    reporter.info(f"Ray returned {sum(len(p['index']) for p in parts)} rows in "
                  f"{time.perf_counter() - started:.1f} s.")
    return _in_order(parts, len(rows))


def _in_order(parts: list[dict[str, np.ndarray]], count: int) -> np.ndarray | list[np.ndarray]:
    """The outputs of every batch, one row per input in the input's order, each exactly once
    (a retried task's rows are not counted twice); an array for a job with one output, a list
    for one with several."""
    index = np.concatenate([p["index"] for p in parts]) if parts else np.zeros(0, int)
    if sorted(index.tolist()) != list(range(count)):
        raise ClusterError(f"The Ray job returned {len(index)} rows for {count} images "
                           f"({len(set(index.tolist()))} distinct); run it again.")
    order = np.argsort(index, kind="stable")
    names = sorted((k for k in parts[0] if k.startswith("output")), key=lambda k: int(k[6:]))
    outputs = [np.concatenate([p[name] for p in parts])[order] for name in names]
    return outputs if len(outputs) > 1 else outputs[0]
