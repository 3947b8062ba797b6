"""How the train stage builds torchrun commands: one machine (--standalone) or one node of a multi-node job.

Nothing here starts torchrun: the commands and the job folder are checked, not run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from storage.artifacts import StageContext
from tasks.config import ModelConfig, TrainConfig
from tasks.stages import SPECS
from tasks.training import launch
from tasks.training.job import TrainJob
from tasks.training.launch import RENDEZVOUS_FILE, Rendezvous, join_command, launch_distributed, torchrun_command
from tests.support.corpus import tiny_config

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
WORKER = ["-m", "tasks.training.worker"]
FINGERPRINT = "ab12" * 16
MULTI_NODE = {"nnodes": 3, "nproc": 8, "rdzv_endpoint": "head.internal:29400"}


def test_one_machine_is_standalone(tmp_path: Path):
    assert torchrun_command(tmp_path, 4) == [*TORCHRUN, "--standalone", "--nproc_per_node=4", *WORKER, str(tmp_path)]
    assert Rendezvous.of(TrainConfig(nproc=4), default_id=FINGERPRINT) is None


def test_several_nodes_meet_at_the_endpoint_under_the_stage_fingerprint(tmp_path: Path):
    rendezvous = Rendezvous.of(TrainConfig(**MULTI_NODE), default_id=FINGERPRINT)
    assert torchrun_command(tmp_path, 8, rendezvous) == [
        *TORCHRUN,
        "--nnodes=3",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=head.internal:29400",
        f"--rdzv_id={FINGERPRINT}",
        *WORKER,
        str(tmp_path),
    ]
    static = Rendezvous.of(TrainConfig(**MULTI_NODE, rdzv_backend="static", rdzv_id="job-7"), FINGERPRINT)
    command = torchrun_command(tmp_path, 8, static, node_rank=2)
    assert "--rdzv_id=job-7" in command and "--rdzv_backend=static" in command and "--node_rank=2" in command
    with pytest.raises(ValueError, match="outside 0..2"):
        torchrun_command(tmp_path, 8, static, node_rank=3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"nnodes": 2}, "needs train.rdzv_endpoint"),
        ({"nnodes": 2, "rdzv_endpoint": "head.internal"}, "host:port"),
    ],
)
def test_multi_node_config_is_checked(fields: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**fields)


def test_placement_fields_leave_the_train_fingerprint_alone(tmp_path: Path):
    cfg = tiny_config(tmp_path, tmp_path / "root")
    params = SPECS["train"].params(cfg)["train"]
    before = cfg.train.model_dump(exclude={"threads", "nproc", "nnodes", "rdzv_endpoint", "rdzv_id", "rdzv_backend"})
    assert params == before  # exactly what the stage hashed before these fields existed
    placed = tiny_config(tmp_path, tmp_path / "root", train={**MULTI_NODE, "rdzv_id": "x", "rdzv_backend": "static"})
    assert SPECS["train"].params(placed) == SPECS["train"].params(cfg)


def test_the_leader_writes_the_rendezvous_and_followers_join_it(tmp_path: Path, monkeypatch):
    """The stage (node 0) runs its share and describes the job; node K's command comes from that description."""
    commands: list[list[str]] = []

    def fake_torchrun(command: list[str], env: dict[str, str], ctx: StageContext) -> int:
        commands.append(command)
        (Path(command[-1]) / "result.json").write_text(json.dumps({"steps": 1}))  # what rank 0 would write
        return 0

    monkeypatch.setattr(launch, "_run_torchrun", fake_torchrun)
    cfg = TrainConfig(**MULTI_NODE, device="cpu")
    job = TrainJob.build([tmp_path / "train.arrow"], [tmp_path / "val.arrow"], 64, ModelConfig(), cfg, 7)
    work = tmp_path / "train" / f".{FINGERPRINT}.work"  # the artifact store's work folder for this fingerprint
    logs: list[str] = []
    ctx = StageContext(tmp_path / "out", work, log=logs.append)
    assert launch_distributed(job, ctx) == {"steps": 1}

    job_dir = work / "launch"
    leader = commands[0]
    assert leader[: len(TORCHRUN)] == TORCHRUN and leader[-1] == str(job_dir)
    assert f"--rdzv_id={FINGERPRINT}" in leader and "--nnodes=3" in leader
    assert json.loads((job_dir / RENDEZVOUS_FILE).read_text())["id"] == FINGERPRINT
    assert any(f"python -m tasks.training.launch join {job_dir} --node-rank K" in line for line in logs)
    follower = join_command(job_dir, node_rank=2, timeout_s=0)
    assert follower == leader  # c10d: same command on every node (ranks are assigned at the rendezvous)
    with pytest.raises(ValueError, match="followers are nodes 1..2"):
        join_command(job_dir, node_rank=0, timeout_s=0)


def test_a_follower_without_a_leader_times_out(tmp_path: Path):
    with pytest.raises(TimeoutError, match="rendezvous.json"):
        join_command(tmp_path, node_rank=1, timeout_s=0.05, poll_s=0.01)


def test_the_follower_flow_joins_through_the_launcher(tmp_path: Path):
    from flows.train_node import train_node

    with pytest.raises(TimeoutError, match="is the train stage up"):
        train_node.fn(str(tmp_path), node_rank=1, timeout_s=0.01)
