"""Split depths per client: explicit list, distribution, or by device profile."""

from __future__ import annotations

import pytest

from harmony.experiment import Experiment
from harmony.profiles import load_profiles
from tests.conftest import tiny_config


def test_explicit_pattern_repeats_over_clients():
    plan = Experiment.plan(tiny_config(**{"fleet.num_clients": 5, "fleet.split_depths": [4, 2],
                                         "data.num_shards": 10}))
    assert plan.depths == [4, 2, 4, 2, 4]


def test_distribution_is_seeded_and_respects_support():
    cfg = tiny_config(**{"fleet.split_depths": None, "fleet.depth_distribution": {2: 0.5, 4: 0.5},
                         "fleet.num_clients": 8, "data.num_shards": 16})
    a, b = Experiment.plan(cfg).depths, Experiment.plan(cfg).depths
    assert a == b and set(a) <= {2, 4}


def test_profiles_pick_the_deepest_depth_that_fits():
    cfg = tiny_config(**{"fleet.split_depths": None, "fleet.profiles": ["pi_zero_2", "laptop"],
                         "model.width": 1.0, "train.batch_size": 64, "fleet.step_budget_s": 0.5})
    plan = Experiment.plan(cfg)
    profiles = load_profiles()
    costs = plan.costs
    for depth, name in zip(plan.depths, plan.profiles, strict=True):
        step_s = 3 * 64 * (costs[depth].client_flops + costs[depth].exit_head_flops) / profiles[name].compute_flops
        deeper = [d for d in costs if d > depth]
        assert step_s <= 0.5 or depth == min(costs)
        for d in deeper:  # every deeper depth would not fit
            assert 3 * 64 * (costs[d].client_flops + costs[d].exit_head_flops) / profiles[name].compute_flops > 0.5
    assert plan.depths[0] < plan.depths[1]  # the Pi Zero gets a shallower prefix


def test_unknown_profile_is_named():
    with pytest.raises(ValueError, match="fleet.profiles: unknown device profile 'pi9'"):
        Experiment.plan(tiny_config(**{"fleet.split_depths": None, "fleet.profiles": ["pi9"]}))
