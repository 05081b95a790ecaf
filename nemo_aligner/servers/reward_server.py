"""The reward server's HTTP app (FastAPI, served by uvicorn): GET /health and POST /score.

POST /score takes `{"prompts": [str], "responses": [str]}` and answers `{"rewards": [float]}` in
order. A bad request gets a 4xx with `{"detail": message}` and the server keeps serving:

    400  the body is not JSON
    401  a token is configured and the `Authorization: Bearer <token>` header is missing or wrong
    413  the body is over max_request_bytes, or it holds more than max_request_items items
    422  a field is missing, of the wrong type or unknown; prompts and responses differ in length;
         the lists are empty; an item is longer than reward_model.max_length tokens
    500  the reward function raised or returned a non-finite value (the message names the item)

GET /health is open (no token): `{"status": "ok", "scorer": ..., "requests": n, "items": n,
"batches": n, "max_batch_items": n, "max_batch_requests": n}`. GET /auth answers 200
(`{"auth": "ok" | "open"}`) when the request's token would be accepted by /score, else 401: a
client checks its token at start-up with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from nemo_aligner.config.reward_server import RewardServerConfig
from nemo_aligner.servers.batcher import DynamicBatcher, ScoringError
from nemo_aligner.servers.scorers import InvalidItemError, Scorer, build_scorer

logger = logging.getLogger(__name__)

FIELDS = ("prompts", "responses")


def build_app(scorer: Scorer, cfg: RewardServerConfig) -> FastAPI:
    """The FastAPI app serving `scorer` with the batching and limits of `cfg`."""
    batcher = DynamicBatcher(scorer, max_batch_size=cfg.batching.max_batch_size, max_wait_ms=cfg.batching.max_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="nemo_aligner reward server", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(err).__name__}: {err}"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "scorer": scorer.description, **dataclasses.asdict(batcher.stats)}

    @app.get("/auth")
    async def auth(request: Request) -> dict[str, str]:
        _check_auth(request, cfg.auth_token)
        return {"auth": "ok" if cfg.auth_token else "open"}

    @app.post("/score")
    async def score(request: Request) -> dict[str, list[float]]:
        _check_auth(request, cfg.auth_token)
        body = await _read_body(request, cfg.max_request_bytes)
        prompts, responses = parse_score_request(body, cfg.max_request_items)
        try:
            items = await asyncio.to_thread(scorer.prepare, prompts, responses)
        except InvalidItemError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        try:
            return {"rewards": await batcher.submit(items)}
        except ScoringError as err:
            raise HTTPException(status_code=500, detail=str(err)) from None

    return app


def _check_auth(request: Request, token: str | None) -> None:
    if token is None:
        return
    header = request.headers.get("authorization")
    if header is None or not header.startswith("Bearer "):
        raise HTTPException(status_code=401, detail="this server needs an 'Authorization: Bearer <token>' header",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(header[len("Bearer "):].encode(), token.encode()):
        raise HTTPException(status_code=401, detail="invalid token", headers={"WWW-Authenticate": "Bearer"})


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, read no further than `max_bytes` (also when the client sends no Content-Length)."""
    too_large = HTTPException(status_code=413, detail=f"the request body is larger than max_request_bytes={max_bytes}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_score_request(body: bytes, max_items: int) -> tuple[list[str], list[str]]:
    """`(prompts, responses)` of a /score body; `HTTPException` (400/413/422) naming what is wrong."""
    try:
        payload = json.loads(body)
    except ValueError as err:
        raise HTTPException(status_code=400, detail=f"the request body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise _unprocessable(f"the body must be a JSON object with keys {list(FIELDS)}, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise _unprocessable(f"unknown key(s) {unknown}; the body has exactly the keys {list(FIELDS)}")
    for key in FIELDS:
        if key not in payload:
            raise _unprocessable(f"missing key '{key}'")
        value = payload[key]
        if not isinstance(value, list):
            raise _unprocessable(f"'{key}' must be a list of strings, got {type(value).__name__}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise _unprocessable(f"'{key}'[{index}] must be a string, got {type(item).__name__}")
    prompts, responses = payload["prompts"], payload["responses"]
    if len(prompts) != len(responses):
        raise _unprocessable(f"'prompts' has {len(prompts)} items but 'responses' has {len(responses)}")
    if not prompts:
        raise _unprocessable("'prompts' and 'responses' are empty; send at least one item")
    if len(prompts) > max_items:
        raise HTTPException(status_code=413, detail=f"{len(prompts)} items is more than max_request_items={max_items}")
    return prompts, responses


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=message)


def serve(cfg: RewardServerConfig) -> None:
    """Build the scorer `cfg.reward_model` names and serve it on `cfg.host:cfg.port` until stopped."""
    scorer = build_scorer(cfg.reward_model)
    app = build_app(scorer, cfg)
    logger.info("reward server on http://%s:%d (batches of up to %d items, %.1f ms wait, auth %s)", cfg.host, cfg.port,
                cfg.batching.max_batch_size, cfg.batching.max_wait_ms, "on" if cfg.auth_token else "off")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", access_log=False)
