"""LSGD on 4 simulated workers against a single-process reference of eq. 3: single and multi-leader, both
pull modes; evaluation of the center and of the leader; bytes per round against EASGD (1 : 2)."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from test_lsgd_helpers import LSGD_SCENARIOS, PAIRS, WORLD, Workers, assert_params_equal, shared_results


def reference(name: str) -> tuple[list[torch.Tensor], dict[int, int]]:
    """Eq. 3 on WORLD workers in one process; returns the final parameters and the last leader per level."""
    params, _, steps, levels = LSGD_SCENARIOS[name]
    every_step = params.get("pull_mode") == "every-step"
    workers = Workers(WORLD)
    windows = [deque[float](maxlen=params["window"]) for _ in range(WORLD)]
    targets: dict[tuple[int, int], torch.Tensor] = {}  # (level, rank) -> last known leader parameters
    last_leader: dict[int, int] = {}
    for step in range(1, steps + 1):
        before, losses = workers.local_step(step)
        for window, loss in zip(windows, losses):
            window.append(loss)
        for level, (groups, period, pull) in enumerate(levels):
            if step % period:
                continue
            for group in groups:
                scores = [sum(windows[r]) / len(windows[r]) for r in group]
                leader = group[scores.index(min(scores))]
                last_leader[level] = leader
                for r in group:
                    targets[level, r] = before[leader]
                    if not every_step and r != leader:
                        workers.add(r, -pull * (before[r] - before[leader]))
        if every_step:
            for r in range(WORLD):
                for level, (_, _, pull) in enumerate(levels):
                    if (level, r) in targets:
                        workers.add(r, -pull * (before[r] - targets[level, r]))
    return workers.flats(), last_leader


@pytest.mark.parametrize("name", list(LSGD_SCENARIOS))
def test_lsgd_matches_eq3_reference(name: str) -> None:
    results = [r[name] for r in shared_results()]
    want, last_leader = reference(name)
    assert_params_equal([r["params"] for r in results], want)
    global_level = len(LSGD_SCENARIOS[name][3]) - 1
    assert all(r["leaders"]["global"] == last_leader[global_level] for r in results)


def test_times_led_add_up_to_rounds() -> None:
    for name, (_, _, steps, levels) in LSGD_SCENARIOS.items():
        summaries = [r[name]["summary"] for r in shared_results()]
        global_rounds = steps // levels[-1][1]
        assert all(s["rounds"] == global_rounds for s in summaries)
        assert sum(s["times_led"] for s in summaries) == global_rounds
        if len(levels) == 2:  # every node chose a local leader in each local round
            local_rounds = steps // levels[0][1]
            assert sum(s["times_led_local"] for s in summaries) == len(PAIRS) * local_rounds


def test_evaluated_center_is_the_average_and_leader_is_the_leader() -> None:
    center = [r["single-every-step"] for r in shared_results()]
    mean = torch.stack([r["params"] for r in center]).mean(0)
    for r in center:
        torch.testing.assert_close(r["evaluated"], mean, atol=1e-6, rtol=1e-6)
    led = [r["single-once"] for r in shared_results()]
    leader = led[0]["leaders"]["global"]
    for r in led:
        torch.testing.assert_close(r["evaluated"], led[leader]["params"])


def test_lsgd_sends_half_the_bytes_of_easgd_per_round() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
    nbytes = 4 * sum(p.numel() for p in model.parameters())
    for r in shared_results():
        lsgd, easgd = r["bytes"]["lsgd"], r["bytes"]["easgd"]
        # one broadcast of the model plus one float64 per other worker, vs one all-reduce of the model
        assert lsgd == pytest.approx((WORLD - 1) / WORLD * nbytes + (WORLD - 1) * 8)
        assert easgd == pytest.approx(2 * (WORLD - 1) / WORLD * nbytes)
        assert lsgd / easgd == pytest.approx(0.5, abs=0.05)
