"""Distributed training on 2 gloo processes spawned inside pytest (CPU): equal to one process on the same
global batch, resumable on another process count, and a dead rank ends the others with an error.

The model is the semantic ResNet-18 with group norms and a fixed number of labelled points per image:
its loss is a mean over images with equal weights and nothing in it depends on the batch, so two
processes of batch 1 and one process of batch 2 compute the same gradients, up to float rounding.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from rsiseg.checkpoint import load_checkpoint
from rsiseg.engine.distributed import Distributed, resume_position, scaled_train_config
from rsiseg.engine.sampler import EpochBatchSampler, epoch_batches
from tests.engine.ddp_launch import free_port, rank_environment, spawn_ranks


@pytest.fixture(scope="module")
def semantic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rsiseg.data.synthetic_semantic import write_synthetic_semantic_dataset

    out = tmp_path_factory.mktemp("ddp_semantic")
    write_synthetic_semantic_dataset(out, images=5, size=64, seed=1, val_fraction=0.2)  # 4 train, 1 val
    return out


def config(data: Path, out: Path, batch_size: int, **train) -> dict:
    # SGD: AdamW's normalised first steps turn the float rounding of near-zero gradients into 2e-5 differences.
    raw = {
        "task": "semantic",
        "data": {"train_images": str(data / "images/train"), "train_labels": str(data / "labels/train"),
                 "num_workers": 0, "points": {"count": 300, "fraction": None}},
        "model": {"name": "seg_resnet18", "num_classes": 6, "norm": "gn"},
        "train": {"output_dir": str(out), "epochs": 1, "batch_size": batch_size, "optimizer": "sgd", "lr": 0.01,
                  "warmup_iters": 0, "log_interval": 1, "tensorboard": False, "seed": 0, "lr_scaling": "none",
                  "checkpoint_interval": 1, "best_metric": "semantic/mIoU", "dist_timeout": 60.0},
    }
    raw["train"].update(train)
    return raw


def _worker(rank: int, world: int, port: int, raw: dict, resume: bool, fault: tuple[str, int] | None,
            results: str) -> None:
    """One rank of a torchrun-like run: the environment torchrun sets, then ``rsiseg train``'s Trainer.

    ``fault = ("die", i)`` kills the last rank at iteration ``i``; ``("nan", i)`` gives it a NaN loss there."""
    rank_environment(rank, world, port)
    from rsiseg.config import config_from_dict
    from rsiseg.engine.distributed import shutdown_process_group
    from rsiseg.engine.trainer import Trainer

    if fault is not None and rank == world - 1:
        kind, at = fault
        original = Trainer.train_step

        def faulty_step(self, images, targets):
            if self.iteration == at and kind == "die":
                os._exit(3)  # no exception, no goodbye: as a killed process
            if self.iteration == at and kind == "nan":
                forward = self.net.forward
                self.net.forward = lambda *a, **k: {n: v * float("nan") for n, v in forward(*a, **k).items()}
                try:
                    return original(self, images, targets)
                finally:
                    del self.net.forward
            return original(self, images, targets)

        Trainer.train_step = faulty_step
    started = time.monotonic()
    try:
        Trainer(config_from_dict(raw), resume=resume, progress=False).fit()
        outcome = "ok"
    except Exception as err:  # reported to the test through the file
        outcome = f"{type(err).__name__}: {err}"
    finally:
        shutdown_process_group()
    Path(results, f"rank{rank}.json").write_text(json.dumps({"outcome": outcome,
                                                             "seconds": time.monotonic() - started}))


def launch(world: int, raw: dict, results: Path, resume: bool = False,
           fault: tuple[str, int] | None = None) -> list[dict]:
    """Run ``world`` spawned ranks to the end; each rank's outcome (None for a rank that wrote none)."""
    results.mkdir(parents=True, exist_ok=True)
    spawn_ranks(_worker, world, raw, resume, fault, str(results))
    files = [results / f"rank{rank}.json" for rank in range(world)]
    return [json.loads(f.read_text()) if f.is_file() else None for f in files]


def train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_sampler_shares_each_global_batch_between_the_ranks() -> None:
    ranks = [list(EpochBatchSampler(7, 2, seed=3, rank=r, world_size=2)) for r in range(2)]
    single = epoch_batches(7, 4, 3, 0)
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 2
    for step, batch in enumerate(single):
        together = [i for r in range(2) for i, _ in ranks[r][step]]
        assert together[: len(batch)] == batch  # the single process's global batch, in order
    assert [len(b) for b in ranks[0]] == [len(b) for b in ranks[1]] == [2, 2]  # the last batch (3) is filled up
    assert len(EpochBatchSampler(7, 2, 3, 1, 2)) == 2


def test_lr_scaling_and_resume_position() -> None:
    from rsiseg.config import TrainConfig

    assert scaled_train_config(TrainConfig(lr=0.01), 4).lr == pytest.approx(0.04)
    assert scaled_train_config(TrainConfig(lr=0.01, lr_scaling="none"), 4).lr == 0.01
    # 10 images, batch 2 per process: 2 processes have 3 steps per epoch, 1 process 5; epoch 1, 2 steps in
    assert resume_position(1, 3 + 2, 10, 2, saved_world=2, world=1) == 5 + 4
    assert resume_position(1, 5 + 4, 10, 2, saved_world=1, world=2) == 3 + 2
    assert Distributed().agree(True) and Distributed().gather(5) == [5] and Distributed().broadcast(7) == 7


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(semantic_data: Path, tmp_path: Path) -> None:
    single_run, ddp_run = tmp_path / "single", tmp_path / "ddp"
    assert launch(1, config(semantic_data, single_run, batch_size=2, max_iters=2), tmp_path / "r1")[0]["outcome"] == "ok"
    outcomes = launch(2, config(semantic_data, ddp_run, batch_size=1, max_iters=2), tmp_path / "r2")
    assert [o["outcome"] for o in outcomes] == ["ok", "ok"]
    single, ddp = load_checkpoint(single_run / "last.pth"), load_checkpoint(ddp_run / "last.pth")
    assert (single["world_size"], ddp["world_size"]) == (1, 2) and single["iteration"] == ddp["iteration"] == 2
    assert len(ddp["rank_rng_states"]) == 2
    for key, value in single["model"].items():
        assert torch.allclose(value.float(), ddp["model"][key].float(), rtol=1e-4, atol=1e-5), key
    losses = [(a["loss"], b["loss"]) for a, b in zip(train_records(single_run), train_records(ddp_run))]
    assert len(losses) == 2 and all(a == pytest.approx(b, rel=1e-4) for a, b in losses)
    first = json.loads((ddp_run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kind"] == "run" and first["world_size"] == 2
    assert not (ddp_run / "tensorboard").exists()  # rank 0 alone writes, and only what the config asks

    # The 2-process checkpoint continues on 1 process: same epoch, same images done, then to the end.
    resumed = config(semantic_data, ddp_run, batch_size=1, epochs=2, max_iters=None)
    assert launch(1, resumed, tmp_path / "r3", resume=True)[0]["outcome"] == "ok"
    state = load_checkpoint(ddp_run / "last.pth")
    assert state["world_size"] == 1 and state["epoch"] == 2 and state["iteration"] == 2 * 4  # 4 steps an epoch


def test_a_dead_rank_ends_the_others_with_an_error(semantic_data: Path, tmp_path: Path) -> None:
    raw = config(semantic_data, tmp_path / "run", batch_size=1, epochs=3, dist_timeout=30.0)
    outcomes = launch(2, raw, tmp_path / "results", fault=("die", 1))
    assert outcomes[1] is None  # the killed rank wrote nothing
    assert outcomes[0]["outcome"].startswith("DistributedError: rank 0 of 2")
    assert "another process has died" in outcomes[0]["outcome"] and "--resume" in outcomes[0]["outcome"]
    assert outcomes[0]["seconds"] < 60
    assert load_checkpoint(tmp_path / "run" / "last.pth")["iteration"] == 1  # the last checkpoint is intact


def _eval_worker(rank: int, world: int, port: int, configs: dict, results: str) -> None:
    """Evaluate a seeded, untrained model of each task on this rank's share; rank 0 writes the metrics."""
    rank_environment(rank, world, port)
    from rsiseg.engine.distributed import init_distributed, shutdown_process_group

    dist = init_distributed("cpu", 60.0)
    try:
        metrics = {name: evaluate_seeded(raw, dist) for name, raw in configs.items()}
    finally:
        shutdown_process_group()
    Path(results, f"rank{rank}.json").write_text(json.dumps(metrics))


def evaluate_seeded(raw: dict, dist: Distributed | None = None) -> dict:
    from rsiseg.config import config_from_dict
    from rsiseg.models.registry import build_model
    from rsiseg.tasks import get_task

    cfg = config_from_dict(raw)
    task = get_task(cfg.task)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    _, val = task.build_datasets(cfg)
    return task.evaluate(model, val, cfg, torch.device("cpu"), progress=False, dist=dist)


def test_sharded_evaluation_equals_one_process(synth_data: dict[str, Path], semantic_data: Path,
                                               tmp_path: Path) -> None:
    from tests.conftest import tiny_config_dict

    instance = tiny_config_dict(synth_data, tmp_path / "unused")
    instance["model"]["box_score_thresh"] = 0.0  # an untrained model: keep its many low-score detections
    instance["data"]["val_ann"] = instance["data"]["train_ann"]  # 6 images: 3 per rank
    semantic = config(semantic_data, tmp_path / "unused", batch_size=1)
    semantic["data"].update(val_images=str(semantic_data / "images/train"), val_labels=str(semantic_data / "labels/train"))
    configs = {"instance": instance, "semantic": semantic}
    results = tmp_path / "results"
    results.mkdir()
    assert spawn_ranks(_eval_worker, 2, configs, str(results)) == [0, 0]
    sharded = [json.loads((results / f"rank{rank}.json").read_text()) for rank in range(2)]
    single = json.loads(json.dumps({name: evaluate_seeded(raw) for name, raw in configs.items()}))
    assert sharded[0] == sharded[1] == single  # every rank holds the whole set's metrics, exactly
    assert 0 < single["semantic"]["semantic"]["mIoU"] < 1  # (the untrained detector's AP is 0: its results are
    # compared one by one through the commands, in the test below)


def test_a_non_finite_loss_on_one_rank_is_skipped_on_every_rank(semantic_data: Path, tmp_path: Path) -> None:
    raw = config(semantic_data, tmp_path / "run", batch_size=1, epochs=2, max_iters=3)
    assert [o["outcome"] for o in launch(2, raw, tmp_path / "results", fault=("nan", 1))] == ["ok", "ok"]
    state = load_checkpoint(tmp_path / "run" / "last.pth")
    assert state["iteration"] == 3 and state["metrics"]["skipped_batches"] == 1


def _restarted_rank(rank: int, world: int, _port: int, store_port: int, attempt: int, results: str) -> None:
    """Join attempt ``attempt`` of a torchrun group whose agent serves the store on ``store_port``."""
    rank_environment(rank, world, store_port)
    os.environ.update(TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT=str(attempt))
    if attempt == 1 and rank == 0:
        time.sleep(3)  # rank 1 reaches the store first, where attempt 0's addresses still are
    from rsiseg.engine.distributed import init_distributed, shutdown_process_group

    init_distributed("cpu", 20.0)
    try:
        torch.distributed.barrier()
    finally:
        shutdown_process_group()
    Path(results, f"attempt{attempt}_rank{rank}").touch()


def test_a_restarted_group_joins_although_the_agent_store_keeps_the_last_attempts_keys(tmp_path: Path) -> None:
    port = free_port()  # torchrun's agent store, one server for every attempt
    agent_store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    for attempt in (0, 1):
        assert spawn_ranks(_restarted_rank, 2, port, attempt, str(tmp_path)) == [0, 0], f"attempt {attempt}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"attempt{a}_rank{r}" for a in (0, 1) for r in (0, 1)]
    del agent_store  # served both attempts (without the per-attempt prefix, rank 1 of attempt 1 fails to connect)
