"""`pdserve up --spec/--spec-k/--spec-head`: bad values name their flag before anything starts."""
from __future__ import annotations

import pytest

from deploy import cli

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("argv", "message"), [
    (["--spec", "eagle"], "argument --spec: invalid choice: 'eagle'"),
    (["--spec-k", "0"], "--spec-k must be >= 1, got 0"),
    (["--spec-k", "17"], "--spec-k must be <= 16, got 17"),
    (["--spec-k", "five"], "--spec-k wants a whole number, got 'five'"),
    (["--spec-adaptive", "maybe"], "argument --spec-adaptive: invalid choice"),
])
def test_bad_spec_values_name_the_flag(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["up", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pdserve up") and message in err


def test_spec_head_needs_spec_head_and_an_existing_file(tmp_path, capsys) -> None:
    head = tmp_path / "head.safetensors"
    head.write_bytes(b"")
    assert cli.main(["up", "--spec", "ngram", "--spec-head", str(head)]) == 2
    assert "--spec-head is for --spec head (got --spec ngram)" in capsys.readouterr().err
    assert cli.main(["up", "--spec", "head", "--spec-head", str(tmp_path / "missing")]) == 2
    assert "--spec-head: no such file" in capsys.readouterr().err


def test_spec_flags_become_the_engine_spec_config() -> None:
    args = cli.parse_args(["up", "--spec", "head", "--spec-k", "3", "--spec-adaptive", "off"])
    spec = cli._spec_config(args)
    assert (spec.method, spec.k, spec.head_path, spec.adaptive) == ("head", 3, None, False)
    assert cli._spec_config(cli.parse_args(["up"])).method == cli.DEFAULT_SPEC
