"""Client of the reward server: scores (prompt, response) pairs over HTTP, with retries.

    client = RemoteRewardClient("10.0.0.5", 5555, timeout_s=60, max_retries=3, backoff_s=1.0)
    client.wait_until_healthy(timeout_s=300)
    rewards = client.score(prompts, responses)                 # one float per pair, in order
    rewards = score_on_rank0_and_broadcast(client, prompts, responses, group)   # under torchrun

Connection errors, timeouts and 5xx answers are retried with exponential backoff
(`backoff_s`, 2 x `backoff_s`, ...); a 4xx answer means the request itself is wrong, so it raises
at once with the server's message. Every failure is a `RewardServerError` naming the server.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Sequence

import requests
import torch.distributed as dist

from nemo_aligner.utils.errors import InputError

_RETRIED = (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError)


class RewardServerError(RuntimeError, InputError):
    """The reward server could not be reached, rejected a request, or answered something invalid.

    Attributes:
        status_code: the HTTP status of a rejected request (4xx), else None.
    """

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class RemoteRewardClient:
    """Scores pairs on a reward server at `http://host:port`. Safe to share between threads.

    Args:
        host: the server's host name or IP address.
        port: its port.
        timeout_s: the limit on connecting and on waiting for an answer, per attempt.
        max_retries: attempts after the first one on connection errors, timeouts and 5xx answers.
        backoff_s: the wait before the first retry; it doubles for each further retry.
        auth_token: the server's shared secret, sent as `Authorization: Bearer <token>`.
    """

    def __init__(self, host: str, port: int, *, timeout_s: float, max_retries: int, backoff_s: float,
                 auth_token: str | None = None) -> None:
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError(f"RemoteRewardClient needs timeout_s > 0, max_retries >= 0 and backoff_s >= 0; got "
                             f"timeout_s={timeout_s}, max_retries={max_retries}, backoff_s={backoff_s}")
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._headers = {"Authorization": f"Bearer {auth_token}"} if auth_token is not None else {}
        self._local = threading.local()  # one requests.Session (connection pool) per thread

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The reward of each (prompt, response) pair, in order.

        Raises:
            ValueError: prompts and responses differ in length.
            RewardServerError: the server rejected the batch (4xx), kept failing, or answered
                something other than one finite number per pair.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; they must pair up")
        if not prompts:
            return []
        payload = self._request("POST", "/score", {"prompts": list(prompts), "responses": list(responses)})
        return self._check_rewards(payload, len(prompts))

    def wait_until_healthy(self, timeout_s: float) -> dict[str, Any]:
        """Polls GET /health until it answers 200 (returns its JSON) or `timeout_s` passes (raises)."""
        deadline = time.monotonic() + timeout_s
        last = "no attempt made"
        while True:
            remaining = deadline - time.monotonic()
            try:
                answer = self._session().get(f"{self.url}/health", timeout=max(0.05, min(self.timeout_s, remaining)))
                if answer.status_code == 200:
                    return answer.json()
                last = f"HTTP {answer.status_code}: {_detail(answer)}"
            except (*_RETRIED, ValueError) as err:
                last = f"{type(err).__name__}: {err}"
            if time.monotonic() + 0.1 > deadline:
                raise RewardServerError(f"reward server {self.url} was not healthy within {timeout_s}s; last error: {last}")
            time.sleep(0.1)

    def check_token(self) -> None:
        """Raises RewardServerError, naming remote_rm.auth_token, unless the server accepts this
        client's token (or needs none): a wrong token is found at start-up, not at the first step."""
        try:
            self._request("GET", "/auth", None)
        except RewardServerError as err:
            if err.status_code != 401:
                raise
            given = "no token" if not self._headers else "its token"
            raise RewardServerError(f"reward server {self.url} refused {given}; set remote_rm.auth_token to the "
                                    f"server's auth_token ({err})", status_code=401) from None

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _request(self, method: str, path: str, payload: dict[str, Any] | None) -> Any:
        attempts = self.max_retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                answer = self._session().request(method, self.url + path, json=payload, headers=self._headers,
                                                 timeout=self.timeout_s)
            except requests.Timeout as err:
                last = f"timed out after {self.timeout_s}s ({err})"
                continue
            except _RETRIED as err:
                last = f"{type(err).__name__}: {err}"
                continue
            if answer.status_code >= 500:
                last = f"HTTP {answer.status_code}: {_detail(answer)}"
                continue
            if answer.status_code >= 400:
                raise RewardServerError(f"reward server {self.url} rejected {method} {path} (HTTP {answer.status_code}): "
                                        f"{_detail(answer)}", status_code=answer.status_code)
            try:
                return answer.json()
            except ValueError:
                raise RewardServerError(f"reward server {self.url} answered {method} {path} with a body that is not "
                                        f"JSON: {answer.text[:200]!r}") from None
        raise RewardServerError(f"reward server {self.url}: {method} {path} failed after {attempts} attempts; "
                                f"last error: {last}")

    def _check_rewards(self, payload: Any, n: int) -> list[float]:
        where = f"reward server {self.url} answered a batch of {n} items with"
        rewards = payload.get("rewards") if isinstance(payload, dict) else None
        if not isinstance(rewards, list):
            raise RewardServerError(f"{where} no 'rewards' list: {str(payload)[:200]}")
        if len(rewards) != n:
            raise RewardServerError(f"{where} {len(rewards)} rewards; expected exactly one per item")
        for index, reward in enumerate(rewards):
            if isinstance(reward, bool) or not isinstance(reward, (int, float)):
                raise RewardServerError(f"{where} reward {index} = {reward!r}, which is not a number")
            if not math.isfinite(reward):
                raise RewardServerError(f"{where} reward {index} = {reward}, which is not finite")
        return [float(reward) for reward in rewards]


def _detail(answer: requests.Response) -> str:
    """The server's `detail` message, or the start of the body when it has none."""
    try:
        detail = answer.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail is not None else answer.text[:200]


def score_on_rank0_and_broadcast(client: RemoteRewardClient, prompts: Sequence[str], responses: Sequence[str],
                                 group: dist.ProcessGroup | None = None) -> list[float]:
    """Scores on the group's first rank only and broadcasts the rewards to every rank of `group`.

    Every rank must call it (it is a collective); only the first rank's `prompts` and `responses`
    are used. If scoring fails there, the error message is broadcast and every rank raises.

    Args:
        group: the process group; None for the default (world) group.

    Raises:
        RewardServerError: on every rank, when the first rank could not score the batch.
    """
    group = group if group is not None else dist.group.WORLD
    src = dist.get_global_rank(group, 0)
    error: BaseException | None = None
    if dist.get_rank() == src:
        try:
            message: list[Any] = [("ok", client.score(prompts, responses))]
        except Exception as err:  # sent to the other ranks, then raised everywhere
            error = err
            message = [("error", f"{type(err).__name__}: {err}")]
    else:
        message = [None]
    dist.broadcast_object_list(message, src=src, group=group)
    status, value = message[0]
    if status == "error":
        raise RewardServerError(f"scoring on rank {src} failed: {value}") from error
    return value
