"""Ray options without a cluster: parsing ``--ray``, replica placement, shard sizes, progress counting."""

from __future__ import annotations

import pytest

from vlmflow.distributed import RayOptions, RayTarget
from vlmflow.distributed.cluster import Placement, plan_placement, shard_size_for
from vlmflow.distributed.worker import ProgressTracker
from vlmflow.errors import ConfigError


@pytest.mark.parametrize(
    "text, kind, address",
    [
        ("auto", "auto", None),
        ("LOCAL", "local", None),
        ("10.0.0.5:6379", "address", "10.0.0.5:6379"),
        ("head-node.cluster:6379", "address", "head-node.cluster:6379"),
        ("ray://head:10001", "address", "ray://head:10001"),
    ],
)
def test_ray_target_parses_the_three_forms(text, kind, address):
    target = RayTarget.parse(text)
    assert (target.kind, target.address) == (kind, address)


@pytest.mark.parametrize("text", ["", "yes", "head", "http://head:8265/x", "ray://head"])
def test_bad_ray_target_names_the_value_and_the_valid_forms(text):
    with pytest.raises(ConfigError, match=r"--ray .* not understood; valid: auto .* local .* HOST:PORT"):
        RayTarget.parse(text)


def test_options_validate_their_numbers():
    assert RayOptions("local").target == RayTarget("local")
    for bad in ({"workers": 0}, {"shard_size": 0}, {"worker_gpus": 0}, {"max_restarts": -1}):
        with pytest.raises(ConfigError):
            RayOptions("local", **bad)


def test_placement_uses_one_replica_per_gpu_unless_the_model_is_forced_to_cpu():
    gpus = {"CPU": 32.0, "GPU": 8.0}
    assert plan_placement(gpus, RayOptions(), "auto") == Placement(8, 1.0, 1.0)
    assert plan_placement(gpus, RayOptions(worker_gpus=0.5), "cuda:3") == Placement(16, 1.0, 0.5)
    assert plan_placement(gpus, RayOptions(), "cpu") == Placement(32, 1.0, 0.0)
    # GPUs but too few CPUs for one per GPU: the CPUs limit the replicas.
    assert plan_placement({"CPU": 4.0, "GPU": 8.0}, RayOptions(worker_cpus=2), "auto").workers == 2
    assert plan_placement({"CPU": 3.0}, RayOptions(worker_cpus=2), "auto") == Placement(1, 2.0, 0.0)
    # An explicit count is kept even beyond the capacity (an autoscaler may add nodes).
    assert plan_placement({"CPU": 2.0}, RayOptions(workers=5), "auto").workers == 5


def test_placement_refuses_cuda_on_a_cluster_without_gpus():
    with pytest.raises(ConfigError, match="device 'cuda' requested but the Ray cluster has no GPUs"):
        plan_placement({"CPU": 8.0}, RayOptions(), "cuda")


@pytest.mark.parametrize(
    "n, workers, requested, expected",
    [(1000, 8, None, 32), (40, 2, None, 5), (3, 4, None, 1), (0, 2, None, 1), (100, 2, 7, 7)],
)
def test_shard_size(n, workers, requested, expected):
    assert shard_size_for(n, workers, requested) == expected


def test_progress_tracker_counts_a_repeated_report_once():
    tracker = ProgressTracker()
    tracker.add(["q1", "q2"])
    tracker.add(["q2", "q3"])  # a retried task reporting again
    assert tracker.count() == 3


def test_cli_ray_options_need_ray_for_workers_and_shard_size():
    from vlmflow.cli.common import ray_options

    assert ray_options(None, None, None) is None
    assert ray_options("local", 2, 4) == RayOptions("local", workers=2, shard_size=4)
    with pytest.raises(ConfigError, match="--workers and --shard-size need --ray"):
        ray_options(None, 2, None)
