"""``fearec-dist serve``: the export behind an HTTP endpoint on Ray Serve.

    POST /recommend        {"history": [raw ids], "k", "exclude_seen", "strict", "fallback"}
                           -> {"items", "scores", "unknown", "source", "export": {"model",
                              "export_id"}}
    POST /recommend/batch  a JSON list of such requests -> a list of such answers
    GET  /healthz          200 once an export is loaded
    GET  /info             the export's manifest, plus "serving" (config, last swap)

One deployment, ``Recommender``; each replica holds one loaded export (``online_api.Loaded``).

- **Batching.** Concurrent ``/recommend`` requests on a replica are gathered by
  ``@serve.batch`` (up to ``max_batch_size``, waiting at most ``batch_wait_ms`` after the first)
  and scored by ``online_api.score_queries``: one ``recommend_batch`` call per ``exclude_seen``
  value, at the largest k, each answer cut to its own k. The scoring runs on the replica's
  event loop without yielding, on purpose: requests that arrive meanwhile queue up and form the
  next batch (handed to a thread, Serve would cut a new, smaller batch every ``batch_wait_ms``).
- **Swaps.** ``reconfigure`` (Serve's ``user_config``: a Serve config file, ``serve deploy``, a
  RayService) and the pointer poller (``follow``) both call ``_swap``: the new export is loaded
  and warmed in a thread while the old one keeps serving, then one attribute assignment switches
  to it; a batch reads that attribute once, so it is scored by one export. A swap that fails
  (missing or tampered export) keeps the old export and is reported in ``/info``.
- **Bad requests** are answered 4xx naming the field (``online_api.parse_query``); a body over
  ``max_body_bytes`` 413; a body not received within ``read_timeout_s`` 408; a request not
  scored within ``request_timeout_s`` 503. Nothing a client sends raises out of ``__call__``.

``app_builder`` makes the same application for ``serve run fearec_dist.serve.online:app_builder
export=…`` and Serve config files; ``serve_forever`` is the CLI's. docs/serving.md has the
defaults, the swap procedure and the measured overhead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sys
import threading
import time
from typing import Any

import torch
from ray import serve
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from fearec_dist.launch import connect_ray
from fearec_dist.serve.artifact import ServeError
from fearec_dist.serve.online_api import (
    Loaded,
    RequestError,
    ServingConfig,
    load_state,
    parse_batch,
    parse_json,
    parse_query,
    read_pointer,
    score_queries,
    serving_config,
)

logger = logging.getLogger("ray.serve")
APP_NAME = "fearec"
RETRY_FAILED_S = 60.0  # a pointer target that failed to load is retried this often
ROUTES = {"/recommend": "POST", "/recommend/batch": "POST", "/healthz": "GET", "/info": "GET"}
# deployment options (everything else is the user_config, ServingConfig)
DEPLOYMENT_KEYS = {
    "replicas": int,
    "cpus_per_replica": float,
    "gpus_per_replica": float,
    "max_ongoing_requests": int,
    "access_log": bool,
}


@serve.deployment(name="Recommender", max_surge_percent=100)
class Recommender:
    """A replica: one loaded export, its batch queue and, with ``follow``, a pointer poller."""

    def __init__(self) -> None:
        self._cfg = ServingConfig()
        self._state: Loaded | None = None
        self._swap_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self._last_swap: dict[str, Any] | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this at start and whenever ``user_config`` changes (in place)."""
        cfg = serving_config(user_config)
        if not cfg.export and not cfg.follow:
            raise ValueError(
                "serving config: give 'export' (an export URI) or 'follow' (a "
                'pointer file with an "export" key)'
            )
        torch.set_num_threads(cfg.threads)
        self._score.set_max_batch_size(cfg.max_batch_size)
        self._score.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)
        old, self._cfg = self._cfg, cfg
        target = cfg.export or await asyncio.to_thread(read_pointer, cfg.follow)
        state = self._state
        if state is None or (target, cfg.ann, cfg.device) != (state.uri, state.ann, old.device):
            await self._swap(target, initial=state is None, why="config")
        if self._poller is not None and (cfg.follow, cfg.poll_s) != (old.follow, old.poll_s):
            self._poller.cancel()
            self._poller = None
        if cfg.follow and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._follow(cfg))

    async def _swap(self, uri: str, initial: bool = False, why: str = "config") -> bool:
        """Loads ``uri`` beside the serving export, then switches to it."""
        async with self._swap_lock:
            cfg, start = self._cfg, time.perf_counter()
            try:
                new = await asyncio.to_thread(load_state, uri, cfg.ann, cfg.device)
            except Exception as err:  # a bad export must not take the replica down
                self._last_swap = {
                    "export": uri,
                    "ok": False,
                    "why": why,
                    "error": str(err),
                    "at": time.time(),
                }
                if initial:
                    raise
                logger.error(f"swap to {uri} failed, still serving the old export: {err}")
                return False
            old, self._state = self._state, new  # the switch: one assignment
            self._last_swap = {
                "export": uri,
                "ok": True,
                "why": why,
                "from": old.export_id if old else None,
                "to": new.export_id,
                "seconds": round(time.perf_counter() - start, 3),
            }
            logger.info(f"serving {uri} ({new.export_id}), loaded in {new.load_s:.2f} s")
            return True

    async def _follow(self, cfg: ServingConfig) -> None:
        """Reads the pointer every ``poll_s`` and swaps when it names another export."""
        while True:
            await asyncio.sleep(cfg.poll_s)
            try:
                target = await asyncio.to_thread(read_pointer, cfg.follow)
            except Exception as err:
                logger.warning(f"pointer {cfg.follow}: {err}")
                continue
            state, failed = self._state, self._last_swap or {}
            if state is None or target == state.uri:
                continue
            # a target that failed is retried only every RETRY_FAILED_S (or when it changes)
            failed_here = failed.get("ok") is False and failed.get("export") == target
            if failed_here and time.time() < failed["at"] + max(RETRY_FAILED_S, cfg.poll_s):
                continue
            await self._swap(target, why="pointer")

    def check_health(self) -> None:
        if self._state is None:
            raise RuntimeError("no export loaded")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
    async def _score(self, queries: list[Any]) -> list[Any]:
        return score_queries(self._state, queries)  # blocks the loop on purpose (see above)

    async def __call__(self, request: Request) -> Response:
        path = request.scope["path"][len(request.scope.get("root_path", "")) :] or "/"
        path = path.rstrip("/") or "/"
        try:
            method = ROUTES.get(path)
            if method is None:
                raise RequestError(
                    404, "path", f"no route {path}; expected one of {', '.join(ROUTES)}"
                )
            if request.method != method:
                raise RequestError(405, "method", f"{path} takes {method}, not {request.method}")
            if path == "/healthz":
                return self._health()
            if path == "/info":
                return JSONResponse(self._info())
            body = parse_json(await self._read_body(request))
            if path == "/recommend":
                return JSONResponse(await self._recommend(parse_query(body, self._cfg)))
            queries = parse_batch(body, self._cfg)
            if self._state is None:
                raise RequestError(503, "export", "not loaded yet")
            answers = score_queries(self._state, queries) if queries else []
            for i, answer in enumerate(answers):
                if isinstance(answer, RequestError):
                    raise RequestError(answer.status, f"[{i}].{answer.field}", answer.message)
            return JSONResponse(answers)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as err:  # never let one request take the replica down
            logger.exception("request failed")
            return JSONResponse(
                {"error": f"internal error: {type(err).__name__}: {err}", "field": ""}, 500
            )

    async def _read_body(self, request: Request) -> bytes:
        cfg = self._cfg
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise RequestError(
                413, "body", f"{declared} bytes, more than the limit of {cfg.max_body_bytes}"
            )

        async def read() -> bytes:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > cfg.max_body_bytes:
                    raise RequestError(
                        413, "body", f"more than the limit of {cfg.max_body_bytes} bytes"
                    )
            return bytes(body)

        try:
            return await asyncio.wait_for(read(), cfg.read_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(
                408, "body", f"not received in full within {cfg.read_timeout_s:g} s"
            ) from None

    async def _recommend(self, query: Any) -> dict[str, Any]:
        if self._state is None:
            raise RequestError(503, "export", "not loaded yet")
        try:
            answer = await asyncio.wait_for(self._score(query), self._cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(
                503, "timeout", f"not scored within {self._cfg.request_timeout_s:g} s (overloaded)"
            ) from None
        if isinstance(answer, RequestError):
            raise answer
        return answer

    def _health(self) -> Response:
        state = self._state
        if state is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "export": state.tag()})

    def _info(self) -> dict[str, Any]:
        state = self._state
        if state is None:
            raise RequestError(503, "export", "not loaded yet")
        serving = {
            "export": state.uri,
            "export_id": state.export_id,
            "ann": state.ann,
            "loaded_at": state.loaded_at,
            "load_s": state.load_s,
            "config": self._cfg.to_dict(),
            "last_swap": self._last_swap,
            "replica": serve.get_replica_context().replica_id.unique_id,
        }
        return json.loads(json.dumps(state.export.manifest | {"serving": serving}, default=str))


def build_app(
    config: dict[str, Any] | ServingConfig,
    *,
    replicas: int = 1,
    cpus_per_replica: float = 0.5,
    gpus_per_replica: float = 0,
    max_ongoing_requests: int | None = None,
    access_log: bool = False,
) -> Any:
    """The Serve application (``Recommender`` bound with its options).

    Args:
        config: the ServingConfig (or its dict): the replicas' ``user_config``.
        replicas, cpus_per_replica, gpus_per_replica: Ray resources (fractions allowed).
        max_ongoing_requests: requests a replica takes at once (default 2 × max_batch_size,
            at least 64: Serve's default of 5 would cap every batch at 5).
        access_log: Serve's per-request log lines (off: they cost CPU on every request).
    """
    cfg = config if isinstance(config, ServingConfig) else serving_config(config)
    return Recommender.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=max_ongoing_requests or max(64, 2 * cfg.max_batch_size),
        user_config=cfg.to_dict(),
        logging_config={"enable_access_log": access_log},
    ).bind()


def app_builder(args: dict[str, Any]) -> Any:
    """For ``serve run fearec_dist.serve.online:app_builder export=DIR ann=true`` and Serve
    config files (``import_path``): ``args`` are ServingConfig keys plus the deployment options
    ``replicas``, ``cpus_per_replica``, ``gpus_per_replica``, ``max_ongoing_requests``,
    ``access_log``; strings are converted. A config file's ``user_config`` for the
    ``Recommender`` deployment replaces the ServingConfig part (and changing it later swaps in
    place)."""
    args = dict(args or {})
    options: dict[str, Any] = {}
    for key, kind in DEPLOYMENT_KEYS.items():
        if key in args:
            value = args.pop(key)
            if kind is bool:
                options[key] = str(value).lower() in ("true", "1", "yes")
            else:
                try:
                    options[key] = kind(value)
                except (TypeError, ValueError):
                    raise ValueError(f"{key}: expected a number, got {value!r}") from None
    return build_app(serving_config(args), **options)


def check_port_free(host: str, port: int) -> None:
    """A clear error before Serve's proxy fails to bind an address in use."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise ServeError(
                f"cannot listen on {host}:{port} ({err.strerror}); choose another --port or --host"
            ) from None


def start_app(app: Any, host: str, port: int, name: str = APP_NAME, timeout_s: float = 300) -> str:
    """Starts Serve's HTTP proxy on ``host:port`` (if Serve is not running yet) and deploys
    ``app`` at ``/``; returns its URL once the replicas have loaded the export."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix="/")
    deadline = time.time() + timeout_s
    while serve.status().applications[name].status != "RUNNING":
        if time.time() > deadline:
            raise ServeError(f"the application did not start within {timeout_s:g} s")
        time.sleep(0.2)
    return f"http://{host}:{port}"


def serve_forever(
    config: dict[str, Any],
    *,
    mode: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    say: Any = print,
    stop: threading.Event | None = None,
    **options: Any,
) -> None:
    """The CLI's ``serve``: joins (``mode="cluster"``) or starts (``"local"``) Ray, deploys the
    application, serves until SIGINT/SIGTERM (or ``stop``), then removes it: the whole Serve
    instance when Ray was started here, only this application on a shared cluster."""
    import ray

    cfg = serving_config(config)
    if not cfg.export and not cfg.follow:
        raise ServeError("serve needs --export URI or --follow POINTER")
    if mode == "local":
        check_port_free(host, port)
    stop = stop or threading.Event()
    started = connect_ray(mode, dashboard=False)
    # after ray.init, whose own SIGTERM handler would abort the process: a signal now stops
    # the loop below (or, during start-up, right after the application is up) and we clean up
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in signals}
    try:
        url = start_app(build_app(cfg, **options), host, port)
        what = cfg.export or f"the export named by {cfg.follow}"
        say(
            f"[fearec-dist] serving {what} at {url} (POST {url}/recommend, GET {url}/healthz); "
            "Ctrl-C stops"
        )
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
        say("[fearec-dist] stopping")
    finally:
        try:
            if mode == "local":
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
            if started:
                ray.shutdown()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
