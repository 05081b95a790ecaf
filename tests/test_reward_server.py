"""Reward server and client: a real server process per mode (the tiny task's exact-match function,
and a tiny random Llama reward model), checked against rewards computed here; dynamic batching;
every bad request's 4xx; auth; client retries, timeouts and response checks against a stub server;
scoring on rank 0 with a broadcast."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import requests
import torch
import torch.distributed as dist
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from examples.tiny.task import exact_match_reward, make_problem, wrong_answer
from helpers import REPO, TINY_MODEL_DIR, _SHAPE, _tokenizer
from nemo_aligner.servers import RemoteRewardClient, RewardServerError, score_on_rank0_and_broadcast
from nemo_aligner.servers.batcher import DynamicBatcher, ScoringError
from nemo_aligner.servers.scorers import FunctionScorer, SequenceClassificationScorer

TOKEN = "s3cret-token"
MAX_ITEMS, MAX_BYTES, MAX_LENGTH = 16, 4096, 32


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _make_reward_model(path: str) -> str:
    """A random LlamaForSequenceClassification (num_labels=1) with a tokenizer; rewards of order 1."""
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(**_SHAPE, num_labels=1))
    with torch.no_grad():
        model.score.weight.mul_(200.0)  # the default 0.02-std head gives rewards too small to compare
    model.save_pretrained(path)
    _tokenizer(path)
    return path


class _Server:
    """A serve_reward_model.py process on a free port of 127.0.0.1, its output in a log file."""

    def __init__(self, log_path: str, *overrides: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "examples/nlp/gpt/serve_reward_model.py", f"port={self.port}", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"reward server exited {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        pytest.fail(f"reward server not healthy within {timeout_s}s:\n{self.log()}")

    def health(self) -> dict[str, Any]:
        answer = requests.get(f"{self.url}/health", timeout=5)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _make_reward_model(str(tmp_path_factory.mktemp("reward_model")))


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, reward_model_dir: str):
    """Both servers, started together so that their start-ups overlap; always stopped."""
    logs = tmp_path_factory.mktemp("server_logs")
    started = []
    try:
        started.append(_Server(str(logs / "function.log"), f"auth_token={TOKEN}", "batching.max_wait_ms=100",
                               f"max_request_items={MAX_ITEMS}", f"max_request_bytes={MAX_BYTES}"))
        started.append(_Server(str(logs / "model.log"), "reward_model.mode=sequence_classification",
                               f"reward_model.model_path={reward_model_dir}", f"reward_model.max_length={MAX_LENGTH}",
                               "batching.max_batch_size=4", "batching.max_wait_ms=50"))
        for server in started:
            server.wait_healthy()
        yield {"function": started[0], "model": started[1]}
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def function_server(servers) -> _Server:  # exact-match reward, auth token, small request limits
    return servers["function"]


@pytest.fixture(scope="module")
def model_server(servers) -> _Server:  # the tiny reward model, batches of up to 4 items
    return servers["model"]


def _client(server: _Server, **kwargs: Any) -> RemoteRewardClient:
    options = dict(timeout_s=10.0, max_retries=0, backoff_s=0.0, auth_token=TOKEN)
    options.update(kwargs)
    return RemoteRewardClient("127.0.0.1", server.port, **options)  # type: ignore[arg-type]


def _problems(n: int, seed: int) -> tuple[list[str], list[str], list[float]]:
    """n prompts, responses alternately right and wrong, and their exact-match rewards."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for i in range(n):
        prompt, answer = make_problem(rng)
        prompts.append(prompt)
        responses.append(answer if i % 2 == 0 else wrong_answer(answer, rng))
    return prompts, responses, [exact_match_reward(p, r) for p, r in zip(prompts, responses)]


def _run_threads(work, args: list[tuple]) -> list[Any]:
    """Runs work(*a) for each a in its own thread, released together; returns the results in order."""
    barrier = threading.Barrier(len(args))
    results: list[Any] = [None] * len(args)

    def target(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(*args[i])
        except Exception as err:  # surfaced by the caller's assertions
            results[i] = err

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(args))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_function_mode_scores_right_answers_1_and_wrong_answers_0(function_server: _Server) -> None:
    prompts, responses, expected = _problems(10, seed=0)
    assert _client(function_server).score(prompts, responses) == expected == [1.0, 0.0] * 5
    assert _client(function_server).score([], []) == []


def test_concurrent_requests_are_batched_and_answered_in_order(function_server: _Server) -> None:
    before = function_server.health()
    client = _client(function_server)
    cases = [_problems(1 + i % 3, seed=100 + i) for i in range(8)]
    results = _run_threads(lambda p, r: client.score(p, r), [(p, r) for p, r, _ in cases])
    assert results == [expected for _, _, expected in cases]
    after = function_server.health()
    assert after["requests"] - before["requests"] == 8
    assert after["items"] - before["items"] == sum(len(p) for p, _, _ in cases)
    assert after["batches"] - before["batches"] < 8, "no two concurrent requests shared a batch"
    assert after["max_batch_requests"] >= 2


def test_sequence_classification_rewards_match_the_model(model_server: _Server, reward_model_dir: str) -> None:
    rng = random.Random(3)
    batches = []
    for n in (10, 3, 1, 5):  # 10 items > max_batch_size=4: split over batches; others padded together
        prompts = [make_problem(rng)[0] for _ in range(n)]
        batches.append((prompts, [str(rng.randrange(10 ** rng.randint(1, 4))) for _ in range(n)]))
    client = _client(model_server, auth_token=None)
    before = model_server.health()
    results = _run_threads(lambda p, r: client.score(p, r), batches)
    after = model_server.health()

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = LlamaForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32).eval()
    for (prompts, responses), rewards in zip(batches, results):
        assert isinstance(rewards, list), rewards
        with torch.no_grad():  # one unpadded sequence at a time: the independent reference
            expected = [model(input_ids=torch.tensor([tokenizer(p + r)["input_ids"]])).logits[0, 0].item()
                        for p, r in zip(prompts, responses)]
        torch.testing.assert_close(torch.tensor(rewards), torch.tensor(expected), atol=1e-5, rtol=0)
    flat = [reward for rewards in results for reward in rewards]
    assert max(flat) - min(flat) > 0.1, "rewards should differ between sequences"
    assert after["max_batch_items"] <= 4 and after["batches"] - before["batches"] >= 5  # 19 items, <= 4 per batch


def _post(server: _Server, body: bytes | None = None, headers: dict[str, str] | None = None,
          **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
    return requests.post(f"{server.url}/score", data=body, headers=headers, timeout=10, **kwargs)


_GOOD = {"prompts": ["1+2="], "responses": ["3"]}
_BAD_REQUESTS = {
    "malformed json": (b'{"prompts": [', {}, 400, "not valid JSON"),
    "not an object": (b'["1+2="]', {}, 422, "must be a JSON object"),
    "missing responses": (json.dumps({"prompts": ["1+2="]}).encode(), {}, 422, "missing key 'responses'"),
    "prompts not a list": (json.dumps({"prompts": "1+2=", "responses": ["3"]}).encode(), {}, 422,
                           "'prompts' must be a list of strings, got str"),
    "response not a string": (json.dumps({"prompts": ["1+2="], "responses": [3]}).encode(), {}, 422,
                              "'responses'[0] must be a string, got int"),
    "unknown key": (json.dumps({**_GOOD, "answers": ["3"]}).encode(), {}, 422, "unknown key(s) ['answers']"),
    "length mismatch": (json.dumps({"prompts": ["1+2=", "2+2="], "responses": ["3"]}).encode(), {}, 422,
                        "'prompts' has 2 items but 'responses' has 1"),
    "empty lists": (json.dumps({"prompts": [], "responses": []}).encode(), {}, 422, "empty"),
    "too many items": (json.dumps({"prompts": ["1+2="] * (MAX_ITEMS + 1), "responses": ["3"] * (MAX_ITEMS + 1)}).encode(),
                       {}, 413, f"{MAX_ITEMS + 1} items is more than max_request_items={MAX_ITEMS}"),
    "body too large": (json.dumps({"prompts": ["1+2=" * MAX_BYTES], "responses": ["3"]}).encode(), {}, 413,
                       f"larger than max_request_bytes={MAX_BYTES}"),
    "no token": (json.dumps(_GOOD).encode(), {"Authorization": ""}, 401, "Authorization: Bearer"),
    "wrong token": (json.dumps(_GOOD).encode(), {"Authorization": "Bearer s3cret-tokem"}, 401, "invalid token"),
    "reward function raises": (json.dumps({"prompts": ["1+2=", "2+2=", "no problem"], "responses": ["3"] * 3}).encode(),
                               {}, 500, "item 2: the reward function raised ValueError"),
}


@pytest.mark.parametrize("case", sorted(_BAD_REQUESTS))
def test_bad_request_gets_its_status_and_the_server_keeps_serving(function_server: _Server, case: str) -> None:
    body, headers, status, message = _BAD_REQUESTS[case]
    answer = _post(function_server, body, headers)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"]
    assert function_server.health()["status"] == "ok"
    good = _post(function_server, json.dumps(_GOOD).encode())
    assert good.status_code == 200 and good.json() == {"rewards": [1.0]}


def test_body_too_large_without_content_length_is_rejected(function_server: _Server) -> None:
    chunks = (b'{"prompts": ["' + b"1" * 1024 for _ in range(8))  # a generator: sent chunked, no Content-Length
    answer = _post(function_server, chunks)  # type: ignore[arg-type]
    assert answer.status_code == 413 and "max_request_bytes" in answer.json()["detail"]


def test_over_long_item_is_rejected_not_truncated(model_server: _Server) -> None:
    client = _client(model_server, auth_token=None)
    with pytest.raises(RewardServerError, match=rf"HTTP 422.*item 1: prompt \+ response is \d+ tokens, more than "
                                                rf"reward_model.max_length={MAX_LENGTH}") as caught:
        client.score(["1+2=", "".join(random.Random(0).choices("0123456789+-=", k=200)), "5-3="], ["3", "46", "2"])
    assert caught.value.status_code == 422
    assert len(client.score(["1+2="], ["3"])) == 1


def test_a_causal_lm_is_not_served_as_a_reward_model() -> None:
    with pytest.raises(ValueError, match=r"not a sequence-classification reward model.*lacks \['score.weight'\]"):
        SequenceClassificationScorer(TINY_MODEL_DIR, max_length=16, device=torch.device("cpu"))


def test_auth_token_is_required_when_configured(function_server: _Server) -> None:
    for token in (None, "wrong"):
        with pytest.raises(RewardServerError, match=r"HTTP 401") as caught:
            _client(function_server, auth_token=token).score(["1+2="], ["3"])
        assert caught.value.status_code == 401
    assert requests.get(f"{function_server.url}/health", timeout=5).status_code == 200  # health stays open
    assert _client(function_server).wait_until_healthy(5)["status"] == "ok"


def test_a_wrong_token_is_found_when_the_reward_source_is_built(function_server: _Server, model_server: _Server) -> None:
    from nemo_aligner.config.rs import RemoteEndpoint, RemoteRMConfig, RewardConfig, RewardSource
    from nemo_aligner.servers.rewards import build_reward

    def remote(server: _Server, token: str | None) -> RemoteRMConfig:
        return RemoteRMConfig(reward_model=RemoteEndpoint(ip="127.0.0.1", port=server.port), timeout_s=5.0,
                              max_retries=0, backoff_s=0.0, auth_token=token)

    source = RewardConfig(source=RewardSource.remote)
    for token, given in ((None, "no token"), ("wrong", "its token")):
        with pytest.raises(RewardServerError, match=rf"refused {given}; set remote_rm.auth_token to the server's"):
            build_reward(source, remote(function_server, token), None)
    assert build_reward(source, remote(function_server, TOKEN), None).client.score(["1+2="], ["3"]) == [1.0]
    _client(model_server, auth_token=None).check_token()  # a server without a token is open


def test_batcher_fails_only_the_request_with_a_non_finite_reward() -> None:
    async def run() -> list[Any]:
        batcher = DynamicBatcher(FunctionScorer(lambda p, r: float(r), "float"), max_batch_size=8, max_wait_ms=50)
        batcher.start()
        try:
            return await asyncio.gather(batcher.submit([("a", "1"), ("b", "nan")]), batcher.submit([("c", "2.5")]),
                                        return_exceptions=True)
        finally:
            await batcher.stop()

    bad, good = asyncio.run(run())
    assert isinstance(bad, ScoringError) and "item 1: the reward is nan, not a finite number" in str(bad)
    assert good == [2.5]


def test_client_retries_then_names_the_address_when_nothing_listens() -> None:
    port = _free_port()
    client = RemoteRewardClient("127.0.0.1", port, timeout_s=1.0, max_retries=2, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(RewardServerError, match=rf"http://127.0.0.1:{port}.*failed after 3 attempts; last error: "
                                                r"ConnectionError"):
        client.score(["1+2="], ["3"])
    assert time.monotonic() - start >= 0.03  # backoff 0.01 then 0.02
    with pytest.raises(RewardServerError, match=rf"http://127.0.0.1:{port} was not healthy within 0.3s"):
        client.wait_until_healthy(0.3)


class _Stub:
    """An HTTP server answering POST /score from a script of (status, body, delay_s); counts requests."""

    def __init__(self, script: list[tuple[int, bytes, float]]) -> None:
        self.script, self.requests = script, 0
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers["Content-Length"]))
                status, body, delay = stub.script[min(stub.requests, len(stub.script) - 1)]
                stub.requests += 1
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client timed out and went away
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def client(self, **kwargs: Any) -> RemoteRewardClient:
        options = dict(timeout_s=2.0, max_retries=2, backoff_s=0.01)
        options.update(kwargs)
        return RemoteRewardClient("127.0.0.1", self.port, **options)  # type: ignore[arg-type]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    stubs: list[_Stub] = []

    def make(*script: tuple[int, bytes, float]) -> _Stub:
        stubs.append(_Stub(list(script)))
        return stubs[-1]

    yield make
    for s in stubs:
        s.close()


@pytest.mark.parametrize("body, message", [
    (b'{"rewards": [1.0, 0.0]}', r"a batch of 3 items with 2 rewards; expected exactly one per item"),
    (b'{"rewards": [1.0, NaN, 0.0]}', r"a batch of 3 items with reward 1 = nan, which is not finite"),
    (b'{"rewards": [1.0, "x", 0.0]}', r"a batch of 3 items with reward 1 = 'x', which is not a number"),
    (b'{"scores": [1.0, 1.0, 0.0]}', r"a batch of 3 items with no 'rewards' list"),
])
def test_client_rejects_an_invalid_response_naming_the_batch(stub, body: bytes, message: str) -> None:
    server = stub((200, body, 0.0))
    with pytest.raises(RewardServerError, match=rf"http://127.0.0.1:{server.port} answered {message}"):
        server.client().score(["a", "b", "c"], ["1", "2", "3"])
    assert server.requests == 1


def test_client_retries_5xx_and_raises_4xx_at_once(stub) -> None:
    flaky = stub((503, b'{"detail": "busy"}', 0.0), (500, b"oops", 0.0), (200, b'{"rewards": [0.5]}', 0.0))
    assert flaky.client().score(["a"], ["b"]) == [0.5] and flaky.requests == 3
    down = stub((503, b'{"detail": "busy"}', 0.0))
    with pytest.raises(RewardServerError, match=r"failed after 2 attempts; last error: HTTP 503: busy"):
        down.client(max_retries=1).score(["a"], ["b"])
    rejecting = stub((422, b'{"detail": "missing key \'responses\'"}', 0.0))
    with pytest.raises(RewardServerError, match=r"rejected POST /score \(HTTP 422\): missing key 'responses'"):
        rejecting.client().score(["a"], ["b"])
    assert rejecting.requests == 1


def test_client_times_out_and_retries(stub) -> None:
    slow = stub((200, b'{"rewards": [0.5]}', 0.5))
    with pytest.raises(RewardServerError, match=r"failed after 2 attempts; last error: timed out after 0.1s"):
        slow.client(timeout_s=0.1, max_retries=1).score(["a"], ["b"])
    assert slow.requests == 2


@pytest.fixture
def gloo_group():
    """A one-process gloo group (the world's, made here when no test made one before)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield dist.new_group(ranks=[0], backend="gloo")
    if created:
        dist.destroy_process_group()


def test_score_on_rank0_and_broadcast(function_server: _Server, gloo_group) -> None:
    prompts, responses, expected = _problems(4, seed=7)
    assert score_on_rank0_and_broadcast(_client(function_server), prompts, responses, gloo_group) == expected
    assert score_on_rank0_and_broadcast(_client(function_server), prompts, responses, None) == expected
    unreachable = RemoteRewardClient("127.0.0.1", _free_port(), timeout_s=1.0, max_retries=0, backoff_s=0.0)
    with pytest.raises(RewardServerError, match=r"scoring on rank 0 failed: RewardServerError: .*http://127.0.0.1"):
        score_on_rank0_and_broadcast(unreachable, prompts, responses, gloo_group)


def test_rs_training_through_the_server_equals_the_in_process_reward(function_server: _Server, llama_dir: str, tmp_path) -> None:
    """The one switch (reward.source=remote) changes where scores come from, not what is trained."""
    from test_rs import _config, _trainer

    from nemo_aligner.utils.metrics import read_metrics
    from nemo_aligner.servers.rewards import FunctionReward, RemoteReward

    prompts = tmp_path / "prompts.jsonl"
    rng = random.Random(1)
    problems = [make_problem(rng)[0] for _ in range(16)]
    prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in problems))
    sources = {"remote": RemoteReward(_client(function_server, auth_token=TOKEN), None),
               "local": FunctionReward(exact_match_reward)}
    records = {}
    for name, reward in sources.items():
        _trainer(_config(llama_dir, str(prompts), str(tmp_path / name), max_steps=2), reward=reward).fit()
        records[name] = read_metrics(str(tmp_path / name / "metrics.jsonl"), "train")
    assert len(records["remote"]) == 2
    for remote, local in zip(records["remote"], records["local"]):
        for key in ("reward_mean", "kept_reward_mean", "loss"):
            assert remote[key] == pytest.approx(local[key], abs=1e-6), key
