"""Flags and commands of healing and scaling: parsing, defaults, errors; joining Ray with token auth."""

from __future__ import annotations

import os
import socket

import pytest

from deploy import ray_connect
from deploy.cli import build_parser, main
from deploy.launcher import ClusterConfig
from engine.config import EngineConfig


def parse_up(*flags: str):
    return build_parser().parse_args(["up", *flags])


def test_healing_flags_have_defaults_and_parse() -> None:
    args = parse_up()
    assert (args.migration_limit, args.kv_failure_policy, args.max_worker_restarts) == (1, "recompute", -1)
    assert (args.admin_port, args.prefill_resources, args.decode_resources) == (50052, None, None)
    args = parse_up("--migration-limit", "0", "--kv-failure-policy", "fail",
                    "--decode-resources", "pdserve_decode=1,accel_h100=0.5", "--prefill-resources", "none")
    assert args.migration_limit == 0 and args.kv_failure_policy == "fail"
    assert args.decode_resources == {"pdserve_decode": 1.0, "accel_h100": 0.5}
    assert args.prefill_resources == {}


@pytest.mark.parametrize(("flags", "message"), [
    (("--migration-limit", "-1"), "--migration-limit must be >= 0"),
    (("--kv-failure-policy", "retry"), "invalid choice: 'retry'"),
    (("--decode-resources", "pdserve_decode"), "--decode-resources wants NAME=AMOUNT"),
    (("--prefill-resources", "gpu=0"), "--prefill-resources wants NAME=AMOUNT"),
])
def test_bad_healing_flags_name_the_flag(flags: tuple[str, ...], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_up(*flags)
    assert message in capsys.readouterr().err


def test_role_resources_default_to_the_role_label_only_on_a_joined_cluster() -> None:
    engine = EngineConfig()
    assert ClusterConfig(engine).role_resources("decode") is None
    joined = ClusterConfig(engine, ray_address="10.0.0.1:6379")
    assert joined.role_resources("decode") == {"pdserve_decode": 1}
    joined = ClusterConfig(engine, ray_address="auto", prefill_resources={}, decode_resources={"big": 2.0})
    assert joined.role_resources("prefill") is None and joined.role_resources("decode") == {"big": 2.0}


def test_scale_needs_a_size_and_a_running_launcher(capsys) -> None:
    assert main(["scale"]) == 2
    assert "give --prefill N and/or --decode M" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    assert main(["scale", "--decode", "2", "--admin", f"127.0.0.1:{port}", "--timeout", "2"]) == 2
    assert "cannot reach the launcher" in capsys.readouterr().err


@pytest.mark.parametrize(("address", "env", "expected"), [
    ("127.0.0.1:6390", {"RAY_AUTH_TOKEN": "t"}, "token"),  # explicit address + a token: Ray would not send it
    ("auto", {"RAY_AUTH_TOKEN": "t"}, None),  # Ray finds the cluster and the token itself
    (None, {"RAY_AUTH_TOKEN": "t"}, None),  # private instance
    ("127.0.0.1:6390", {"RAY_AUTH_TOKEN": "t", "RAY_AUTH_MODE": "disabled"}, "disabled"),  # operator's choice
])
def test_token_auth_is_switched_on_only_for_an_explicit_address(address, env, expected, monkeypatch,
                                                                 tmp_path) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "")  # recorded, so what the launcher sets is undone afterwards
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ray_connect.use_token_auth_if_available(address)
    assert os.environ.get("RAY_AUTH_MODE") == expected


def test_no_token_anywhere_leaves_ray_alone(monkeypatch, tmp_path) -> None:
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not ray_connect.ray_token_available()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    assert ray_connect.ray_token_available()


@pytest.mark.parametrize(("address", "operator", "expected"), [
    (None, None, "0"),  # a private Ray: workers compete for CPU at the router's priority, not nice 15
    (None, "10", "10"),  # the operator's own choice wins
    ("10.0.0.1:6379", None, None),  # a joined cluster's raylets were started with their own setting
])
def test_private_ray_starts_its_workers_at_nice_zero(monkeypatch, address, operator, expected) -> None:
    import ray

    seen: list[str | None] = []
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(os.environ.get("RAY_worker_niceness")))
    monkeypatch.setenv("RAY_worker_niceness", operator or "")  # recorded, so what init_ray sets is undone
    if operator is None:
        monkeypatch.delenv("RAY_worker_niceness")
    assert ray_connect.init_ray(address, 2, 1 << 20) is (address is None)
    assert seen == [expected]
