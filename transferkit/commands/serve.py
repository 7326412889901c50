"""`transferkit serve RUN`: the run's model answering over HTTP, on Starlette and uvicorn.

- POST /predict: images as multipart form files, or one image as the raw body with an
  image/* content type. The answer is what `predict --format json` writes for the same
  images (the same decoding, model, novelty score; query parameters top_k, threshold and
  reject_unknown as its options). GET /health (alive), /ready (model loaded and warmed up),
  /metadata (classes, size, base, the run's held-out score, versions).
- Dynamic batching: each image joins a bounded queue; one task takes up to --max-batch of
  them, waiting at most --max-wait-ms after the first, and runs them through the model as one
  batch on a thread of its own. Decoding runs on other threads, off the event loop.
- Bounded: a body larger than --max-body-mb gets 413, an image above the pixel limit every
  transferkit command has gets 413, a full queue gets 503 with Retry-After; bad input gets a
  4xx with a JSON error naming the problem. Request bodies are parsed in memory (the stdlib's
  email parser for multipart, since Starlette's form parser spools large files to disk) and
  never written anywhere.
- SIGTERM or SIGINT: uvicorn stops accepting, the requests in flight are answered, and the
  process exits 0. --reload loads a newer model.keras of a complete run and swaps it in
  between batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import errno
import hmac
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.commands.predict import UNKNOWN, answer
from transferkit.config import ServeConfig
from transferkit.data.inspect import inspect_bytes, rgb_png
from transferkit.errors import ConfigError, MissingPackageError, TransferkitError
from transferkit.files import json_text
from transferkit.reporting import NullReporter, Reporter
from transferkit.runs.directory import MODEL_FILE, NOVELTY_FILE, load_run

API_KEY_ENV = "TRANSFERKIT_API_KEY"
RETRY_AFTER_S = 1
RELOAD_EVERY_S = 2.0
log = logging.getLogger("transferkit.serve")  # the name server logs are configured by


def _respond(content: Any, status_code: int = 200, headers: dict[str, str] | None = None
             ) -> Any:
    """A JSON response whose names follow files.lossless_json (Starlette's own JSONResponse
    fails on a class or file name that is not UTF-8)."""
    from starlette.responses import Response

    return Response(json_text(content, indent=None), status_code, headers,
                    media_type="application/json")


class BadRequest(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Served:
    """One loaded model: the run's, with its features too when it has a novelty score."""

    run: Any  # LoadedRun
    step: Callable[[np.ndarray], Any]
    decode: Callable[[bytes], np.ndarray]
    novelty: Any  # Novelty | None
    stamp: int  # model.keras's modification time, ns

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.step(images)
        if self.novelty is None:
            return np.asarray(out, np.float32), None
        features, probabilities = (np.asarray(o, np.float32) for o in out)
        return probabilities, self.novelty.score(features, probabilities)


def load_served(run_dir: Path, reporter: Reporter | None = None) -> Served:
    """Loads the run (safe mode), traces the model and the decoder, and warms both up.

    Raises:
        ArtifactError: the run cannot be served (unfinished, damaged).
    """
    import tensorflow as tf

    from transferkit.data.pipeline import decode_image
    from transferkit.inference import inference_step
    from transferkit.model import with_features
    from transferkit.novelty import load_novelty

    run = load_run(run_dir)
    stamp = (run_dir / MODEL_FILE).stat().st_mtime_ns
    size, model, novelty = run.image_size, run.model, None
    if (run_dir / NOVELTY_FILE).exists():
        model = with_features(run.model)
        novelty = load_novelty(run_dir / NOVELTY_FILE, model.output_shape[0][-1])
    step = inference_step(model, tf.TensorSpec([None, size, size, 3], tf.float32),
                          reporter=reporter)
    decoder = tf.function(lambda e: decode_image(e, size),
                          input_signature=[tf.TensorSpec([], tf.string)])
    served = Served(run, step, lambda data: decoder(tf.constant(data)).numpy(), novelty, stamp)
    served.predict(np.zeros((1, size, size, 3), np.float32))  # trace and warm up
    return served


def decode(served: Served, data: bytes, name: str) -> np.ndarray:
    """One image's bytes -> float32 RGB at the model's size, exactly as predict reads a file
    (raises BadRequest naming what is wrong with it)."""
    info = inspect_bytes(Path(name), data, check_extension=False)
    if not info.usable:
        status = 413 if info.problem_kind == "too_large" else 422
        raise BadRequest(status, f"{name}: {info.problem}")
    return served.decode(rgb_png(data) if info.needs_conversion else data)


@dataclass
class Batcher:
    """Runs queued images through the current model in batches (see the module doc)."""

    current: Callable[[], Served]
    max_batch: int
    max_wait_s: float
    max_queue: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    model_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="model"))

    async def submit(self, images: list[np.ndarray]
                     ) -> list[tuple[np.ndarray, float | None, int]]:
        """Each image's probabilities, novelty score and the size of the batch it ran in;
        QueueFull when they do not fit."""
        if self.queue.qsize() + len(images) > self.max_queue:
            raise asyncio.QueueFull
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for image, future in zip(images, futures, strict=True):
            self.queue.put_nowait((image, future))
        return list(await asyncio.gather(*futures))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(await asyncio.wait_for(
                        self.queue.get(), max(deadline - loop.time(), 0)))
                except TimeoutError:
                    break
            served = self.current()
            try:
                probabilities, novelty = await loop.run_in_executor(
                    self.model_thread, served.predict, np.stack([image for image, _ in batch]))
            except Exception as exc:  # the model failed: every waiting request hears it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for i, (_, future) in enumerate(batch):
                if not future.done():  # a client that went away
                    future.set_result((probabilities[i], None if novelty is None
                                       else float(novelty[i]), len(batch)))


async def _read_body(request: Any, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"the body is {int(declared)} bytes, above the limit of {limit} "
                              f"(--max-body-mb)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, f"the body is above the limit of {limit} bytes (--max-body-mb)")
    return bytes(body)


def _images(content_type: str, body: bytes, name: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image in a request body."""
    if not body:
        raise BadRequest(400, "the request body is empty: send an image (raw bytes with an "
                              "image/* content type) or multipart form files")
    kind = content_type.split(";")[0].strip().lower()
    if kind.startswith("image/"):
        return [(name, body)]
    if kind != "multipart/form-data":
        raise BadRequest(415, f"content type {kind or 'none'!r} is not an image: send image/* "
                              f"bytes or multipart/form-data files")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    parts = [(part.get_filename() or part.get_param("name", header="content-disposition")
              or f"file{i}", part.get_payload(decode=True) or b"")
             for i, part in enumerate(message.iter_parts())] if message.is_multipart() else []
    if not parts:
        raise BadRequest(400, "the multipart body holds no files")
    return [(str(n), data) for n, data in parts]


class Service:
    """The server's state and its endpoints: the served model (swapped in place by
    --reload), readiness, the API key, the batcher."""

    def __init__(self, config: ServeConfig, served: Served) -> None:
        self.config, self.served, self.ready = config, served, False
        self.key = config.api_key or os.environ.get(API_KEY_ENV) or None
        self.batcher = Batcher(lambda: self.served, config.max_batch,
                               config.max_wait_ms / 1000, config.max_queue)
        self.limit = int(config.max_body_mb * 2**20)

    @staticmethod
    def error(status: int, message: str, **headers: str) -> Any:
        return _respond({"error": message}, status_code=status, headers=headers)

    def allowed(self, request: Any) -> bool:
        given = request.headers.get("x-api-key") or request.headers.get(
            "authorization", "").removeprefix("Bearer ").strip()
        return self.key is None or hmac.compare_digest(given.encode(), self.key.encode())

    def options(self, request: Any) -> tuple[int, float | None, bool]:
        """top_k, threshold and reject_unknown from the query (BadRequest when invalid)."""
        query = request.query_params
        try:
            top_k = int(query.get("top_k", self.config.top_k))
            threshold = float(query["threshold"]) if "threshold" in query else None
        except ValueError:
            top_k, threshold = 0, None
        if top_k < 1 or (threshold is not None and not 0 < threshold <= 1):
            raise BadRequest(400, "top_k must be an integer of 1 or more and threshold a "
                                  "probability in (0, 1]")
        reject = query.get("reject_unknown", "0").lower() in ("1", "true", "yes")
        if reject and self.served.novelty is None:
            raise BadRequest(400, "reject_unknown needs the run's novelty score, and this run "
                                  "has none")
        return top_k, threshold, reject

    async def predict(self, request: Any) -> Any:
        started = time.perf_counter()
        if not self.allowed(request):
            return self.error(401, "missing or wrong API key (Authorization: Bearer KEY, or "
                                   "X-API-Key)")
        current = self.served
        try:
            top_k, threshold, reject = self.options(request)
            files = _images(request.headers.get("content-type", ""),
                            await _read_body(request, self.limit),
                            request.headers.get("x-filename", "upload"))
            if len(files) > self.config.max_queue:
                raise BadRequest(413, f"this request holds {len(files)} images and the server "
                                      f"takes at most {self.config.max_queue} at once "
                                      f"(--max-queue): send them in smaller requests")
            images = list(await asyncio.gather(*(asyncio.to_thread(decode, current, data, name)
                                                 for name, data in files)))
            results = await self.batcher.submit(images)
        except BadRequest as bad:
            log.info("POST /predict %d %.1f ms: %s", bad.status,
                     1000 * (time.perf_counter() - started), bad)
            return self.error(bad.status, str(bad))
        except asyncio.QueueFull:
            log.info("POST /predict 503: the queue is full")
            return self.error(503, f"the queue is full ({self.config.max_queue} images "
                                   f"waiting); retry shortly",
                              **{"Retry-After": str(RETRY_AFTER_S)})
        rejecting = current.novelty.threshold if reject else None
        rows = [answer(Path(name), p, current.run.class_names, top_k, threshold, n,
                       rejecting).to_dict()
                for (name, _), (p, n, _) in zip(files, results, strict=True)]
        log.info("POST /predict 200 %d image(s) %.1f ms, batch of %s", len(rows),
                 1000 * (time.perf_counter() - started), "/".join(str(b) for *_, b in results))
        return _respond(rows)

    async def health(self, request: Any) -> Any:
        return _respond({"status": "alive"})

    async def is_ready(self, request: Any) -> Any:
        if not self.allowed(request):
            return self.error(401, "missing or wrong API key")
        return _respond({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def metadata(self, request: Any) -> Any:
        if not self.allowed(request):
            return self.error(401, "missing or wrong API key")
        return _respond(describe(self.served))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(self.batcher.run())]
        if self.config.reload:
            tasks.append(asyncio.create_task(_watch(self)))
        self.ready = True
        yield
        self.ready = False
        for task in tasks:
            task.cancel()
        self.batcher.model_thread.shutdown(wait=True)


def build_app(config: ServeConfig, served: Served) -> Any:
    """The Starlette application serving `served`."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    service = Service(config, served)
    return Starlette(routes=[Route("/predict", service.predict, methods=["POST"]),
                             Route("/health", service.health),
                             Route("/ready", service.is_ready),
                             Route("/metadata", service.metadata)],
                     lifespan=service.lifespan)


def describe(served: Served) -> dict[str, Any]:
    """GET /metadata: what the model is and how good the run measured it."""
    import keras

    from transferkit import __version__

    record = served.run.record
    # the held-out score (test) when the run has one, else val's, which chose the model
    held = next((s for s in record.scores if not s.chose), None) or next(
        iter(record.scores), None)
    score = None if held is None else {"split": held.split, "accuracy": held.accuracy,
                                       "interval_95": [held.low, held.high], "n": held.n,
                                       "chose_the_model": held.chose, "seen_by_run": held.seen}
    return {"classes": list(record.class_names), "image_size": record.image_size,
            "base": record.base, "score": score,
            "novelty_threshold": None if served.novelty is None else served.novelty.threshold,
            "unknown_label": UNKNOWN, "transferkit": __version__, "keras": keras.__version__}


async def _watch(service: Service) -> None:
    """--reload: a newer model.keras of a complete run replaces the served one."""
    run_dir = service.config.run_dir
    while True:
        await asyncio.sleep(RELOAD_EVERY_S)
        try:
            if (run_dir / MODEL_FILE).stat().st_mtime_ns == service.served.stamp:
                continue
            service.served = await asyncio.to_thread(load_served, run_dir)
            log.info("reloaded %s", run_dir / MODEL_FILE)
        except Exception as exc:  # a run being written, a damaged file: keep serving
            log.warning("not reloaded: %s (still serving the model loaded before)", exc)


def serve(config: ServeConfig, reporter: Reporter | None = None) -> None:
    """Loads the run and serves it until SIGTERM or SIGINT, then exits after answering the
    requests in flight.

    Args:
        config: the run, the address and the batching limits.
        reporter: where progress goes (none when None).

    Raises:
        TransferkitError: the run cannot be served, or the port is taken.
    """
    import importlib.util

    missing = [m for m in ("uvicorn", "starlette") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPackageError.needs("transferkit serve", missing, "serve")
    import uvicorn

    reporter = reporter or NullReporter()
    served = load_served(config.run_dir, reporter)
    listening = _listen(config.host, config.port)  # refused here, before saying "Serving"
    reporter.info(f"Serving the run '{config.run_dir}' ({len(served.run.class_names)} "
                  f"classes, {served.run.image_size} px) on http://{config.host}:{config.port}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = uvicorn.Server(uvicorn.Config(build_app(config, served), host=config.host,
                                           port=config.port, access_log=False,
                                           log_level="warning", timeout_graceful_shutdown=30))
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again through the handlers it
    # found: these make that a normal exit (0) after the drain, not a death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    server.run(sockets=[listening])


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, for uvicorn to serve on.

    Raises:
        ConfigError: the host is no address of this machine (a usage error).
        TransferkitError: the port is taken, or needs root.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host} is not an address this machine can listen on "
                          f"({exc.strerror}). Use 127.0.0.1 (this machine only) or 0.0.0.0 "
                          f"(every interface).") from exc
    listening = socket.socket(family, kind, proto)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind(address)
    except OSError as exc:
        listening.close()
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
            raise ConfigError(f"Cannot listen on {host}:{port} ({exc.strerror}): it is not an "
                              f"address of this machine. Use 127.0.0.1 or 0.0.0.0.") from exc
        why = ("another program listens on that port: choose another --port, or stop it"
               if exc.errno == errno.EADDRINUSE else "that port needs root: choose one above "
                                                     "1023")
        raise TransferkitError(f"Cannot listen on {host}:{port} ({exc.strerror}); {why}."
                               ) from exc
    return listening
