"""The quality harnesses (`bench.quality.ppl`, `kv_cache_ppl`, `weights_ppl`) refuse a bad flag value by name
before loading a model: a usage error, not a traceback."""
from __future__ import annotations

import sys

import pytest
import torch

from bench.quality import kv_cache_ppl, ppl, weights_ppl

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("main", [ppl.main, kv_cache_ppl.main, weights_ppl.main],
                         ids=["ppl", "kv_cache_ppl", "weights_ppl"])
@pytest.mark.parametrize(("flags", "message"), [
    (["--text-file", "/nonexistent/text.txt"], "--text-file /nonexistent/text.txt: cannot read it"),
    (["--text-file", "/"], "--text-file /: cannot read it"),  # a directory
    (["--text-file", sys.executable], "as UTF-8 text"),  # a binary file
])
def test_an_unreadable_text_file_is_a_usage_error_naming_the_flag(main, flags, message, monkeypatch,
                                                                   capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["quality", *flags])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_negative_threads_is_a_usage_error_naming_the_flag(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["ppl", "--threads", "-1"])
    with pytest.raises(SystemExit) as e:
        ppl.main()
    assert e.value.code == 2 and "--threads must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--weights", "w9"], "--weights w9: each must be one of w8, w8a8, w4a16"),
    (["--weights", "bf16"], "--weights bf16: each must be one of"),  # the baseline row is always there
    (["--weights", ","], "--weights ,: each must be one of"),
    (["--tokens", "1"], "--tokens 1: at least 2"),
])
def test_weights_ppl_refuses_a_bad_scheme_or_token_count_by_name(flags, message, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["weights_ppl", *flags])
    with pytest.raises(SystemExit) as e:
        weights_ppl.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_kv_cache_ppl_refuses_a_negative_jitter_count(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["kv_cache_ppl", "--offset-jitter", "-1"])
    with pytest.raises(SystemExit) as e:
        kv_cache_ppl.main()
    assert e.value.code == 2 and "--offset-jitter -1: must be >= 0" in capsys.readouterr().err


def test_jittered_offsets_are_float16_neighbours_or_unmoved_and_seeded() -> None:
    offsets = (torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(0)) * 5).half().float()
    offsets[0, 0, :4] = torch.tensor([0.0, -0.0, 65504.0, -65504.0])
    jittered = kv_cache_ppl.jitter_offsets(offsets, seed=3)
    assert torch.equal(jittered, kv_cache_ppl.jitter_offsets(offsets, seed=3))
    assert not torch.equal(jittered, kv_cache_ppl.jitter_offsets(offsets, seed=4))
    assert torch.isfinite(jittered).all() and torch.equal(jittered, jittered.half().float())
    bits = offsets.half().view(torch.int16).int()
    moved_bits = jittered.half().view(torch.int16).int()
    moved = bits != moved_bits
    assert 0.5 < moved.float().mean() < 0.8  # two of three directions move a value
    nonzero = moved & (offsets != 0) & (jittered != 0)  # same sign: a neighbour is one bit pattern away
    assert ((bits - moved_bits)[nonzero].abs() == 1).all()
