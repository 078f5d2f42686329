"""DiLoCo and Streaming DiLoCo on 2 simulated workers (`commsgd.simworld`; tests/test_simworld.py checks
the same algorithm against gloo processes) against a plain-tensor reference.

One 2-worker job runs every scenario (plain, streaming with P > 1 and tau > 0, top-k pseudo-gradients
with error feedback, the local-SGD special case, a resume through a checkpoint with a fragment in
flight); the reference below is written from the papers' update rules, not from the algorithm's code.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import pytest
import torch
from test_lsgd_helpers import batch_loss, flat, optimizer, tiny_model

import commsgd
from commsgd.algorithms.diloco import fragment_offsets, split_contiguous
from commsgd.config import from_dict
from commsgd.errors import ConfigError
from commsgd.simworld import run_simulated

WORLD = 2
# the tiny model's parameters are 48 + 8 + 24 + 3 = 83 numbers; two fragments: [w1] and [b1, w2, b2]
FRAGMENTS = {1: [(0, 83)], 2: [(0, 48), (48, 83)]}

SCENARIOS: dict[str, dict[str, Any]] = {
    "plain": {"inner_steps": 3},
    "plain-explicit": {"inner_steps": 3, "fragments": 1, "overlap_steps": 0, "mix": 0.0},
    "streaming": {"inner_steps": 4, "fragments": 2, "overlap_steps": 1, "mix": 0.5, "outer_lr": 0.5},
    "topk": {"inner_steps": 3, "compressor": "topk", "k": 7},
    "streaming-topk": {"inner_steps": 4, "fragments": 2, "overlap_steps": 1, "compressor": "topk", "k": 5},
    "averaging": {"inner_steps": 3, "outer_lr": 1.0, "outer_momentum": 0.0},
}
STEPS = 11
RESUME = ("streaming-topk", 12, 6)  # scenario, steps, checkpoint after (fragment 0 in flight then)


# -- the reference ----------------------------------------------------------------------------------


def top_k(v: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(v)
    idx = v.abs().topk(k).indices
    out[idx] = v[idx]
    return out


def reference(
    params: dict[str, Any], steps: int, bounds: list[tuple[int, int]] | None = None, lead: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every worker's parameters and x_global after `steps`, by the DiLoCo / Streaming DiLoCo rules.

    `bounds`: the fragments' flat index ranges (default: commsgd's split); `lead`: steps a fragment is
    sent before its offset (torchft sends tau steps early and merges on the offset; commsgd sends on it).
    """
    h, p = params["inner_steps"], params.get("fragments", 1)
    bounds = bounds or FRAGMENTS[p]
    tau, mix = params.get("overlap_steps", 0), params.get("mix", 0.0)
    lr, mom = params.get("outer_lr", 0.7), params.get("outer_momentum", 0.9)
    k = params.get("k")
    models = [tiny_model(0) for _ in range(WORLD)]  # every worker starts from rank 0's model
    opts = [optimizer(m) for m in models]
    x_global = flat(models[0]).clone()
    velocity = torch.zeros_like(x_global)
    errors = [torch.zeros_like(x_global) for _ in range(WORLD)]
    pending: list[tuple[int, int, torch.Tensor]] = []  # (fragment, merge step, mean delta)

    def write(rank: int, x: torch.Tensor) -> None:
        torch.nn.utils.vector_to_parameters(x, models[rank].parameters())

    def merge(frag: int, mean: torch.Tensor) -> None:
        a, b = bounds[frag]
        velocity[a:b] = mom * velocity[a:b] + mean  # torch SGD momentum, dampening 0
        update = mean + mom * velocity[a:b] if mom > 0 else velocity[a:b]  # Nesterov
        x_global[a:b] -= lr * update
        for rank in range(WORLD):
            x = flat(models[rank])
            x[a:b] = mix * x[a:b] + (1 - mix) * x_global[a:b]
            write(rank, x)

    for step in range(1, steps + 1):
        for rank, (model, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            batch_loss(model, rank, step).backward()
            opt.step()
        for item in [q for q in pending if q[1] == step]:
            pending.remove(item)
            merge(item[0], item[2])
        for frag, (a, b) in enumerate(bounds):
            first = (frag + 1) * h // p - lead
            if step < first or (step - first) % h:
                continue
            sent = []
            for rank in range(WORLD):
                delta = x_global[a:b] - flat(models[rank])[a:b]
                if k is not None:
                    corrected = delta + errors[rank][a:b]
                    delta = top_k(corrected, k)
                    errors[rank][a:b] = corrected - delta
                sent.append(delta)
            mean = torch.stack(sent).mean(0)
            if tau == 0:
                merge(frag, mean)
            else:
                pending.append((frag, step + tau, mean))
    return [flat(m) for m in models], x_global


# -- the 2-worker job -------------------------------------------------------------------------------


def _train(ctx: Any, algo: Any, steps: range, state: bytes | None = None) -> tuple[Any, Any, Any]:
    model = tiny_model(ctx.rank)  # diloco starts every worker from rank 0's model
    opt = commsgd.CommOptimizer(optimizer(model), algo, model, ctx)
    if state is not None:
        saved = torch.load(io.BytesIO(state), weights_only=True)
        model.load_state_dict(saved["model"])
        opt.optimizer.load_state_dict(saved["optimizer"])
        algo.load_state_dict(saved["algorithm"])
    for step in steps:
        opt.step(lambda step=step: batch_loss(model, ctx.rank, step), step=step)  # type: ignore[misc]
    return model, opt, algo


def _evaluated(algo: Any, model: torch.nn.Module) -> torch.Tensor:
    with algo.evaluated_parameters():
        return flat(model)


def _job() -> dict[str, Any]:
    ctx = commsgd.init()
    out: dict[str, Any] = {}
    for name, params in SCENARIOS.items():
        algo = commsgd.build_algorithm("diloco", params)
        before = ctx.comm.meter.totals().bytes_sent
        model, _, algo = _train(ctx, algo, range(1, STEPS + 1))
        out[name] = {
            "params": flat(model),
            "global": _evaluated(algo, model),
            "summary": algo.summary(),
            "bytes": ctx.comm.meter.totals().bytes_sent - before,
        }
    # local SGD from the same start (rank 0's model everywhere)
    local = commsgd.build_algorithm("local_sgd", tau=SCENARIOS["averaging"]["inner_steps"])
    model = tiny_model(0)
    opt = commsgd.CommOptimizer(optimizer(model), local, model, ctx)
    for step in range(1, STEPS + 1):
        opt.step(lambda step=step: batch_loss(model, ctx.rank, step), step=step)  # type: ignore[misc]
    out["local_sgd"] = flat(model)
    # a pseudo-gradient float16 cannot carry on rank 1: every worker skips that outer step alike
    algo = commsgd.build_algorithm("diloco", inner_steps=3, compressor="fp16")
    model = tiny_model(ctx.rank)
    opt = commsgd.CommOptimizer(optimizer(model), algo, model, ctx)
    start = flat(model).clone()  # rank 0's model, after bind
    for step in range(1, 4):
        opt.step(lambda step=step: batch_loss(model, ctx.rank, step), step=step)  # type: ignore[misc]
        if step == 2 and ctx.rank == 1:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] += 1e6
    out["failure"] = {"start": start, "params": flat(model), "summary": algo.summary()}
    # resume: N steps against N/2, a checkpoint (through torch.save), and N/2 more on fresh objects
    name, steps, cut = RESUME
    model, opt, algo = _train(ctx, commsgd.build_algorithm("diloco", SCENARIOS[name]), range(1, cut + 1))
    assert algo.in_flight, "the checkpoint must fall while a fragment is in flight"
    algo.prepare_checkpoint()
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.optimizer.state_dict(),
            "algorithm": algo.state_dict(),
        },
        buffer,
    )
    resumed = commsgd.build_algorithm("diloco", SCENARIOS[name])
    model, _, resumed = _train(ctx, resumed, range(cut + 1, steps + 1), buffer.getvalue())
    straight, _, algo = _train(ctx, commsgd.build_algorithm("diloco", SCENARIOS[name]), range(1, steps + 1))
    out["resume"] = {
        "resumed": (flat(model), _evaluated(resumed, model)),
        "straight": (flat(straight), _evaluated(algo, straight)),
    }
    return out


@functools.cache
def results() -> list[dict[str, Any]]:
    return run_simulated(_job, WORLD)


@pytest.mark.parametrize("name", ["plain", "streaming", "topk", "streaming-topk", "averaging"])
def test_matches_reference(name: str) -> None:
    want_params, want_global = reference(SCENARIOS[name], STEPS)
    for rank, r in enumerate(results()):
        torch.testing.assert_close(r[name]["params"], want_params[rank], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r[name]["global"], want_global, atol=1e-5, rtol=1e-5)
    # the reference's rounds: every fragment after (i+1) H / P, then every H steps (merged by STEPS)
    params = SCENARIOS[name]
    h, p, tau = params["inner_steps"], params.get("fragments", 1), params.get("overlap_steps", 0)
    rounds = sum(len(range(first, STEPS - tau + 1, h)) for first in fragment_offsets(h, p))
    assert results()[0][name]["summary"]["outer_rounds"] == rounds


def test_one_fragment_no_overlap_is_plain_diloco() -> None:
    for r in results():
        assert torch.equal(r["plain"]["params"], r["plain-explicit"]["params"])
        assert torch.equal(r["plain"]["global"], r["plain-explicit"]["global"])


def test_outer_lr_one_without_momentum_is_local_sgd() -> None:
    for r in results():
        torch.testing.assert_close(r["averaging"]["params"], r["local_sgd"], atol=1e-6, rtol=1e-6)


def test_resume_with_a_fragment_in_flight_equals_an_uninterrupted_run() -> None:
    for r in results():
        resumed, straight = r["resume"]["resumed"], r["resume"]["straight"]
        assert torch.equal(resumed[0], straight[0])
        assert torch.equal(resumed[1], straight[1])


def test_pseudo_gradient_bytes_are_what_the_wire_carries() -> None:
    r = results()[0]
    dense = 2 * (WORLD - 1) / WORLD * 83 * 4  # one float32 all-reduce of the whole model
    assert r["plain"]["summary"]["pseudo_gradient_bytes_per_round"] == dense
    topk_payload = commsgd.compression.get("topk", k=7).payload_nbytes(83)
    assert r["topk"]["summary"]["pseudo_gradient_bytes_per_round"] == (WORLD - 1) * topk_payload
    rounds = r["plain"]["summary"]["outer_rounds"]
    assert r["plain"]["bytes"] == pytest.approx(rounds * dense)  # nothing else sent in training


# -- configuration (no processes) -----------------------------------------------------------------


def test_bad_schedules_are_one_line_config_errors() -> None:
    from commsgd.algorithms.diloco import DiLoCoParams

    with pytest.raises(ConfigError, match="overlap_steps: must be < inner_steps / fragments"):
        from_dict(DiLoCoParams, {"inner_steps": 8, "fragments": 4, "overlap_steps": 2}, "algo")
    with pytest.raises(ConfigError, match="fragments: 5 fragments need inner_steps >= 5"):
        from_dict(DiLoCoParams, {"inner_steps": 4, "fragments": 5}, "algo")
    with pytest.raises(ConfigError, match="powersgd"):
        from_dict(DiLoCoParams, {"compressor": "powersgd"}, "algo")
    with pytest.raises(ConfigError, match="outer_momentum"):
        from_dict(DiLoCoParams, {"outer_momentum": 1.0}, "algo")


def test_error_feedback_defaults_to_biased_compressors() -> None:
    from commsgd.algorithms.diloco import DiLoCoParams

    for name, on in [("topk", True), ("sign", True), ("qsgd", False), ("none", False)]:
        p = from_dict(DiLoCoParams, {"compressor": name}, "algo")
        assert p.feedback_on(p.build()) is on, name


def test_fragments_are_contiguous_nonempty_and_balanced() -> None:
    assert split_contiguous([48, 8, 24, 3], 2) == [range(0, 1), range(1, 4)]
    assert split_contiguous([10] * 6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    assert split_contiguous([1, 1, 1, 100], 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ConfigError, match="3 parameter tensors"):
        split_contiguous([1, 2, 3], 4)
    assert fragment_offsets(8, 1) == [8]
    assert fragment_offsets(8, 4) == [2, 4, 6, 8]


def test_a_failed_compression_skips_the_outer_step_on_every_worker() -> None:
    for r in results():
        failure = r["failure"]
        assert failure["summary"]["skipped_outer_rounds"] == 1
        assert failure["summary"]["outer_rounds"] == 0
        assert torch.equal(failure["params"], failure["start"])  # everyone back at the unchanged x_global
