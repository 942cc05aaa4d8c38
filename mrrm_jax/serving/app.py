"""The reward server's HTTP API (FastAPI): POST /score, POST /get_reward, GET /health, GET /metrics.

The event loop only parses, validates and waits: media decoding and formatting run in a thread pool,
the model in the batcher's one thread. Every failure is a JSON error `{"error", "field"}` with a 4xx
status (5xx for a failure of ours: 504 past a request's deadline naming the groups not scored, 503 when
the model thread is not running), and the server goes on serving. Every response gets a score: a blank
one (empty, whitespace) the group's floor (`groups.with_blank_floor`), reported in the answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from mrrm_jax.serving import groups as groups_lib
from mrrm_jax.serving import media_refs, templates
from mrrm_jax.serving.batcher import Batcher, ModelDown, TooLarge
from mrrm_jax.serving.metrics import ServerMetrics

MAX_TEXT = 200_000  # characters of one prompt or response; longer is refused by validation (422)
ROUTES = ("/score", "/get_reward", "/health", "/metrics")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    media_root: str | None = None
    api_key: str | None = None
    mode: str = "multi"  # or "single": one pass per response (the baseline)
    reward: str = "raw"  # /get_reward's rewards: raw scores, or "zscore" within the group
    group_size: int = 0  # > 0: /get_reward buffers entries across requests until a group has this many
    group_timeout_s: float = 30.0
    request_timeout_s: float = 120.0
    max_body_bytes: int = 64 << 20
    workers: int = 4


class RequestError(Exception):
    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.status, self.field = status, field


# -- bodies --------------------------------------------------------------------------------------

class Group(BaseModel):
    prompt: str = Field(max_length=MAX_TEXT)
    responses: list[str] = Field(min_length=1)
    image: str | list[str] | None = None
    video: str | None = None


class ScoreRequest(BaseModel):
    groups: list[Group] = Field(min_length=1)


class GroupScores(BaseModel):
    scores: list[float]
    blank: list[int]  # indices of blank responses, scored at the group's floor


class ScoreResponse(BaseModel):
    groups: list[GroupScores]


class RewardRequest(BaseModel):
    query: list[str]  # [] is answered with empty lists (OpenRLHF < 0.11.2 sends it to all but the first server)
    prompts: list[str] | None = None
    labels: list[Any] | None = None


class RewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


# -- the app -------------------------------------------------------------------------------------

class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413 before it is all read."""

    class _TooLong(Exception):
        pass

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise self._TooLong
            return message

        try:
            await self.app(scope, limited, send)
        except self._TooLong:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        response = JSONResponse({"error": f"request body over {self.limit} bytes", "field": "body"}, 413)
        await response(scope, receive, send)


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status)


def create_app(model, batcher: Batcher, settings: ServeSettings, metrics: ServerMetrics) -> FastAPI:
    app = FastAPI(title="mrrm_jax reward server")
    app.state.ready = False
    prep_pool = concurrent.futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="prepare")
    keep_frames = model.processor.frame_indices
    special = groups_lib.special_token_pattern(model.processor.tokenizer)
    metrics.queue_depth.set_function(batcher.queue_depth)
    metrics.programs.set_function(lambda: len(model.programs))

    def authorised(authorization: str | None = Header(default=None)) -> None:
        if settings.api_key is not None and authorization != f"Bearer {settings.api_key}":
            raise RequestError(401, "Authorization", "missing or wrong bearer token")

    def ready() -> None:
        if not app.state.ready:
            raise RequestError(503, None, "warming up: the model programs are still compiling")

    def prepare(prompt: str, responses: list[str], images: list[str], video: str | None, field: str) -> list[dict]:
        """Model examples of one group (decoding and formatting, in a worker thread)."""
        try:
            loaded = media_refs.load(images, video, settings.media_root, field, keep_frames)
        except media_refs.RefError as error:
            raise RequestError(400, error.field, str(error)) from error
        try:
            examples = model.examples(prompt, responses, settings.mode, **loaded)
        except (ValueError, TypeError) as error:
            raise RequestError(400, field, f"{field}: {error}") from error
        for example in examples:
            try:
                batcher.check(example)
            except TooLarge as error:
                raise RequestError(413, field, f"{field}: {error}") from error
        return examples

    async def score_group(prompt, responses, images, video, field) -> np.ndarray:
        """Scores [N] of one group, its blank responses at the floor."""
        answered_a = groups_lib.answered(responses)
        scores_a = np.zeros(0)
        if answered_a:
            examples = await asyncio.get_running_loop().run_in_executor(
                prep_pool, prepare, prompt, [responses[i] for i in answered_a], images, video, field)
            parts = await asyncio.gather(*(asyncio.wrap_future(batcher.submit(e)) for e in examples))
            scores_a = np.concatenate(parts).astype(np.float64)
            if not np.isfinite(scores_a).all():
                raise RequestError(500, field, f"{field}: the model gave a non-finite score {scores_a.tolist()}")
        metrics.blank_responses.inc(len(responses) - len(answered_a))
        return groups_lib.with_blank_floor(len(responses), answered_a, scores_a)

    buffer = _GroupBuffer(score_group, settings.group_size, settings.group_timeout_s)

    async def by_deadline(works: dict[str, Any]) -> list:
        """The results of `works` (what each is, for errors -> awaitable), in order, within the request's
        deadline. The first failure in request order is the answer; past the deadline a 504 names what
        is unfinished (a 503 if the model thread has stopped)."""
        tasks = {name: asyncio.ensure_future(work) for name, work in works.items()}
        if not tasks:
            return []
        _, pending = await asyncio.wait(tasks.values(), timeout=settings.request_timeout_s,
                                        return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()  # a cancelled group is skipped by the model thread
        for task in tasks.values():
            if task not in pending and task.exception() is not None:
                raise task.exception()
        if pending:
            if not batcher.alive():
                raise ModelDown(f"the model thread is not running ({batcher.stopped_by})")
            names = [name for name, task in tasks.items() if task in pending]
            raise RequestError(504, names[0].split(" ")[0], f"{', '.join(names)}: not scored within "
                               f"{settings.request_timeout_s} s (the model has been on its current batch for "
                               f"{batcher.busy_s():.1f} s; {batcher.queue_depth()} examples queued)")
        return [task.result() for task in tasks.values()]

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.monotonic()
        response = await call_next(request)
        # Only our routes as labels: a label per unknown path would let clients grow the registry.
        endpoint = request.url.path if request.url.path in ROUTES else "other"
        metrics.requests.labels(endpoint).inc()
        metrics.latency.labels(endpoint).observe(time.monotonic() - start)
        if response.status_code >= 400:
            metrics.errors.labels(str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return _error(error.status, str(error), error.field)

    @app.exception_handler(ModelDown)
    async def model_down(request: Request, error: ModelDown):
        return _error(503, str(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        field = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
        return _error(422, f"{field}: {first.get('msg', 'invalid request')}", field)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        return _error(500, f"internal error: {type(error).__name__}: {error}")

    @app.get("/health")
    async def health():
        """Answered on the event loop, never behind the model: 503 while warming up, once the model
        thread has stopped, or while one batch has held it longer than a request may wait."""
        if not app.state.ready:
            return _error(503, "warming up")
        if not batcher.alive():
            return _error(503, f"the model thread is not running ({batcher.stopped_by})")
        busy_s = batcher.busy_s()
        if busy_s > settings.request_timeout_s:
            return _error(503, f"stalled: the model has been on one batch for {busy_s:.0f} s")
        return {"status": "ready", "busy_s": round(busy_s, 3), "queue_depth": batcher.queue_depth(),
                "compiled_programs": len(model.programs)}

    @app.get("/metrics", dependencies=[Depends(authorised)])
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/score", response_model=ScoreResponse, dependencies=[Depends(authorised), Depends(ready)])
    async def score(body: ScoreRequest):
        def images(group: Group) -> list[str]:
            return [] if group.image is None else [group.image] if isinstance(group.image, str) else group.image

        results = await by_deadline({f"groups[{i}]": score_group(g.prompt, g.responses, images(g), g.video,
                                                                   f"groups[{i}]") for i, g in enumerate(body.groups)})
        return {"groups": [{"scores": scores_n.tolist(), "blank": [j for j, r in enumerate(g.responses) if groups_lib.blank(r)]}
                           for g, scores_n in zip(body.groups, results)]}

    @app.post("/get_reward", response_model=RewardResponse, dependencies=[Depends(authorised), Depends(ready)])
    async def get_reward(body: RewardRequest):
        count = len(body.query)
        for name in ("prompts", "labels"):
            value = getattr(body, name)
            if value is not None and len(value) != count:
                raise RequestError(422, name, f"{name}: {len(value)} entries for {count} queries")
        entries, rules = [], []
        for i, query in enumerate(body.query):
            try:
                label = groups_lib.parse_label(body.labels[i] if body.labels else None, f"labels[{i}]")
            except ValueError as error:
                raise RequestError(400, f"labels[{i}]", str(error)) from error
            raw_prompt = body.prompts[i] if body.prompts else None
            response = groups_lib.extract_response(query, raw_prompt, special)
            prompt, rule = templates.question(raw_prompt or "", special)
            entries.append((groups_lib.group_key(prompt, label), prompt, response, label))
            rules.append(rule)
        futures = buffer.submit(entries)
        results = await by_deadline({f"query[{i}] ({buffer.describe(entry[0])})": future
                                     for i, (entry, future) in enumerate(zip(entries, futures))})
        rewards = [r[2] if settings.reward == "zscore" else r[0] for r in results]
        # OpenRLHF logs the mean of each extra_logs list: one-hot rules read as the share of each rule.
        return {"rewards": rewards, "scores": [r[1] for r in results],
                "extra_logs": {"raw_score": [r[0] for r in results], "group_size": [float(r[3]) for r in results],
                               "blank_response": [float(groups_lib.blank(e[2])) for e in entries],
                               **{f"prompt_rule/{name}": [float(rule == name) for rule in rules]
                                  for name in templates.RULES}}}

    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    return app


class _GroupBuffer:
    """Entries of /get_reward grouped by key and scored a group at a time: within one request
    (`group_size` 0), or across requests until `group_size` entries of a key have arrived or
    `timeout_s` has passed since the first (OpenRLHF and verl send one sample per request).
    Each entry resolves to (raw score, within-group softmax, within-group z-score, group size)."""

    def __init__(self, score_group, group_size: int, timeout_s: float):
        self.score_group, self.group_size, self.timeout_s = score_group, group_size, timeout_s
        self.waiting: dict[tuple, list[tuple[str, dict, str, asyncio.Future]]] = {}
        self.tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    def describe(self, key: tuple) -> str:
        """A group key for an error, with how many of its entries have arrived while it waits."""
        name = f"group {key[1]!r}" if key[0] == "group" else f"prompt {key[1][:60]!r}"
        waiting = self.waiting.get(key)
        return f"{name}, {len(waiting)} of {self.group_size} arrived" if waiting and self.group_size else name

    def submit(self, entries) -> list[asyncio.Future]:
        """One future per entry: (raw score, softmax, z-score, group size) once its group is scored."""
        loop = asyncio.get_running_loop()
        futures = []
        for key, prompt, response, label in entries:
            future = loop.create_future()
            futures.append(future)
            group = self.waiting.setdefault(key, [])
            group.append((prompt, label, response, future))
            if len(group) == 1 and self.group_size:
                loop.call_later(self.timeout_s, self._flush, key, group)
            if self.group_size and len(group) >= self.group_size:
                self._flush(key, group)
        if not self.group_size:
            for key in dict.fromkeys(e[0] for e in entries):
                self._flush(key, self.waiting[key])
        return futures

    def _flush(self, key: tuple, group: list) -> None:
        if self.waiting.get(key) is not group:
            return  # already scored (full before its timeout)
        del self.waiting[key]
        task = asyncio.ensure_future(self._score(group))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _score(self, group: list) -> None:
        prompt, label = group[0][0], group[0][1]
        images = label.get("image") or []
        images = [images] if isinstance(images, str) else images
        try:
            scores_n = await self.score_group(prompt, [e[2] for e in group], images, label.get("video"),
                                              "labels" if label else "query")
        except Exception as error:  # every waiting request gets this group's error
            for *_, future in group:
                if not future.done():
                    future.set_exception(error)
            return
        probs_n, z_n = groups_lib.softmax(scores_n), groups_lib.zscore(scores_n)
        for i, (*_, future) in enumerate(group):
            if not future.done():
                future.set_result((float(scores_n[i]), float(probs_n[i]), float(z_n[i]), len(group)))
