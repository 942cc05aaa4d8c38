"""Load on the reward server over loopback: throughput, latency, dynamic batching, multi vs single, soak.

    python -m bench.serve_load [--seconds=15] [--soak_requests=2000] [--lm_layers=4] [--hidden=256]

Run from the repository root. Starts `python -m mrrm_jax.serve` (127.0.0.1, a free port) on the small
random Molmo2 of `bench.multi_vs_single` (Molmo2's default processor), waits for /health, and drives it
with asyncio httpx clients, every loop bounded in requests and in seconds. Each request is one GRPO
group: a ~40-token question about a small inline PNG (data: URI) and G ~30-token answers.

1. Throughput: concurrency 1 / 8 / 32 clients x G = 4 / 8 with dynamic batching (rows of 2048
   tokens, 4 rows per batch, --max_wait_ms=5): groups/s, p50 / p99 latency, errors, and from /metrics
   the mean batch fill (the share of a batch's token slots holding group tokens: on an accelerator a
   batch costs its shape, so fill is what batching buys, free of timing noise) and groups per batch.
2. The gain of dynamic batching: the same load on a server that scores one group at a time
   (--max_batch_tokens=2048: one row; --row_groups=1: one group in it; --max_wait_ms=0).
3. Multi vs single: --mode=single (one pass per response) on the same load.
4. Soak: --soak_requests requests at concurrency 16 (an image on one good group in ten), 10% malformed (bad JSON, wrong types, missing
   media, path escapes, bodies over --max_body_mb): status counts, zero 5xx, the server alive, its RSS
   growth from after the first 10% of requests to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import pathlib
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import psutil
from PIL import Image

from bench.multi_vs_single import build_reward_dir
from mrrm_jax.backbones.molmo2.processor_files import write_molmo2_processor_dir

ROW_FLAGS = ["--row_tokens=2048", "--row_crops=8", "--row_groups=8", "--max_responses=16"]
WORDS = ("the of and a to in is it that was for on are with as his they be at one have this from or had by hot "
         "word but what some we can out other were all there when up use your how said an each she which do").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def _image_uri(seed: int) -> str:
    pixels = np.random.RandomState(seed).randint(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def make_groups(count: int, size: int, seed: int = 0, image_every: int = 1) -> list[dict]:
    """GRPO groups: a question, `size` answers, an inline image on every `image_every`-th group."""
    rng = random.Random(seed)
    images = [_image_uri(i) for i in range(8)]
    return [{"prompt": _text(rng, 40), "responses": [_text(rng, 30) for _ in range(size)],
             **({"image": images[i % 8]} if i % image_every == 0 else {})} for i in range(count)]


class Server:
    """`python -m mrrm_jax.serve` in a child process on a free loopback port."""

    def __init__(self, reward_dir: pathlib.Path, media_root: pathlib.Path, *flags: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mrrm_jax.serve", f"--checkpoint={reward_dir}", f"--port={self.port}",
             f"--media_root={media_root}", *ROW_FLAGS, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not get ready in 600 s")

    def rss_mib(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


async def load(url: str, bodies: list, concurrency: int, seconds: float, on_done=None) -> dict:
    """Sends `bodies` (dicts as JSON, bytes as raw bodies) from `concurrency` clients until all are sent
    or `seconds` pass; returns latencies, statuses and the wall time."""
    latencies, statuses, next_index = [], {}, 0
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient):
        nonlocal next_index
        while next_index < len(bodies) and time.monotonic() < deadline:
            body, next_index = bodies[next_index], next_index + 1
            start = time.monotonic()
            try:
                if isinstance(body, bytes):
                    reply = await http.post(f"{url}/score", content=body, headers={"content-type": "application/json"})
                else:
                    reply = await http.post(f"{url}/score", json=body)
                status = reply.status_code
            except httpx.HTTPError as error:
                status = type(error).__name__
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(time.monotonic() - start)
            if on_done is not None:
                on_done(sum(statuses.values()))

    start = time.monotonic()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return {"latencies": latencies, "statuses": statuses, "seconds": time.monotonic() - start}


def _row(label: str, result: dict) -> str:
    lat = sorted(result["latencies"])
    p = lambda q: 1000 * lat[min(int(q * len(lat)), len(lat) - 1)] if lat else float("nan")
    errors = sum(v for k, v in result["statuses"].items() if k != 200)
    return (f"{label:<34} {len(lat) / result['seconds']:9.2f} {p(0.5):9.0f} {p(0.99):9.0f} {len(lat):7d} "
            f"{errors:7d} {result['fill']:6.2f} {result['groups_per_batch']:6.2f}")


def _batch_stats(url: str) -> tuple[float, float, float]:
    """(sum of batch fills, sum of groups, batches) so far, from /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    return (float(values["mrrm_batch_fill_sum"]), float(values["mrrm_batch_groups_sum"]),
            float(values["mrrm_batch_groups_count"]))


def throughput(server: Server, concurrency: int, size: int, seconds: float) -> dict:
    """The load, with the mean batch fill (token slots holding group tokens) and groups per batch."""
    bodies = [{"groups": [g]} for g in make_groups(4000, size, seed=concurrency * 100 + size)]
    asyncio.run(load(server.url, bodies[:concurrency * 2], concurrency, seconds))  # warm the connections
    before = _batch_stats(server.url)
    result = asyncio.run(load(server.url, bodies, concurrency, seconds))
    fill, groups, batches = (a - b for a, b in zip(_batch_stats(server.url), before))
    return {**result, "fill": fill / max(batches, 1), "groups_per_batch": groups / max(batches, 1)}


def malformed(rng: random.Random, big_bytes: int) -> dict | bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return b'{"groups": [{"prompt": "unterminated'
    if kind == 1:
        return {"groups": [{"prompt": 7, "responses": "not a list"}]}
    if kind == 2:
        return {"groups": [{"prompt": "p", "responses": ["a", "b"], "image": "missing/file.png"}]}
    if kind == 3:
        return {"groups": [{"prompt": "p", "responses": ["a", "b"], "image": "../../etc/passwd"}]}
    if kind == 4:
        return {"groups": [{"prompt": "p", "responses": ["a"], "image": "http://example.com/x.png"}]}
    return b'{"groups": [{"prompt": "' + b"x" * big_bytes + b'", "responses": ["a"]}]}'


HEADER = (f"{'server, load':<34} {'groups/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'groups':>7} {'errors':>7} "
          f"{'fill':>6} {'g/batch':>6}")


def _groups_per_s(result: dict) -> float:
    return len(result["latencies"]) / result["seconds"]


def batched_throughput(start, seconds: float, cases) -> dict:
    print("\n== 1. dynamic batching (4 rows per batch, --max_wait_ms=5) ==\n" + HEADER)
    server, results = start("--max_batch_tokens=8192", "--max_wait_ms=5"), {}
    try:
        for concurrency, size in cases:
            results[concurrency, size] = throughput(server, concurrency, size, seconds)
            print(_row(f"batched, {concurrency} clients, G={size}", results[concurrency, size]), flush=True)
    finally:
        server.stop()
    return results


def unbatched_throughput(start, seconds: float, batched: dict) -> None:
    print("\n== 2. one group at a time (one row, --row_groups=1, --max_wait_ms=0) ==\n" + HEADER)
    server = start("--max_batch_tokens=2048", "--row_groups=1", "--max_wait_ms=0")
    try:
        for concurrency in (8, 32):
            result, reference = throughput(server, concurrency, 4, seconds), batched[concurrency, 4]
            print(_row(f"unbatched, {concurrency} clients, G=4", result) +
                  f"   batching: {_groups_per_s(reference) / _groups_per_s(result):.2f}x groups/s, "
                  f"{reference['fill'] / result['fill']:.2f}x fill")
    finally:
        server.stop()


def single_mode(start, seconds: float, batched: dict) -> None:
    print("\n== 3. --mode=single (one pass per response), batched ==\n" + HEADER)
    server = start("--max_batch_tokens=8192", "--max_wait_ms=5", "--mode=single")
    try:
        result = throughput(server, 8, 4, seconds)
        print(_row("single, 8 clients, G=4", result) +
              f"   multi is {_groups_per_s(batched[8, 4]) / _groups_per_s(result):.2f}x faster")
    finally:
        server.stop()


def soak(start, requests: int) -> None:
    print(f"\n== 4. soak: {requests} requests, 10% malformed, concurrency 16 ==")
    server = start("--max_batch_tokens=8192", "--max_wait_ms=5", "--max_body_mb=1")
    try:
        rng = random.Random(0)
        good = make_groups(requests, 4, seed=7, image_every=10)
        bodies = [malformed(rng, 2 << 20) if rng.random() < 0.1 else {"groups": [good[i]]} for i in range(requests)]
        marks = {}

        def note(done):
            if done == requests // 10 and "start" not in marks:
                marks["start"] = server.rss_mib()

        result = asyncio.run(load(server.url, bodies, 16, 1800, on_done=note))
        end_rss, alive = server.rss_mib(), httpx.get(f"{server.url}/health").status_code == 200
        fives = sum(v for k, v in result["statuses"].items() if isinstance(k, int) and k >= 500)
        print(f"statuses {dict(sorted(result['statuses'].items(), key=str))}; 5xx {fives}; alive {alive}; "
              f"RSS {marks.get('start', float('nan')):.0f} -> {end_rss:.0f} MiB "
              f"({100 * (end_rss / marks.get('start', end_rss) - 1):+.1f}%); {result['seconds']:.0f} s; "
              f"p50 {1000 * statistics.median(result['latencies']):.0f} ms")
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="per throughput measurement")
    parser.add_argument("--soak_requests", type=int, default=2000)
    parser.add_argument("--lm_layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--parts", default="1,2,3,4", help="which of the four parts to run")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        reward_dir = build_reward_dir(tmp, write_molmo2_processor_dir(tmp / "processor"), args.lm_layers, args.hidden)
        (tmp / "media").mkdir()
        start = lambda *flags: Server(reward_dir, tmp / "media", *flags)
        print(f"{os.cpu_count()} cores; server and clients share them. Rows of 2048 tokens, 8 crops.")
        # Parts 2 and 3 compare with part 1's G = 4 rows at 8 and 32 clients.
        cases = [(c, g) for g in (4, 8) for c in (1, 8, 32)] if 1 in parts else [(8, 4), (32, 4)]
        batched = batched_throughput(start, args.seconds, cases) if parts & {1, 2, 3} else {}
        if 2 in parts:
            unbatched_throughput(start, args.seconds, batched)
        if 3 in parts:
            single_mode(start, args.seconds, batched)
        if 4 in parts:
            soak(start, args.soak_requests)


if __name__ == "__main__":
    main()
