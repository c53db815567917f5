"""Multi-node DDP through torchrun's c10d rendezvous: two "nodes" of one gloo process each on localhost give the
weights of one process with the same --batch-size and accumulation: the same global batch, each rank one micro-batch
of 2 per step (as the --multi-gpu test checks for one node)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_through_the_c10d_rendezvous_equal_one_process(tiny_cache, one_process_run, tmp_path):
    single = one_process_run  # conftest.DDP_REFERENCE: the flags below
    torchrun = Path(sys.executable).with_name("torchrun")
    port, out = free_port(), tmp_path / "two" / "res"
    cmd = [
        str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "gliograde-test", "-m", "gliograde.cli", "train",
        "--preset", "cpu-demo", "--size", "16", "--cache-dir", str(tiny_cache.path), "--output-dir", str(out),
        "--epochs", "2", "--min-epochs", "2", "--early-stopping", "5", "--batch-size", "2", "--data-path", "device",
        "--gradient-accumulation-steps", "2", "--dropout", "0", "--num-workers", "0", "--no-tensorboard",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in "ab"]
    logs = [p.communicate(timeout=400)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(log[-2000:] for log in logs)
    (run,) = list((out / "runs" / "fold_0").iterdir())  # one run folder: rank 0's
    a = torch.load(single.run_dir / "checkpoints" / "last.pt", weights_only=True)["model_state_dict"]
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model_state_dict"]
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for k in params:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
