"""`lamps bench --router`: the fleet configs it deploys are valid Serve configs naming routers that
import, and a run's results are labelled by router."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import ServeDeploySchema

from lamps.bench import compared_labels
from lamps.bench_targets import ROUTERS, parse_routers, with_fleet

CONFIG = Path(__file__).resolve().parent.parent / "cluster" / "serve-bench-cpu.yaml"


@pytest.mark.parametrize("router", list(ROUTERS))
def test_every_router_makes_a_valid_fleet_config(router: str) -> None:
    base = yaml.safe_load(CONFIG.read_text())
    fleet = with_fleet(base, replicas=3, router=router)
    ServeDeploySchema.model_validate(fleet)  # Ray's own schema
    engine = next(
        d for d in fleet["applications"][0]["deployments"] if d["name"] == "EngineReplica"
    )
    assert engine["num_replicas"] == 3
    # The one replica's CPUs shared by three: they fit where it did.
    assert engine["ray_actor_options"]["num_cpus"] == pytest.approx(1 / 3)
    config = RequestRouterConfig.model_validate(engine["request_router_config"])
    assert config.get_request_router_class().__name__  # the class imports
    assert base["applications"][0]["deployments"][0]["num_replicas"] == 1  # copy, not edit


def test_unknown_routers_are_refused_with_the_known_ones() -> None:
    with pytest.raises(SystemExit, match="known: memory, pow2"):
        parse_routers("memory,p2c")


def test_a_router_run_is_labelled_by_router() -> None:
    assert compared_labels("lamps", "memory,pow2") == ["memory", "pow2"]
    assert compared_labels("lamps,vllm", None) == ["lamps", "vllm"]
