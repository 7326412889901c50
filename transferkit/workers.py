"""Fine-tuning across machines (--strategy multiworker) on TensorFlow's
MultiWorkerMirroredStrategy, with the strategy's own step: every replica runs it under
`strategy.run` and Keras's optimizer all-reduces the gradients in `apply_gradients`.

Why an epoch loop of our own: Keras 3's `fit` fails under this strategy (keras-team/keras
#20585: first building the model from a distributed batch, then averaging the step's losses),
and a model built outside the scope trains undistributed without an error. The loop below
keeps what fit gives the recipe: the same Keras callbacks (through CallbackList), class
weights, the loss and its scaling across replicas as Keras computes them.

What keeps the workers in step (each is a collective every worker reaches):
- each worker reads its own shard of the training files, repeated, for the same number of
  steps per epoch;
- the chief (worker 0) alone fits the probe, runs the data checks and writes the run; the
  others wait for its record (`share_record`), train in a scratch folder of their own and
  stop after the stages;
- weights and optimizer state start each stage as the chief's (`sync_from_chief`);
- val is scored on the chief and its numbers sent to all, so every early-stopping decision
  is the same everywhere; a signal on any worker stops all of them at the same step.
A worker that dies makes the others' next collective fail (TensorFlow's peer health check),
which ends them with an error saying so.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.errors import ConfigError, StopRequested, WorkerLost

if TYPE_CHECKING:
    import keras

MULTIWORKER = "multiworker"
TF_CONFIG = "TF_CONFIG"
JOIN_LIMIT_S = 900  # seconds a worker waits for every other one to start
SCRATCH_PREFIX = "transferkit-worker-"


@dataclass(frozen=True)
class Cluster:
    """This process's place among the workers, from TF_CONFIG (one worker without it)."""

    workers: tuple[str, ...]
    index: int

    @property
    def chief(self) -> bool:
        return self.index == 0

    @property
    def size(self) -> int:
        return len(self.workers)

    def describe(self) -> str:
        role = "the chief" if self.chief else f"worker {self.index}"
        return f"{role} of {self.size} ({', '.join(self.workers)})"


def read_cluster(environ: dict[str, str] | None = None) -> Cluster:
    """The cluster TF_CONFIG describes ({"cluster": {"worker": [host:port, ...]}, "task":
    {"type": "worker", "index": i}}; a "chief" task, when listed, comes first). Parsed as
    JSON and checked; nothing in it is run.

    Raises:
        ConfigError: TF_CONFIG is not such a description.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(TF_CONFIG, "").strip()
    example = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}')
    if TF_CONFIG not in environ:
        return Cluster(("localhost",), 0)
    if not text:  # TensorFlow itself fails on it with a JSON traceback
        raise ConfigError(f"TF_CONFIG is set but empty. Unset it (unset TF_CONFIG) to train "
                          f"on this machine alone, or describe the cluster, e.g. {example}.")
    try:
        spec = json.loads(text)
        cluster, task = spec["cluster"], spec["task"]
        chiefs = list(cluster.get("chief", []))
        workers = [*chiefs, *cluster.get("worker", [])]
        kind, index = task["type"], task["index"]
        valid = (all(isinstance(w, str) and ":" in w for w in workers) and len(chiefs) <= 1
                 and kind in ("chief", "worker") and isinstance(index, int)
                 and 0 <= index < len(cluster.get(kind, [])))
    except (ValueError, KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise ConfigError(f"TF_CONFIG does not describe this worker in a cluster; got "
                          f"{text[:300]!r}. Each worker needs the same cluster and its own "
                          f"task, e.g. {example}.")
    return Cluster(tuple(workers), index + (len(chiefs) if kind == "worker" else 0))


def multiworker_strategy() -> Any:
    """TensorFlow's MultiWorkerMirroredStrategy for TF_CONFIG's cluster (checked first).

    Making it waits until every worker has started, inside TensorFlow and holding the GIL,
    so Python's signal handlers cannot run there: while it waits, SIGINT keeps its default
    action (the process ends at once; nothing of the run is written yet), and an alarm ends
    the wait after JOIN_LIMIT_S. TensorFlow's own preemption notifier takes SIGTERM there (a
    scheduler's SIGKILL after its grace period still ends the wait); the handler from before
    is put back after, so that a signal stops the run as on one machine.
    """
    import tensorflow as tf

    read_cluster()
    if threading.current_thread() is not threading.main_thread():
        return tf.distribute.MultiWorkerMirroredStrategy()
    previous = {signal.SIGTERM: signal.getsignal(signal.SIGTERM), **{
        s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGALRM)}}
    signal.alarm(int(JOIN_LIMIT_S))
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    finally:
        signal.alarm(0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cluster_of(strategy_name: str) -> Cluster | None:
    """The cluster of a run with `strategy_name`, None when it runs on one machine."""
    return read_cluster() if strategy_name == MULTIWORKER else None


def scratch_copy(run_dir: Path | None = None) -> Path:
    """A private folder for a worker that is not the chief (a copy of `run_dir`, to resume
    from, when given): what it writes never touches the chief's run."""
    scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
    if run_dir is not None:
        shutil.copytree(run_dir, scratch, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.lock"))
    return scratch


def shard(items: Sequence[Any] | np.ndarray, cluster: Cluster) -> Any:
    """This worker's share of `items`: every size-th one from its index."""
    return items[cluster.index::cluster.size]


def _sum_over_workers(strategy: Any, values: np.ndarray, cluster: Cluster,
                      chief_only: bool) -> np.ndarray:
    """The sum of every worker's `values` (or the chief's alone), the same on every worker:
    one all-reduce, to which each worker's first replica adds its own."""
    import tensorflow as tf

    values = np.asarray(values, np.float32)
    own = values if cluster.chief or not chief_only else np.zeros_like(values)
    with _collective():
        result = _all_reduce(strategy, max(strategy.num_replicas_in_sync // cluster.size, 1))(
            tf.constant(own))
        return np.asarray(strategy.experimental_local_results(result)[0])


@functools.cache
def _all_reduce(strategy: Any, local: int) -> Any:
    """The sum over the workers of what each worker's first replica gives (of `local`
    replicas per worker): one tf.function per strategy, traced once per shape, not per call
    (the workers exchange values at every epoch)."""
    import tensorflow as tf

    def replica(given: Any) -> Any:
        context = tf.distribute.get_replica_context()
        first = context.replica_id_in_sync_group % local == 0
        return context.all_reduce("sum", tf.where(first, given, tf.zeros_like(given)))

    return tf.function(lambda given: strategy.run(replica, args=(given,)))


@contextlib.contextmanager
def _collective() -> Iterator[None]:
    """Turns TensorFlow's errors for a collective whose peer is gone (aborted by its
    health check, or unreachable) into WorkerLost."""
    import tensorflow as tf

    gone = (tf.errors.UnavailableError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError, tf.errors.AbortedError)
    try:
        yield
    except tf.errors.OpError as exc:
        if not isinstance(exc, gone) and "ollective" not in str(exc):
            raise
        raise WorkerLost(f"Another worker stopped answering (TensorFlow: {type(exc).__name__}, "
                         f"the collective was aborted): it died, or its machine or network "
                         f"went away. The chief's run keeps what it had finished: start every "
                         f"worker again with transferkit finetune --resume RUN.") from None


def from_chief(strategy: Any, values: np.ndarray, cluster: Cluster) -> np.ndarray:
    """The chief's `values` on every worker (what other workers pass is ignored)."""
    return _sum_over_workers(strategy, values, cluster, chief_only=True)


def share_text(strategy: Any, text: str, cluster: Cluster) -> str:
    """The chief's `text` on every worker (a length, then the bytes)."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.float32)
    length = int(from_chief(strategy, np.array([len(data)]), cluster)[0])
    padded = np.zeros(length) if not cluster.chief else data
    return bytes(from_chief(strategy, padded, cluster).astype(np.uint8)).decode("utf-8")


def sync_from_chief(strategy: Any, model: keras.Model, cluster: Cluster) -> None:
    """Gives every worker the chief's weights and optimizer state (floating variables), so
    that a stage starts from the same state everywhere: the chief alone set the probe's
    head, and a resumed run may have read its checkpoint from a stale copy."""
    optimizer = getattr(model, "optimizer", None)
    variables = [*model.weights, *(optimizer.variables if optimizer is not None else [])]
    floating = [v for v in variables if "float" in str(v.dtype)]
    if not floating:
        return
    flat = np.concatenate([np.asarray(v.numpy(), np.float32).ravel() for v in floating])
    values = from_chief(strategy, flat, cluster)
    at = 0
    for v in floating:
        size = int(np.prod(v.shape))
        v.assign(values[at:at + size].reshape(v.shape).astype(v.dtype))
        at += size


def weights_digest(model: keras.Model) -> str:
    """A short hash of the weights, for showing that workers hold the same model."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


def _train_step(model: keras.Model, loss: keras.losses.Loss, strategy: Any, workers: int,
                weights: np.ndarray | None) -> Any:
    """One step on every replica: the loss as Keras computes it (scaled for the replicas,
    with the model's regularisation losses), the optimizer's all-reduced update; returns
    the global sums of loss x images, right answers, images and stop requests (SIGINT,
    SIGTERM)."""
    import tensorflow as tf

    class_weights = None if weights is None else tf.constant(weights, tf.float32)
    replicas = strategy.num_replicas_in_sync
    local = max(replicas // workers, 1)

    def replica(x: Any, y: Any, stops: Any) -> Any:
        labels = tf.argmax(y, axis=-1, output_type=tf.int32) if y.shape.rank == 2 else \
            tf.cast(y, tf.int32)
        sample_weight = None if class_weights is None else tf.gather(class_weights, labels)
        with tf.GradientTape() as tape:
            predicted = model(x, training=True)
            value = loss(y, predicted, sample_weight=sample_weight)
            if model.losses:
                value += tf.add_n(model.losses) / replicas
            scaled = model.optimizer.scale_loss(value)
        gradients = tape.gradient(scaled, model.trainable_weights)
        model.optimizer.apply_gradients(zip(gradients, model.trainable_weights, strict=True))
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        right = tf.reduce_sum(tf.cast(tf.equal(
            tf.argmax(predicted, axis=-1, output_type=tf.int32), labels), tf.float32))
        first = tf.distribute.get_replica_context().replica_id_in_sync_group % local == 0
        stops = tf.where(first, stops, tf.zeros_like(stops))  # once per worker
        return tf.concat([tf.stack([tf.cast(value, tf.float32) * replicas * count, right,
                                    count]), stops], axis=0)

    @tf.function
    def step(batch: Any, stops: Any) -> Any:
        x, y = batch
        return strategy.reduce("sum", strategy.run(replica, args=(x, y, stops)), axis=None)

    return step


def _repeated(train: Any, batch_size: int | None, seed: int) -> Any:
    """This worker's training data as an endless dataset of per-replica batches: arrays
    (features) are shuffled each pass here; a dataset arrives shuffled."""
    import tensorflow as tf

    if isinstance(train, tuple):
        train = tf.data.Dataset.from_tensor_slices(train).shuffle(
            len(train[0]), seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    return train.repeat()


def _stop_flags(pending: StopRequested | None) -> np.ndarray:
    signum = None if pending is None else pending.signum
    return np.array([signum == signal.SIGINT, signum == signal.SIGTERM], np.float32)


def _batches(strategy: Any, dataset: Any) -> Iterator[Any]:
    """This worker's dataset as the strategy's input (each worker brings its own shard, so
    nothing is sharded again)."""
    return iter(strategy.distribute_datasets_from_function(lambda context: dataset))


def fit_across_workers(model: keras.Model, loss: keras.losses.Loss, train: Any, steps: int,
                       batch_size: int | None, epochs: tuple[int, int], validate: Any,
                       callbacks: Sequence[keras.callbacks.Callback], cluster: Cluster,
                       class_weight: dict[int, float] | None = None, seed: int = 0) -> None:
    """Trains `model` (compiled, inside the strategy's scope) from epoch `epochs[0]` to
    `epochs[1]` on this worker's share of `train` (a dataset of batches, or arrays to batch
    by `batch_size`), `steps` steps per replica per epoch on every worker; `validate()` gives
    the chief's val_loss and val_accuracy; the callbacks see what fit would show them.

    Raises:
        StopRequested: a signal reached any worker (all stop at the same step).
        WorkerLost: another worker stopped answering.
    """
    import keras
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    weights = None if class_weight is None else np.array(
        [class_weight[i] for i in range(len(class_weight))], np.float32)
    step = _train_step(model, loss, strategy, cluster.size, weights)
    batches = _batches(strategy, _repeated(train, batch_size, seed))
    listed = keras.callbacks.CallbackList(list(callbacks), model=model)
    epoch = epochs[0]
    try:
        sync_from_chief(strategy, model, cluster)
        model.stop_training = False
        listed.on_train_begin()
        for epoch in range(*epochs):
            listed.on_epoch_begin(epoch)
            logs, pending = _train_epoch(step, batches, steps, listed)
            val = validate() if cluster.chief else (0.0, 0.0)
            val_loss, val_accuracy = from_chief(strategy, np.array(val), cluster)
            logs = {**logs, "val_loss": float(val_loss), "val_accuracy": float(val_accuracy)}
            try:
                with _collective():  # checkpoints read BatchNorm statistics across replicas
                    listed.on_epoch_end(epoch, logs)
            except StopRequested as stop:  # the epoch is checkpointed: told to the others next
                pending = stop
            stopping = from_chief(strategy, np.array([model.stop_training]), cluster)[0]
            asked = _sum_over_workers(strategy, _stop_flags(pending), cluster, chief_only=False)
            if asked.any():  # asked during the epoch's last step
                raise pending or StopRequested(int(signal.SIGTERM if asked[1] else signal.SIGINT))
            if stopping:
                break
    except WorkerLost as lost:
        raise WorkerLost(f"Epoch {epoch + 1}: {lost}") from None
    listed.on_train_end()


def _train_epoch(step: Any, batches: Iterator[Any], steps: int, listed: Any
                 ) -> tuple[dict[str, float], StopRequested | None]:
    """One epoch's steps; returns its training logs and a stop this worker was asked for in
    its last step (not yet told to the others)."""
    import tensorflow as tf

    totals, pending = np.zeros(3), None
    logs: dict[str, float] = {}
    for i in range(steps):
        listed.on_train_batch_begin(i)
        with _collective():
            out = step(next(batches), tf.constant(_stop_flags(pending))).numpy()
        if out[3:].any():  # a worker was asked to stop: all stop here, at the same step
            raise pending or StopRequested(int(signal.SIGTERM if out[4] else signal.SIGINT))
        totals += out[:3]
        logs = {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}
        try:
            listed.on_train_batch_end(i, logs)
        except StopRequested as stop:  # sent to the others with the next step
            pending = stop
    return logs, pending
