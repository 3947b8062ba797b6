"""The ``train-node`` flow: one follower node of a multi-node training job led by a train stage elsewhere.

Deploy it to a work pool (or queue) per GPU machine and run it on nodes 1..nnodes-1 alongside the train stage
(node 0, the leader), which logs the job folder to pass here; see docs/scaling.md §5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from tasks.training.launch import join


@flow(name="train-node", log_prints=True)
def train_node(
    job_dir: Annotated[str, Field(description="The job folder the train stage logged (on the shared data root).")],
    node_rank: Annotated[int, Field(ge=1, description="This node's rank, 1..nnodes-1 (0 is the train stage).")],
    timeout_s: Annotated[float, Field(gt=0, description="Seconds to wait for the train stage's job folder.")] = 3600,
) -> int:
    """Join the job in ``job_dir`` as node ``node_rank``; fails if this node's torchrun fails."""
    status = join(Path(job_dir), node_rank, timeout_s)
    if status != 0:
        raise RuntimeError(f"torchrun on node {node_rank} exited with status {status}; see the leader's train error")
    get_run_logger().info(f"node {node_rank}: torchrun finished")
    return status
