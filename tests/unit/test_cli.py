"""`pdserve` first contact: flag help and defaults, usage on bad flags, --json text, restart on a port."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket

import pytest
from fakes import fake_cluster, run, serve_router

from deploy import cli, cli_checks, cli_up, client
from router.validation import GenerateInput

pytestmark = pytest.mark.timeout(60)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_flag_has_help_and_its_default_shows() -> None:
    for name, sub in _subcommands().items():
        text = sub.format_help()
        for action in sub._actions:
            assert action.help, f"pdserve {name} {action.option_strings or action.dest} has no help"
        for flag, default in (("--port", "50051"), ("--drain-seconds", "10.0"), ("--address", "127.0.0.1")):
            if any(flag in a.option_strings for a in sub._actions):
                assert f"(default: {default}" in " ".join(text.split()), (name, flag)


def test_a_bad_flag_prints_the_subcommands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, usage in (
        (["generate", "hi", "--bogus"], "usage: pdserve generate"),
        (["info", "-x"], "pdserve info"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"usage: {usage.removeprefix('usage: ')}") and "unrecognized arguments" in err


@pytest.mark.parametrize(("argv", "flag"), [
    (["generate", "hi", "--seed", "-1"], "--seed"),  # was a ValueError traceback from the protobuf field
    (["generate", "hi", "--seed", str(2**64)], "--seed"),
    (["generate", "hi", "--top-k", str(2**31)], "--top-k"),
    (["generate", "hi", "--max-tokens", str(2**31)], "--max-tokens"),
    (["generate", "hi", "--timeout", "-1"], "--timeout"),  # was DEADLINE_EXCEEDED from the server
    (["info", "--timeout", "0"], "--timeout"),
    (["up", "--fused-max-slowdown", "-1"], "--fused-max-slowdown"),  # was a ValueError traceback
    (["up", "--fused-max-slowdown", "nan"], "--fused-max-slowdown"),  # was accepted
    (["up", "--local-prefill-max-tokens", "-5"], "--local-prefill-max-tokens"),  # was a traceback
    (["up", "--max-worker-restarts", "-5"], "--max-worker-restarts"),  # was Ray's error after it started
    (["up", "--served-model-name", ""], "--served-model-name"),  # was a traceback
    (["up", "--host", "nonexistent.invalid", "--port", "0"], "--host"),  # was gRPC's bind error after Ray
    (["scale", "--decode", "1", "--admin", "nonsense"], "--admin"),  # was a ValueError traceback
    (["generate", "hi", "--raw", "--system", "be brief"], "--system"),  # was dropped without a word
    (["up", "--device", "cpu", "--kernels", "triton"], "--kernels"),  # failed only once the workers started
])
def test_a_bad_flag_value_is_a_usage_error_naming_the_flag(argv, flag, capsys) -> None:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and f"pdserve {argv[0]}: error: " in err and flag in err.split("error: ", 1)[1]
    assert "Traceback" not in err


@pytest.mark.skipif(cli_checks._cuda_available(), reason="this machine has a CUDA device")
def test_up_device_cuda_without_a_gpu_is_a_usage_error_not_a_wait_for_one(capsys) -> None:
    # Was: Ray started, then the workers waited forever for a GPU, with no word to the user.
    assert cli.main(["up", "--device", "cuda", "--port", "0"]) == 2
    assert "--device cuda: this machine has no CUDA device" in capsys.readouterr().err


def test_up_checks_tls_and_token_files_before_starting_anything(tmp_path, capsys) -> None:
    assert cli.main(["up", "--tls-cert", str(tmp_path / "c.pem")]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    empty = tmp_path / "token"
    empty.write_text("\n")
    assert cli.main(["up", "--auth-token-file", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pdserve up") and "auth token file" in err and "is empty" in err


def _started_configs(monkeypatch) -> list:
    """The ClusterConfigs `pdserve up` would start, with the launcher stopped before Ray."""
    from deploy import launcher

    started = []

    class Cluster:
        def __init__(self, config: launcher.ClusterConfig) -> None:
            started.append(config)

        def start_workers(self) -> None:
            raise KeyboardInterrupt  # stop before Ray: only the config is under test

        def close(self) -> None:
            pass

    monkeypatch.setattr(launcher, "LocalCluster", Cluster)
    return started


UP_ON_FREE_PORTS = ["up", "--device", "cpu", "--port", "0", "--metrics-port", "0", "--http-port", "0",
                    "--admin-port", "0"]


def test_up_flags_reach_the_routers_config_as_given(monkeypatch) -> None:
    """The router's flags build the RouterConfig the launcher serves (it adds only the model's limits)."""
    started = _started_configs(monkeypatch)
    argv = ["up", "--device", "cpu", "--port", "0", "--metrics-port", "0", "--http-port", "0",
            "--admin-port", "0", "--queue-capacity", "7", "--migration-limit", "0",
            "--kv-failure-policy", "fail", "--prefill-placement", "threshold",
            "--local-prefill-max-tokens", "33", "--max-request-bytes", "999"]
    assert cli.main(argv) == 0
    (config,) = started
    router = config.router
    assert (router.port, router.metrics_port, router.http_port) == (0, 0, None)
    assert (router.queue_capacity, router.migration_limit, router.kv_failure_policy) == (7, 0, "fail")
    assert (router.prefill_placement, router.local_prefill_max_tokens) == ("threshold", 33)
    assert (router.max_request_bytes, router.request_timeout_s) == (999, cli_up.UP_REQUEST_TIMEOUT_S)
    assert router.placement_ttft_slo_s is None


def test_placement_ttft_slo_reaches_the_router_and_bad_values_are_usage_errors(monkeypatch, capsys) -> None:
    started = _started_configs(monkeypatch)
    assert cli.main([*UP_ON_FREE_PORTS, "--placement-ttft-slo", "0.75"]) == 0
    assert started[0].router.placement_ttft_slo_s == 0.75  # RouterConfig had it; no flag reached it
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*UP_ON_FREE_PORTS, "--placement-ttft-slo", bad])
        assert exit_info.value.code == 2 and "--placement-ttft-slo" in capsys.readouterr().err
    argv = [*UP_ON_FREE_PORTS, "--placement-ttft-slo", "1", "--prefill-placement", "threshold"]
    assert cli.main(argv) == 2  # the threshold policy never reads it: saying so beats ignoring it
    assert "--placement-ttft-slo is for --prefill-placement cost" in capsys.readouterr().err
    assert len(started) == 1
    assert "--placement-ttft-slo SECONDS" in _subcommands()["up"].format_help()


def _conn(address: str) -> client.Connection:
    return client.Connection(address)


def test_generate_json_carries_the_text_and_plain_output_ends_with_a_newline(capsys) -> None:
    async def body() -> tuple[int, int]:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode) as h:
            opts = GenerateInput(text="hi", max_tokens=4)
            as_json = await asyncio.to_thread(client.generate, _conn(h.server.address), opts, True, 10)
            as_json_out = capsys.readouterr().out
            plain = await asyncio.to_thread(client.generate, _conn(h.server.address), opts, False, 10)
        assert json.loads(as_json_out)["text"] == "abcd"
        assert json.loads(as_json_out)["final"]["finish_reason"] == "FINISH_REASON_LENGTH"
        return as_json, plain

    assert run(body()) == (0, 0)
    assert capsys.readouterr().out == "abcd\n"  # piped (captured) stdout gets whole lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int, path: str) -> bytes:
    """HTTP/1.0 and read to EOF: the server closes first, so its side of the connection sits in TIME_WAIT."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_restart_on_the_same_ports_right_after_a_scrape() -> None:
    """A scrape leaves the server's side of the connection in TIME_WAIT for a minute: the start-up port check
    and every server must still bind (SO_REUSEADDR), as `pdserve up` does right after Ctrl-C."""
    ports = {"port": _free_port(), "metrics_port": _free_port(), "http_port": _free_port()}

    async def serve_and_scrape() -> None:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode, **ports) as h:
            for port, path in ((h.server.metrics_port, "/metrics"), (h.server.http_port, "/health")):
                assert (await asyncio.to_thread(_scrape, port, path)).split(b" ", 2)[1] == b"200"

    run(serve_and_scrape())
    for name, port in ports.items():
        cli_checks.check_port_free("127.0.0.1", port, f"--{name}")
    run(serve_and_scrape())
