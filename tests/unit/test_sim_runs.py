"""The simulator's prefix cache and run-file reading: hits skip cached blocks, specs come from up flags."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.serving.sim_costs import DecodeCost, PrefillCost, StepCosts, TransferCost
from bench.serving.sim_events import ClusterSpec, SimRequest, simulate
from bench.serving.sim_fit import observations
from bench.serving.sim_runs import LEGACY_CLUSTER, cluster_for, load_run, prefixes

# 10 ms + 1 ms a prompt token + 0.01 ms a (query, key) pair; 1000 B a token over 10 layers at 1 GB/s.
COSTS = StepCosts(prefill=PrefillCost(10.0, 1.0, 0.01), decode=DecodeCost(20.0, 5.0),
                  transfer=TransferCost(1000, 10, 1.0, latency_ms=2.0), router_ms=3.0)
CACHED = ClusterSpec("disagg", prefix_caching=True)


def _ttft_ms(prefill_ms: float, sent_tokens: int) -> float:
    return 3 + prefill_ms + COSTS.transfer.exposed_ms(sent_tokens, prefill_ms)


def test_a_prompt_after_one_with_its_prefix_computes_and_sends_only_the_rest() -> None:
    # 256-token system prompt + 32 user tokens; the second request, sent after the first ended, finds the
    # prefix's 16 full blocks on the prefill worker (skips them) and on the decode worker (not sent).
    reqs = [SimRequest(0.0, 288, 2, prefix=(0, 256)), SimRequest(5.0, 288, 2, prefix=(0, 256)),
            SimRequest(10.0, 288, 2, prefix=(1, 256))]
    first, second, other = simulate(CACHED, COSTS, reqs)
    cold = COSTS.prefill.step_ms([(288, 0)])
    assert first.ttft == pytest.approx(_ttft_ms(cold, 288) / 1e3)
    assert second.ttft == pytest.approx(_ttft_ms(COSTS.prefill.step_ms([(32, 256)]), 32) / 1e3)
    assert other.ttft == pytest.approx(first.ttft)  # another system prompt: a miss
    off = simulate(ClusterSpec("disagg"), COSTS, reqs)
    assert [r.ttft for r in off] == pytest.approx([first.ttft] * 3)


def test_the_block_of_the_last_token_is_always_computed() -> None:
    # A prompt that is all prefix (256 tokens = 16 blocks) reuses 15 blocks: the 16th holds its last token.
    reqs = [SimRequest(0.0, 256, 2, prefix=(0, 256)), SimRequest(5.0, 256, 2, prefix=(0, 256))]
    _, second = simulate(CACHED, COSTS, reqs)
    assert second.ttft == pytest.approx(_ttft_ms(COSTS.prefill.step_ms([(16, 240)]), 16) / 1e3)


def test_the_cluster_spec_comes_from_the_up_flags_with_the_cli_defaults() -> None:
    assert cluster_for(None) == LEGACY_CLUSTER
    spec = cluster_for(["--device", "cpu", "--prefill-placement", "threshold",
                        "--local-prefill-max-tokens", "0"])
    assert (spec.prefix_caching, spec.long_prefill_threshold, spec.prefill_workers) == (True, 128, 1)
    spec = cluster_for(["--prefix-caching", "off", "--long-prefill-threshold", "0", "--prefill", "2",
                        "--prefill-placement", "threshold"])
    assert (spec.prefix_caching, spec.long_prefill_threshold, spec.prefill_workers) == (False, 0, 2)
    spec = cluster_for(["--device", "cpu"])  # conditional placement, the CLI's default
    assert (spec.mode, spec.prefill_workers, spec.fused_max_slowdown) == ("cond", 1, 1.35)
    colocated = ["--decode", "2", "--prefill-placement", "threshold", "--local-prefill-max-tokens", "4096",
                 "--fused-max-slowdown", "1.2"]
    spec = cluster_for(colocated, max_prompt=512)
    assert (spec.mode, spec.decode_workers, spec.fused_max_slowdown) == ("coloc", 2, 1.2)
    with pytest.raises(ValueError, match="colocated"):
        cluster_for(colocated, max_prompt=5000)  # some prompts local, some remote: not modelled


def test_a_compare_file_gives_each_request_its_system_prompt_and_the_fit_its_hits(tmp_path: Path) -> None:
    cfg = {"num_requests": 6, "shared_prefix": [2, 2, 256], "slo_ttft": 2.0, "slo_tpot": 0.3}
    assert prefixes(cfg) == [(0, 256), (1, 256), (0, 256), (1, 256), (0, 256), (1, 256)]
    assert prefixes({**cfg, "num_requests": [4]}) == prefixes(cfg)[:4]  # older files: a one-item list
    records = [{"index": i, "warmup": i == 0, "sent_at": 10.0 * i, "status": "OK", "prompt_tokens": 288,
                "output_tokens": 4, "ttft": 0.5, "tpot": 0.05, "e2e": 0.7} for i in range(6)]
    path = tmp_path / "serving_cpu_tree_shared.json"
    path.write_text(json.dumps([{"config": cfg, "rate": 0.1, "sweep": None, "run": {}, "records": records,
                                 "up_flags": ["--prefill-placement", "threshold"]}]))
    run = load_run(path)
    assert run.stem == "tree_shared" and run.spec.prefix_caching
    assert [q.prefix for q in run.replay(records)] == prefixes(cfg)
    assert [o.cached for o in observations(run, records)] == [0, 0, 256, 256, 256, 256]
