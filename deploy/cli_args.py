"""Value types of the `pdserve` flags: each parser names its flag in the error argparse prints."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from engine.spec.config import MAX_TREE_NODES, tree_nodes


def whole_number(flag: str, minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """`maximum`: the largest the wire carries (an int32 or uint64 field), so no value fails in the client."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} wants a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{flag} must be <= {maximum}, got {value}")
        return value
    return parse


INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1


def positive(flag: str) -> Callable[[str], int]:
    return whole_number(flag, 1)


def non_negative(flag: str) -> Callable[[str], int]:
    return whole_number(flag, 0)


def spec_k(text: str) -> int:
    """--spec-k: draft tokens per verify step, 1..16 (SpecConfig's bounds)."""
    value = positive("--spec-k")(text)
    if value > 16:
        raise argparse.ArgumentTypeError(f"--spec-k must be <= 16, got {value}")
    return value


def spec_tree(text: str) -> tuple[int, ...]:
    """--spec-tree: the draft tree's branching per depth, e.g. 2,2,1,1,1 (SpecConfig.tree_branching)."""
    try:
        branching = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--spec-tree wants whole numbers separated by commas (e.g. 2,2,1,1,1), got {text!r}") from None
    if not 1 <= len(branching) <= 16 or min(branching) < 1:
        raise argparse.ArgumentTypeError(f"--spec-tree wants 1..16 levels, each >= 1, got {text!r}")
    if tree_nodes(branching) > MAX_TREE_NODES:
        raise argparse.ArgumentTypeError(f"--spec-tree {text} has {tree_nodes(branching)} nodes; at most "
                                         f"{MAX_TREE_NODES} fit (prune with --spec-tree-max-nodes)")
    return branching


def seconds(flag: str, allow_zero: bool = True) -> Callable[[str], float]:
    """allow_zero=False for deadlines: a zero or negative one could only ever fail as DEADLINE_EXCEEDED."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} wants a number of seconds, got {text!r}") from None
        if not (0 <= value < float("inf") and (allow_zero or value > 0)):
            raise argparse.ArgumentTypeError(f"{flag} must be {'>=' if allow_zero else '>'} 0, got {text}")
        return value
    return parse


def slowdown(text: str) -> float:
    """--fused-max-slowdown: 0 (off) or a finite factor > 1 (EngineConfig.fused_step_max_slowdown)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fused-max-slowdown wants a number, got {text!r}") from None
    if not (value == 0 or (value > 1 and math.isfinite(value))):
        raise argparse.ArgumentTypeError(f"--fused-max-slowdown must be 0 (off) or > 1, got {text}")
    return value


def non_empty(flag: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{flag} must not be empty (leave the flag out for the default)")
        return text
    return parse


def resources(flag: str) -> Callable[[str], dict[str, float]]:
    """NAME=AMOUNT[,NAME=AMOUNT...] -> {name: amount}; "none" -> {} (no custom resource at all)."""
    def parse(text: str) -> dict[str, float]:
        if text.strip().lower() == "none":
            return {}
        out: dict[str, float] = {}
        for item in text.split(","):
            name, sep, amount = item.strip().partition("=")
            try:
                value = float(amount)
            except ValueError:
                value = -1.0
            if not sep or not name or value <= 0:
                raise argparse.ArgumentTypeError(
                    f"{flag} wants NAME=AMOUNT[,NAME=AMOUNT...] with AMOUNT > 0 (or 'none'), got {text!r}")
            out[name] = value
        return out
    return parse


def port(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} wants a port number, got {text!r}") from None
        if not 0 <= value < 65536:
            raise argparse.ArgumentTypeError(f"{flag} must be in 0..65535 (0 = any free port), got {value}")
        return value
    return parse


def host_port(flag: str) -> Callable[[str], str]:
    """HOST:PORT (HOST may be left out: loopback), as deploy.scaling.request_scale dials it."""
    def parse(text: str) -> str:
        _, sep, number = text.rpartition(":")
        if not sep or not number.isdigit() or not 0 < int(number) < 65536:
            raise argparse.ArgumentTypeError(f"{flag} wants HOST:PORT (e.g. 127.0.0.1:50052), got {text!r}")
        return text
    return parse


def http_port(text: str) -> int | None:
    """--http-port: a port, 0 = no HTTP door, "auto" = any free port (see --ready-file)."""
    if text == "auto":
        return 0
    value = port("--http-port")(text)
    return None if value == 0 else value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every flag's help, except where there is no value to show (None, False):
    those flags say in their help what leaving them out means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
