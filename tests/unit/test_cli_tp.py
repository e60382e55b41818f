"""`pdserve up --prefill-tp/--decode-tp/--tp-comm`: defaults, bad values naming the flag, a TP size larger
than the model's heads refused before anything starts, and the per-role engine configs the launcher builds."""
from __future__ import annotations

import pytest

from deploy import cli
from deploy.cli import build_parser


def test_tp_flags_default_to_one_rank_and_bf16() -> None:
    args = build_parser().parse_args(["up"])
    assert (args.prefill_tp, args.decode_tp, args.tp_comm) == (1, 1, "bf16")
    args = build_parser().parse_args(["up", "--prefill-tp", "2", "--decode-tp", "1", "--tp-comm", "int8"])
    assert (args.prefill_tp, args.decode_tp, args.tp_comm) == (2, 1, "int8")


@pytest.mark.parametrize(("argv", "message"), [
    (["--prefill-tp", "0"], "argument --prefill-tp: --prefill-tp must be >= 1, got 0"),
    (["--decode-tp", "two"], "argument --decode-tp: --decode-tp wants a whole number, got 'two'"),
    (["--tp-comm", "fp8"], "argument --tp-comm: invalid choice: 'fp8'"),
])
def test_a_bad_tp_value_names_the_flag(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", *argv])
    assert message in capsys.readouterr().err


def test_a_tp_size_above_the_models_heads_is_refused_before_starting(capsys) -> None:
    # The embedded SmolLM2-135M has 9 attention heads (3 kv heads); read from its config, no weights loaded.
    assert cli.main(["up", "--device", "cpu", "--prefill-tp", "2", "--decode-tp", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pdserve up")
    assert "--decode-tp 16: the model has 9 attention heads (3 kv heads)" in err
