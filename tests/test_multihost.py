"""Multi-host training on one machine: 2 processes x 4 simulated CPU devices, `jax.distributed` on
127.0.0.1 (gloo collectives, JAX's CPU default), against 1 process x 8 devices.

The runs (a module fixture; each a group of subprocesses with a deadline, killed as a group on failure):

    reference  1 process x 8 devices (this module as a script): the trainer, its `dataset` replaced by the
               rows that the 2 processes' shards give together, built by the trainer's own `dataset`
               under process index 0 and 1 (process 0's rows first, as `to_global` lays them out).
    straight   2 processes, the CLI (`python -m mrrm_jax.train --coordinator_address ...`): 4 steps,
               evaluation, export of the reward model.
    resumed    2 processes, the CLI, in a copy of the straight run's workdir as it was after its step-2
               checkpoint (a run stopped there): steps 3-4, evaluation, export.
    shards     2 processes (this module as a script): one epoch of the trainer's `dataset` per process,
               each recording which records its source handed out.

The training corpus holds a few lines that are not JSON: skip counts then differ between the shards,
which shows whose counts the metrics and checkpoints hold. The 2-process runs write the processor and
the evaluation corpus into their shared workdir (`trainer.workdir_files`).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PROCESSES, DEVICES_PER_PROCESS = 2, 4
DEADLINE_S = 900  # per group of processes; on 2 shared cores a 2-process run takes 1-3 minutes
BAD_LINES_AT = (0, 5, 12, 31)  # line numbers of the training corpus that are not JSON: both shards get some


def overrides(shared: pathlib.Path, num_steps: int) -> dict:
    """The demo config, shrunk: 8 rows per step (4 per process), a checkpoint every 2 steps, a learning
    rate large enough that each step's loss depends visibly on the updates before it."""
    return {"data.train": str(shared / "train" / "corpus.jsonl"), "data.eval": "synthetic",
            "data.synthetic.eval_images": 4, "data.synthetic.eval_videos": 4, "data.num_workers": 0,
            "train.num_steps": num_steps, "train.warmup_steps": 2, "train.rows_per_step": 8,
            "train.learning_rate": 0.01, "log_every": 1, "checkpoint.every_steps": 2, "eval.every_steps": 1000,
            "eval.controls": (), "packing.window": 16, "mesh.data": PROCESSES * DEVICES_PER_PROCESS}


def config(shared: pathlib.Path, num_steps: int, **extra):
    from configs import demo

    cfg = demo.get_config()
    for key, value in {**overrides(shared, num_steps), **extra}.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def write_corpus(shared: pathlib.Path) -> pathlib.Path:
    from mrrm_jax.data import synthetic

    path = synthetic.write_corpus(shared / "train", num_images=24, num_videos=24, seed=0)
    lines = path.read_text().splitlines()
    for at in BAD_LINES_AT:
        lines.insert(at, f"not a JSON object, line {at + 1}")
    path.write_text("\n".join(lines) + "\n")
    return path


# -- starting and stopping processes --------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(devices: int, port: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PJRT_NPROC": str(4 * devices)}  # XLA:CPU threads enough for the collectives (sharding.make_mesh)
    if port is not None:  # JAX's coordinator binds to every interface unless told otherwise
        env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
    return env


class Group:
    """Processes started together, each in its own process group (killed as a group on failure)."""

    def __init__(self, commands: list[list[str]], env: dict, logs: pathlib.Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.commands, self.logs, self.files, self.procs = commands, logs, [], []
        for i, command in enumerate(commands):
            out, err = open(logs / f"{i}.out", "w"), open(logs / f"{i}.err", "w")
            self.files += [out, err]
            self.procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err,
                                               start_new_session=True))
        self.deadline = time.monotonic() + DEADLINE_S

    def wait(self) -> list[str]:
        """Their stdouts once all exited 0. A process that fails, or a group past `DEADLINE_S`, fails the
        test with every process's stderr, after the whole group is killed (the others would wait in a
        collective for it)."""
        problem = None
        try:
            while problem is None and any(p.poll() is None for p in self.procs):
                if any(p.returncode not in (None, 0) for p in self.procs):
                    problem = "a process failed"
                elif time.monotonic() > self.deadline:
                    problem = f"still running after {DEADLINE_S} s"
                else:
                    time.sleep(0.2)
            if problem is None and any(p.returncode for p in self.procs):
                problem = "a process failed"
        finally:
            self.kill()
        if problem is not None:
            shown = []
            for i, p in enumerate(self.procs):
                err = (self.logs / f"{i}.err").read_text()
                err = "\n".join(line for line in err.splitlines() if not line.startswith("Extension modules"))
                shown.append(f"--- process {i}: exit {p.returncode}, {' '.join(self.commands[i][:4])} ...\n{err[-4000:]}")
            pytest.fail(f"{problem}\n" + "\n".join(shown), pytrace=False)
        return [(self.logs / f"{i}.out").read_text() for i in range(len(self.procs))]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=60)
        for f in self.files:
            f.close()


def cli(workdir: pathlib.Path, shared: pathlib.Path, num_steps: int) -> Group:
    """The training CLI on `PROCESSES` processes of `DEVICES_PER_PROCESS` devices."""
    port = free_port()
    flags = [f"--config.{k}={v}" for k, v in overrides(shared, num_steps).items()]
    commands = [[sys.executable, "-m", "mrrm_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
                 "--config.distributed=True", f"--coordinator_address=127.0.0.1:{port}",
                 f"--num_processes={PROCESSES}", f"--process_id={i}", *flags] for i in range(PROCESSES)]
    return Group(commands, environment(DEVICES_PER_PROCESS, port), workdir.parent / f"logs_{workdir.name}")


def script(mode: str, workdir: pathlib.Path, shared: pathlib.Path, processes: int) -> Group:
    """This module as a script (see `__main__`), on `processes` processes of 8 // processes devices."""
    port = free_port() if processes > 1 else None
    commands = [[sys.executable, "-m", "tests.test_multihost", mode, str(workdir), str(shared), str(port), str(i)]
                for i in range(processes)]
    return Group(commands, environment(PROCESSES * DEVICES_PER_PROCESS // processes, port),
                 workdir.parent / f"logs_{mode}")


# -- the runs ---------------------------------------------------------------------------------------

def metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def train_steps(workdir: pathlib.Path) -> list[dict]:
    return [m for m in metrics(workdir) if m["kind"] == "train"]


def last(workdir: pathlib.Path, kind: str) -> dict:
    return [m for m in metrics(workdir) if m["kind"] == kind][-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (workdir, stdouts)}. The reference (1 process: one core compiles) and the shards run at once."""
    from mrrm_jax.training import trainer

    root = tmp_path_factory.mktemp("multihost")
    shared = root / "shared"
    write_corpus(shared)
    out, times, groups = {}, {}, []
    try:
        t = time.monotonic()
        groups = [script("reference", root / "reference", shared, 1), script("shards", root / "shards", shared, PROCESSES)]
        out["reference"], out["shards"] = ((root / name, group.wait()) for name, group in zip(("reference", "shards"), groups))
        times["reference+shards"] = time.monotonic() - t
        t = time.monotonic()
        groups = [cli(root / "straight", shared, 4)]
        out["straight"] = (root / "straight", groups[0].wait())
        times["straight"] = time.monotonic() - t
        # Stopped after its step-2 checkpoint: the straight run's workdir as it was then, run again.
        shutil.copytree(root / "straight", root / "resumed",
                        ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard", trainer.REWARD_MODEL_DIR))
        shutil.rmtree(root / "resumed" / "checkpoints" / "4")
        t = time.monotonic()
        groups = [cli(root / "resumed", shared, 4)]
        out["resumed"] = (root / "resumed", groups[0].wait())
        times["resumed"] = time.monotonic() - t
    finally:
        for group in groups:
            group.kill()
    print("wall seconds:", {k: round(v) for k, v in times.items()})
    return out


@pytest.mark.slow
def test_two_processes_train_as_one_with_eight_devices(runs):
    reference, straight = runs["reference"][0], runs["straight"][0]
    expected, got = train_steps(reference), train_steps(straight)
    assert [m["step"] for m in got] == [m["step"] for m in expected] == [1, 2, 3, 4]
    losses = [m["loss"] for m in expected]
    assert max(losses) - min(losses) > 1e-3 * max(losses), losses  # the updates change the losses
    for e, g in zip(expected, got):
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-5), e["step"]
        assert g["examples_per_step"] == e["examples_per_step"], e["step"]
        # Skips of both processes' shards: each process counts its own, the metrics hold their sum.
        assert g["skipped"] == e["skipped"], e["step"]
    assert last(straight, "counts") == last(reference, "counts")
    assert last(straight, "counts")["bad_json"] > 0
    # The grain iterator state is per process, in the shared checkpoint directory.
    data_states = sorted(p.name for p in (straight / "checkpoints" / "4" / "data").glob("process_*"))
    assert data_states == [f"process_{i}-of-{PROCESSES}.json" for i in range(PROCESSES)]


@pytest.mark.slow
def test_two_processes_evaluate_and_export_like_one(runs):
    reference, straight = runs["reference"][0], runs["straight"][0]
    expected, got = last(reference, "eval"), last(straight, "eval")
    assert got == expected and expected["examples_image"] == expected["examples_video"] == 4
    # Every process ends with the same (gathered) evaluation; the CLI prints it.
    lines = [[line for line in stdout.splitlines() if line.startswith("final eval:")] for stdout in runs["straight"][1]]
    assert len(lines[0]) == 1 and all(found == lines[0] for found in lines), lines
    # The exported reward model: loadable, the same files and weights as one process exports.
    (got_meta, got), (expected_meta, expected) = exported(straight), exported(reference)
    assert got_meta == expected_meta and sorted(got) == sorted(expected)
    for path, value in expected.items():
        if zero_gradient(path, expected):  # see there; Adam moves each at most ~lr a step
            assert np.abs(got[path] - value).max() <= 4 * 0.01, path
        else:
            np.testing.assert_allclose(got[path], value, rtol=0, atol=weight_tolerance(value), err_msg=path)


def exported(workdir: pathlib.Path) -> tuple[tuple, dict]:
    """The reward model a run exported, loaded as `score` loads it: ((its files, but inside Orbax's
    directories), configs), {"trainable/...", "base/...": weights})."""
    from mrrm_jax.backbones import checkpoint
    from mrrm_jax.training import trainer

    out = workdir / trainer.REWARD_MODEL_DIR
    trainable, head, lora = checkpoint.load_trainable(out)
    config, base = checkpoint.load_base(out / checkpoint.BASE_DIR)
    flat = {f"trainable/{k}": np.asarray(v) for k, v in checkpoint.flatten(trainable).items()}
    flat.update({f"base/{k}": np.asarray(v) for k, v in checkpoint.flatten(base).items()})
    files = sorted(str(p.relative_to(out)) for d in (out, out / "base", out / "processor") for p in d.iterdir())
    return (files, config, head, lora), flat


def weight_tolerance(value: np.ndarray) -> float:
    """1e-4 of the leaf's scale, plus 0.1% of the most Adam moves an element in 4 steps at lr 0.01: Adam
    divides each gradient by its own running scale, so an element whose gradient is a near-cancellation
    (seen: the image pooling's query bias) moves by an amount set by the last bits of that gradient."""
    return 1e-4 * np.abs(value).max() + 1e-3 * 4 * 0.01


def zero_gradient(path: str, tree: dict) -> bool:
    """Leaves that no loss depends on in exact arithmetic: their gradients are rounding noise, which Adam
    turns into full-size steps, so they differ between any two partitionings of the step. The value
    head's last bias (a softmax over a row's responses ignores a shift of all its scores) and attention
    key biases (a softmax over keys ignores a shift of all the logits)."""
    head_biases = sorted((k for k in tree if re.fullmatch(r"trainable/head/\d+/bias", k)),
                         key=lambda k: int(k.split("/")[2]))
    return path == head_biases[-1] or path.endswith("k_proj/bias")


@pytest.mark.slow
def test_two_processes_resume_from_their_checkpoint(runs):
    """Stopped after the step-2 checkpoint, run again: steps 3-4 as the straight run (and 1 process)."""
    reference, straight, resumed = runs["reference"][0], runs["straight"][0], runs["resumed"][0]
    steps = train_steps(resumed)
    assert [m["step"] for m in steps] == [3, 4]  # resumed at step 2, did not start over
    for r, e, g in zip(train_steps(reference)[2:], train_steps(straight)[2:], steps):
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-5) == pytest.approx(r["loss"], rel=1e-5), e["step"]
        assert g["skipped"] == e["skipped"], e["step"]  # the checkpoint carried every process's counts
    assert last(resumed, "counts") == last(straight, "counts")
    assert last(resumed, "eval") == last(straight, "eval")
    (got_meta, got), (expected_meta, expected) = exported(resumed), exported(straight)
    assert got_meta == expected_meta and sorted(got) == sorted(expected)
    for path, value in expected.items():  # the same partitioning as the straight run: no noise to allow for
        np.testing.assert_allclose(got[path], value, rtol=1e-6, atol=0, err_msg=path)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["2", "4"]


@pytest.mark.slow
def test_every_record_of_an_epoch_is_read_by_exactly_one_process(runs):
    from mrrm_jax.data import records

    workdir, stdouts = runs["shards"]
    shards = [json.loads(stdout.strip().splitlines()[-1]) for stdout in stdouts]
    assert [s["process"] for s in shards] == list(range(PROCESSES))
    for split, path in (("train", workdir.parent / "shared" / "train" / "corpus.jsonl"),
                        ("eval", workdir / "data" / "eval" / "corpus.jsonl")):
        everything = [record_id for record_id, _ in records.read_jsonl(path)]
        read = [s[split]["read"] for s in shards]
        assert all(len(ids) == len(set(ids)) for ids in read), split  # nobody reads a record twice
        assert sorted(sum(read, [])) == sorted(everything), split  # and together they read each once
        assert all(abs(len(ids) - len(everything) / PROCESSES) <= 1 for ids in read), split
        for s, ids in zip(shards, read):  # what a process read is what its batches hold or its counts skip
            assert s[split]["examples"] + s[split]["skipped"] == len(ids), (split, s["process"])
    assert all(s["train"]["skipped"] > 0 for s in shards)  # the bad lines are spread over both shards


def test_cli_process_flags_need_distributed(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mrrm_jax.train", "--config=configs/demo.py", f"--workdir={tmp_path}",
                             "--num_processes=2", "--process_id=1"], cwd=REPO, env=environment(1), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert "--num_processes, --process_id need --config.distributed=True" in result.stderr
    assert not list(tmp_path.iterdir())


# -- the scripts (run in subprocesses by the tests above) -------------------------------------------

class _Stacked:
    """Several processes' batch iterators as one: their rows stacked in process order, counts summed, an
    empty batch for a process whose (evaluation) shard ran out before the others' (as `evaluate` does).
    Skips are concatenated, so the reference names every process's skips in its one skips.jsonl."""

    def __init__(self, datasets, empty: dict):
        self.datasets, self.empty = datasets, empty

    def __iter__(self):
        return _StackedIterator([iter(d) for d in self.datasets], self.empty)


class _StackedIterator:
    def __init__(self, iterators, empty):
        self.iterators, self.empty = iterators, empty

    def __next__(self) -> dict:
        batches = [next(it, None) for it in self.iterators]
        if all(b is None for b in batches):
            raise StopIteration
        batches = [self.empty if b is None else b for b in batches]
        out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0] if k not in ("counts", "skips")}
        out["counts"] = np.sum([b["counts"] for b in batches], axis=0)
        out["skips"] = [skip for b in batches for skip in b["skips"]]
        return out

    def get_state(self) -> list:
        return [it.get_state() for it in self.iterators]

    def set_state(self, state: list) -> None:
        for it, s in zip(self.iterators, state):
            it.set_state(s)

    def close(self) -> None:  # the trainer closes its iterator when the run ends
        for it in self.iterators:
            it.close()


def reference_run(workdir: pathlib.Path, shared: pathlib.Path) -> None:
    """1 process, 8 devices; the trainer reads what `PROCESSES` processes would read together."""
    import dataclasses
    from unittest import mock

    import jax

    from mrrm_jax.training import spec as run_spec
    from mrrm_jax.training import trainer
    from mrrm_jax.data import pipeline
    from mrrm_jax.training import data as training_data

    assert jax.device_count() == PROCESSES * DEVICES_PER_PROCESS, jax.devices()
    batches = training_data.batches

    def as_processes(source, train, spec, budget, processor, packing, seed, media_transform="none"):
        packing = dataclasses.replace(packing, rows_per_batch=packing.rows_per_batch // PROCESSES)
        shards = []
        for index in range(PROCESSES):
            with (mock.patch.object(jax, "process_index", new=lambda: index),
                  mock.patch.object(jax, "process_count", new=lambda: PROCESSES)):
                shards.append(batches(source, train, spec, budget, processor, packing, seed, media_transform))
        return _Stacked(shards, pipeline.empty_batch(packing))

    training_data.batches = as_processes
    trainer.train(run_spec.parse(config(shared, 4)), workdir)


def read_shards(workdir: pathlib.Path, shared: pathlib.Path) -> dict:
    """One epoch of each split as the trainer builds it for this process; which records its source gave."""
    import jax

    from mrrm_jax.training import spec as run_spec
    from mrrm_jax.training import trainer
    from mrrm_jax.data import pipeline
    from mrrm_jax.training import data as training_data

    spec = run_spec.parse(config(shared, 4, **{"data.num_epochs": 1}))
    workdir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path, processor, _ = trainer.workdir_files(spec, workdir)
    read: list[str] = []
    record_items = training_data.record_items

    class Recorded:  # the source, noting each record it hands out (grain reads it by index)
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, index):
            item = self.items[index]
            read.append(item[0])
            return item

    training_data.record_items = lambda source: Recorded(record_items(source))
    local_rows = spec.train.rows_per_step // jax.process_count()  # as the trainer
    out = {"process": jax.process_index()}
    for split, path, rows in (("train", train_path, local_rows), ("eval", eval_path, local_rows // spec.train.grad_accum)):
        read.clear()
        examples, counts = 0, np.zeros(len(pipeline.COUNT_KEYS), np.int64)
        for batch in training_data.batches(path, split == "train", spec.data, spec.budget, processor,
                                           trainer.packing_config(spec, rows), spec.seed):
            examples += int((batch["labels"] >= 0).sum())
            counts += batch["counts"]
        skipped = int(counts[: pipeline.COUNT_KEYS.index("crops_reduced")].sum())
        out[split] = {"read": list(read), "examples": examples, "skipped": skipped}
    return out


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags
    mode, workdir, shared, port, process_id = sys.argv[1:]
    workdir, shared = pathlib.Path(workdir), pathlib.Path(shared)
    if port != "None":
        import jax

        jax.distributed.initialize(f"127.0.0.1:{port}", PROCESSES, int(process_id))
    if mode == "reference":
        reference_run(workdir, shared)
    else:
        print(json.dumps(read_shards(workdir, shared)))
