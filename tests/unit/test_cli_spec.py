"""`pdserve up --spec/--spec-k/--spec-head`: bad values name their flag before anything starts."""
from __future__ import annotations

import pytest

from deploy import cli, cli_up

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("argv", "message"), [
    (["--spec", "eagle"], "argument --spec: invalid choice: 'eagle'"),
    (["--spec-k", "0"], "--spec-k must be >= 1, got 0"),
    (["--spec-k", "17"], "--spec-k must be <= 16, got 17"),
    (["--spec-k", "five"], "--spec-k wants a whole number, got 'five'"),
    (["--spec-adaptive", "maybe"], "argument --spec-adaptive: invalid choice"),
    (["--spec-tree", "2,x"], "--spec-tree wants whole numbers separated by commas"),
    (["--spec-tree", "2,0,1"], "--spec-tree wants 1..16 levels, each >= 1"),
    (["--spec-tree", "4,4,4"], "--spec-tree 4,4,4 has 84 nodes; at most 63 fit"),
    (["--spec-tree-max-nodes", "0"], "--spec-tree-max-nodes must be >= 1, got 0"),
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
    spec = cli_up.spec_config(args)
    assert (spec.method, spec.k, spec.head_path, spec.adaptive) == ("head", 3, None, False)
    assert cli_up.spec_config(cli.parse_args(["up"])).method == cli_up.DEFAULT_SPEC


def test_spec_tree_flags_become_the_tree_config(capsys) -> None:
    args = cli.parse_args(["up", "--spec", "head", "--spec-tree", "2,2,1,1,1", "--spec-tree-max-nodes", "8"])
    spec = cli_up.spec_config(args)
    assert (spec.tree_branching, spec.tree_max_nodes, spec.draft_depth) == ((2, 2, 1, 1, 1), 8, 5)
    assert cli_up.spec_config(cli.parse_args(["up", "--spec", "head"])).tree_branching == ()
    assert cli.main(["up", "--spec", "ngram", "--spec-tree", "2,1"]) == 2
    assert "--spec-tree is for --spec head (got --spec ngram)" in capsys.readouterr().err
    assert cli.main(["up", "--spec", "head", "--spec-tree-max-nodes", "4"]) == 2
    assert "--spec-tree-max-nodes needs --spec-tree" in capsys.readouterr().err
