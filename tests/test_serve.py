"""The reward server on loopback: /score and /get_reward equal the scoring command line, grouping across
requests, dynamic batching without compiling on the request path, and bad requests as 4xx JSON."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import itertools
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from mrrm_jax.data import media, packing
from mrrm_jax.scoring.reward_model import score_file
from mrrm_jax.serving import groups
from mrrm_jax.serving.app import ServeSettings, create_app
from mrrm_jax.serving.batcher import Batcher
from mrrm_jax.serving.metrics import ServerMetrics
from tests.benchmark_files import ANSWERS, image

BUDGET = packing.RowBudget(row_tokens=1024, row_crops=16, row_pooled=16 * 25, row_examples=4, max_responses=8)


@contextlib.contextmanager
def serve(model, max_rows=2, max_wait_s=0.02, deterministic=False, **settings):
    """The app with its own batcher on a free loopback port, in this process; yields the base URL."""
    metrics = ServerMetrics()
    batcher = Batcher(model, BUDGET, max_rows, max_wait_s, metrics.on_batch, deterministic=deterministic)
    app = create_app(model, batcher, ServeSettings(**settings), metrics)
    batcher.warm_up()
    batcher.start()
    app.state.ready = True
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        batcher.stop()


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    image(1, (150, 100)).save(root / "a.png")
    image(2, (90, 120)).save(root / "b.jpg")
    media.write_mp4(root / "clip.mp4", np.random.RandomState(3).randint(0, 256, (6, 48, 64, 3), np.uint8), 2.0)
    (root / "sub").mkdir()
    (root / "sub" / "escape.png").symlink_to("/etc/hostname")
    return root


@pytest.fixture(scope="module")
def url(model, media_root):
    with serve(model, media_root=str(media_root)) as base:
        yield base


def _data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


GROUPS = [
    {"prompt": "Which answer fits?", "responses": ANSWERS},
    {"prompt": "Describe the picture.", "responses": ANSWERS[:3], "image": "a.png"},
    {"prompt": "Compare the two pictures.", "responses": ANSWERS[1:], "image": ["a.png", "b.jpg"]},
    {"prompt": "What happens?", "responses": ANSWERS[:2], "video": "clip.mp4"},
]


def test_score_endpoint_equals_the_scoring_command_line(model, url, media_root, tmp_path):
    programs = len(model.programs)
    inline = {**GROUPS[1], "image": _data_uri(media_root / "a.png")}
    bare = {**GROUPS[1], "image": base64.b64encode((media_root / "a.png").read_bytes()).decode()}
    reply = httpx.post(f"{url}/score", json={"groups": GROUPS + [inline, bare]}, timeout=60)
    assert reply.status_code == 200, reply.text
    served = [g["scores"] for g in reply.json()["groups"]]
    assert len(model.programs) == programs  # warm-up compiled every shape: nothing on the request path
    (media_root / "in.jsonl").write_text("\n".join(json.dumps(g) for g in GROUPS) + "\n")
    score_file(model, media_root / "in.jsonl", tmp_path / "out.jsonl")
    expected = [json.loads(line)["scores"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for got, want in zip(served, expected + [expected[1], expected[1]]):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_concurrent_requests_are_batched_and_score_as_alone(model, url):
    alone = httpx.post(f"{url}/score", json={"groups": [GROUPS[0]]}, timeout=60).json()["groups"][0]["scores"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: httpx.post(f"{url}/score", json={"groups": [GROUPS[0]]}, timeout=60),
                                range(16)))
    for reply in replies:
        np.testing.assert_allclose(reply.json()["groups"][0]["scores"], alone, atol=1e-5)
    text = httpx.get(f"{url}/metrics").text
    count = float(_metric(text, "mrrm_batch_groups_count"))
    assert float(_metric(text, "mrrm_batch_groups_sum")) > count  # some batches held several groups
    assert float(_metric(text, "mrrm_compiled_programs")) >= 2 * 3 * 2  # the warm-up: rows x lengths x media
    assert 'mrrm_requests_total{endpoint="/score"}' in text and "mrrm_request_latency_seconds_bucket" in text


def _metric(text: str, name: str) -> str:
    return next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " "))


def _openrlhf_query(model, prompt: str, response: str) -> str:
    """What OpenRLHF sends: the decoded chat-templated prompt, then the response and its end token."""
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    rendered = model.processor.apply_chat_template(messages, add_generation_prompt=True)
    return rendered + response + "<|im_end|>"


def test_get_reward_groups_entries_of_one_prompt_and_reads_media_from_labels(model, url, media_root):
    prompts = ["Describe the picture."] * 3 + ["Which answer fits?"] * 2
    responses = ANSWERS[:3] + ANSWERS[2:]
    labels = [json.dumps({"image": "a.png"})] * 3 + ["", "not json"]
    body = {"query": [_openrlhf_query(model, p, r) for p, r in zip(prompts, responses)], "prompts": prompts,
            "labels": labels}
    reply = httpx.post(f"{url}/get_reward", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    with_image = model.score("Describe the picture.", ANSWERS[:3], images=[media.load_image(media_root / "a.png")])
    text = model.score("Which answer fits?", ANSWERS[2:])
    np.testing.assert_allclose(out["rewards"], np.concatenate([with_image, text]), atol=1e-5)
    np.testing.assert_allclose(out["scores"][:3], groups.softmax(with_image), atol=1e-5)
    assert out["extra_logs"]["group_size"] == [3, 3, 3, 2, 2]


def test_get_reward_groups_across_requests(model, media_root):
    prompt = "Which answer fits?"
    with serve(model, media_root=str(media_root), group_size=4, group_timeout_s=0.5, reward="zscore") as base:
        def one(response):
            return httpx.post(f"{base}/get_reward", json={"query": [_openrlhf_query(model, prompt, response)],
                                                         "prompts": [prompt], "labels": [""]}, timeout=60).json()

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(one, ANSWERS))
        raw = [r["extra_logs"]["raw_score"][0] for r in replies]
        assert [r["extra_logs"]["group_size"][0] for r in replies] == [4, 4, 4, 4]
        # The group's order is the order the requests arrived in: one of the permutations, scored directly.
        matches = [order for order in itertools.permutations(range(4))
                   if np.allclose(model.score(prompt, [ANSWERS[i] for i in order])[np.argsort(order)], raw, atol=1e-5)]
        assert matches, raw
        np.testing.assert_allclose([r["rewards"][0] for r in replies], groups.zscore(np.asarray(raw)), atol=1e-5)
        start = time.monotonic()
        late = one(ANSWERS[0])  # alone: scored when the group times out
        assert late["extra_logs"]["group_size"] == [1] and time.monotonic() - start >= 0.4


def test_bad_requests_are_4xx_json_and_the_server_keeps_serving(url):
    cases = [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, None),
        ({"json": {"groups": [{"prompt": 3, "responses": ["a"]}]}}, 422, "groups.0.prompt"),
        ({"json": {"groups": [{"prompt": "p", "responses": []}]}}, 422, "groups.0.responses"),
        ({"json": {"groups": []}}, 422, "groups"),
        ({"json": {"groups": [{"prompt": "x" * (1 << 20), "responses": ["a"]}]}}, 422, "groups.0.prompt"),
        ({"json": {"groups": [{"prompt": "p", "responses": ["a"], "image": "http://example.com/a.png"}]}}, 400,
         "groups[0].image[0]"),
        ({"json": {"groups": [{"prompt": "p", "responses": ["a"], "image": "../a.png"}]}}, 400, "groups[0]"),
        ({"json": {"groups": [{"prompt": "p", "responses": ["a"], "image": "sub/escape.png"}]}}, 400, "groups[0]"),
        ({"json": {"groups": [{"prompt": "p", "responses": ["a"], "image": "none.png"}]}}, 400, "groups[0]"),
        ({"json": {"groups": [{"prompt": "p", "responses": ["a"], "image": "data:image/png;base64,AAAA"}]}}, 400,
         "groups[0]"),
        ({"json": {"groups": [{"prompt": "word " * 2000, "responses": ["a"]}]}}, 413, "groups[0]"),
        ({"json": {"groups": [{"prompt": "p", "responses": ["a"] * 9}]}}, 413, "groups[0]"),
        ({"json": {"query": ["q"], "prompts": ["a", "b"]}}, 422, "prompts"),
    ]
    for kwargs, status, field in cases:
        path = "/get_reward" if "query" in kwargs.get("json", {}) else "/score"
        reply = httpx.post(f"{url}{path}", timeout=60, **kwargs)
        assert reply.status_code == status, (kwargs.get("json", kwargs.get("content")), reply.text[:300])
        body = reply.json()
        assert body["error"] and (field is None or body["field"] == field), body
    too_long = httpx.post(f"{url}/score", content=b"x" * (65 << 20), headers={"content-type": "application/json"})
    assert too_long.status_code == 413
    assert "tokens (limit 1024)" in httpx.post(f"{url}/score", json={"groups": [{"prompt": "word " * 2000,
                                                                                  "responses": ["a"]}]}).json()["error"]
    assert httpx.get(f"{url}/health").json()["status"] == "ready"
    assert httpx.post(f"{url}/score", json={"groups": [GROUPS[0]]}, timeout=60).status_code == 200


def test_api_key_and_single_mode(model):
    with serve(model, api_key="secret", mode="single") as base:
        assert httpx.post(f"{base}/score", json={"groups": [GROUPS[0]]}).status_code == 401
        assert httpx.get(f"{base}/health").status_code == 200  # probes need no key
        reply = httpx.post(f"{base}/score", json={"groups": [GROUPS[0]]}, headers={"Authorization": "Bearer secret"},
                           timeout=60)
        np.testing.assert_allclose(reply.json()["groups"][0]["scores"],
                                   model.score_single(GROUPS[0]["prompt"], ANSWERS), atol=1e-5)


def test_openrlhf_query_parsing():
    special = groups.special_token_pattern(type("T", (), {
        "added_tokens_decoder": {1: type("A", (), {"content": "<|im_start|>"})(),
                                 2: type("A", (), {"content": "<|im_end|>"})(),
                                 3: type("A", (), {"content": "<|image_pad|>"})()},
        "all_special_tokens": ["<|im_end|>"]})())
    query = "<|im_start|>user\n<|image_pad|><|image_pad|>Hi there?<|im_end|>\n<|im_start|>assistant\nIt is red.<|im_end|>"
    assert groups.extract_response(query, "Hi there?", special) == "It is red."
    assert groups.extract_response(query, None, special) == "It is red."
    assert groups.extract_response("Hi there? It is red.", "Hi there?", special) == "It is red."
    assert groups.parse_label('{"image": "a.png", "group": "g1"}', "labels[0]") == {"image": "a.png", "group": "g1"}
    assert groups.parse_label("plain answer 42", "labels[0]") == {} and groups.parse_label(None, "x") == {}
    with pytest.raises(ValueError, match="labels\\[0\\].image"):
        groups.parse_label({"image": 3}, "labels[0]")
    np.testing.assert_allclose(groups.softmax(np.array([0.0, np.log(3.0)])), [0.25, 0.75])
    np.testing.assert_allclose(groups.zscore(np.array([1.0, 3.0])), [-1, 1], atol=1e-5)


def test_the_command_line_server_warms_up_then_serves(model, tiny_reward_dir, tmp_path):
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "mrrm_jax.serve", f"--checkpoint={tiny_reward_dir}", f"--port={port}",
         "--row_tokens=1024", "--max_batch_tokens=2048", "--row_crops=16", "--row_groups=4", "--max_responses=8",
         "--length_buckets=2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url, seen = f"http://127.0.0.1:{port}", set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                seen.add(status := httpx.get(f"{url}/health", timeout=2).status_code)
            except httpx.HTTPError:
                continue
            if status == 200:
                break
            early = httpx.post(f"{url}/score", json={"groups": [GROUPS[0]]})
            # Refused while warming up, unless the warm-up ended between the two requests.
            assert early.status_code == 503 or httpx.get(f"{url}/health").status_code == 200, early.status_code
            time.sleep(0.2)
        assert 200 in seen and seen <= {200, 503}, (seen, process.poll())
        reply = httpx.post(f"{url}/score", json={"groups": [GROUPS[0]]}, timeout=60)
        np.testing.assert_allclose(reply.json()["groups"][0]["scores"], model.score(GROUPS[0]["prompt"], ANSWERS),
                                   atol=1e-5)
        # rows 1 or 2 x 2 row lengths x with or without media
        assert _metric(httpx.get(f"{url}/metrics").text, "mrrm_compiled_programs") == "8.0"
        # Paths need --media_root: without one, only inline media are accepted.
        refused = httpx.post(f"{url}/score", json={"groups": [{**GROUPS[0], "image": "a.png"}]})
        assert refused.status_code == 400 and "--media_root" in refused.json()["error"]
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_blank_responses_get_the_group_floor(model, url):
    answers = ANSWERS[:3]
    reply = httpx.post(f"{url}/score", json={"groups": [
        {"prompt": "Which answer fits?", "responses": [answers[0], "", answers[1], " \n", answers[2]]},
        {"prompt": "Which answer fits?", "responses": ["", "  "]}]}, timeout=60).json()["groups"]
    scores = model.score("Which answer fits?", answers)  # the blanks are not shown to the model
    np.testing.assert_allclose(np.asarray(reply[0]["scores"])[[0, 2, 4]], scores, atol=1e-5)
    assert reply[0]["scores"][1] == reply[0]["scores"][3] == pytest.approx(scores.min() - groups.BLANK_MARGIN)
    assert reply[0]["blank"] == [1, 3] and reply[1] == {"scores": [0.0, 0.0], "blank": [0, 1]}
    assert float(_metric(httpx.get(f"{url}/metrics").text, "mrrm_blank_responses_total")) >= 4
    rollout = httpx.post(f"{url}/get_reward", json={"query": [_openrlhf_query(model, "Which answer fits?", "")],
                                                     "prompts": ["Which answer fits?"]}, timeout=60).json()
    assert rollout["rewards"] == [0.0] and rollout["extra_logs"]["blank_response"] == [1.0]


def test_deterministic_scores_are_bit_identical_across_batch_compositions(model, media_root):
    """One group, scored alone, behind other groups in one request, with a group with media, and among
    concurrent requests: the same bits (without --deterministic a 2-row batch differs from a 1-row one
    in the last bits)."""
    target = {"prompt": "Which answer fits?", "responses": ANSWERS}
    others = [{"prompt": f"Question {i}?", "responses": ANSWERS[i:i + 2]} for i in range(3)] + [GROUPS[1]]
    with serve(model, max_rows=4, deterministic=True, media_root=str(media_root)) as base:
        def scored(groups_):
            reply = httpx.post(f"{base}/score", json={"groups": groups_}, timeout=60)
            assert reply.status_code == 200, reply.text
            return [g["scores"] for g in reply.json()["groups"]]

        alone = scored([target])[0]
        assert scored(others[:2] + [target])[2] == alone
        assert scored([others[3], target, others[0]])[1] == alone
        assert scored(others + [target] + others)[4] == alone
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            mixed = list(pool.map(lambda i: scored([others[i % 4], target] if i % 2 else [target]), range(12)))
        assert all(groups_[-1] == alone for groups_ in mixed)
    np.testing.assert_allclose(alone, model.score(target["prompt"], ANSWERS), atol=1e-5)


class _Gated:
    """The model with each batch held until `gate` is set (a long batch), or failing with `fail`."""

    def __init__(self, model):
        self._model, self.gate, self.fail = model, threading.Event(), None
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def score_batch(self, batch):
        self.gate.wait(30)
        if self.fail is not None:
            raise self.fail
        return self._model.score_batch(batch)


def test_deadline_names_the_group_and_health_stays_truthful(model):
    gated = _Gated(model)
    with serve(gated, request_timeout_s=1.0, group_size=4, group_timeout_s=20) as base:
        waiting = httpx.post(f"{base}/get_reward", json={"query": ["Q? A."], "prompts": ["Q?"],
                                                          "labels": [json.dumps({"group": "uid-7"})]}, timeout=30)
        assert waiting.status_code == 504, waiting.text
        assert "query[0] (group 'uid-7', 1 of 4 arrived): not scored within 1.0 s" in waiting.json()["error"]

        gated.gate.clear()
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            late = pool.submit(httpx.post, f"{base}/score", json={"groups": [GROUPS[0], GROUPS[0]]}, timeout=30)
            for _ in range(40):  # answered while the model is on the held batch
                busy = httpx.get(f"{base}/health", timeout=5)
                if busy.json().get("busy_s", 0) > 0 or late.done():
                    break
                time.sleep(0.02)
            assert busy.status_code == 200 and busy.json()["busy_s"] > 0, busy.text
            late = late.result()
        assert late.status_code == 504 and late.json()["field"] == "groups[0]", late.text
        assert "groups[0], groups[1]: not scored within 1.0 s" in late.json()["error"]
        time.sleep(max(0.0, start + 1.5 - time.monotonic()))
        stalled = httpx.get(f"{base}/health", timeout=5)
        assert stalled.status_code == 503 and "stalled" in stalled.json()["error"]
        gated.gate.set()
        reply = httpx.post(f"{base}/score", json={"groups": [GROUPS[0]]}, timeout=30)
        np.testing.assert_allclose(reply.json()["groups"][0]["scores"], model.score(GROUPS[0]["prompt"], ANSWERS),
                                   atol=1e-5)
        assert httpx.get(f"{base}/health").status_code == 200

        gated.fail = SystemExit("the device is gone")  # not an Exception: the model thread dies of it
        gone = httpx.post(f"{base}/score", json={"groups": [GROUPS[0]]}, timeout=30)
        assert gone.status_code == 503 and "died: SystemExit" in gone.json()["error"], gone.text
        health = httpx.get(f"{base}/health", timeout=5)
        assert health.status_code == 503 and "died: SystemExit: the device is gone" in health.json()["error"]
        refused = httpx.post(f"{base}/score", json={"groups": [GROUPS[0]]}, timeout=30)
        assert refused.status_code == 503 and "model thread is not running" in refused.json()["error"]
