"""`pdserve up --kv-cache`: its values, the engine dtype each names, a bad value naming the flag."""
from __future__ import annotations

import pytest

from deploy.cli import build_parser
from deploy.cli_up import KV_CACHE_FLAG
from engine.config import KV_CACHE_DTYPES


def test_kv_cache_flag_defaults_to_auto_and_names_engine_cache_dtypes() -> None:
    assert build_parser().parse_args(["up"]).kv_cache == "auto"
    assert build_parser().parse_args(["up", "--kv-cache", "int4"]).kv_cache == "int4"
    assert KV_CACHE_FLAG["bf16"] == "bfloat16"
    assert set(KV_CACHE_FLAG.values()) <= set(KV_CACHE_DTYPES)


def test_a_bad_kv_cache_value_names_the_flag(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--kv-cache", "fp8"])
    assert "argument --kv-cache: invalid choice: 'fp8'" in capsys.readouterr().err
