"""Network faults on the KV path: prefill and decode services in two network namespaces joined by a veth pair;
tc netem delay, loss and corruption, and a partition. Transfers end by lease, the failure policy applies, and
no token differs from the undisturbed run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.conftest import REPO

# soak: two service pairs and lease expiries (~a minute on 2 cores); kept out of `make test`.
pytestmark = [pytest.mark.e2e, pytest.mark.soak, pytest.mark.timeout(600)]

LEASE_S = 3.0  # both sides' KV lease: a partition must end a transfer this soon, not after the default 120 s
REPLY_S = 120.0  # a peer's answer to one command (model build and channel join included)
PROMPTS = [[1, 504, 345, 282, 469, 314], list(range(100, 170)), list(range(300, 330))]  # random:tiny: 512 ids
MAX_TOKENS = 12
_TAG = os.getpid() % 10000
NS_PREFILL, NS_DECODE = f"pdsk{_TAG}p", f"pdsk{_TAG}d"
DEV_PREFILL, DEV_DECODE = f"pdsk{_TAG}p0", f"pdsk{_TAG}d0"
# A private /30 that exists only inside the two namespaces; nothing outside them is reachable or affected.
_NET = f"10.{200 + _TAG % 50}.{_TAG % 250}"
IP_PREFILL, IP_DECODE = f"{_NET}.1", f"{_NET}.2"
NETEM = {"delay": ["delay", "150ms", "50ms"], "loss": ["loss", "15%"], "corrupt": ["corrupt", "5%"]}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    probe = f"pdsk{_TAG}x"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"the kernel does not allow network namespaces here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture(scope="module")
def veth_pair() -> Iterator[None]:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    try:
        _ip("netns", "add", NS_PREFILL)
        _ip("netns", "add", NS_DECODE)
        _ip("link", "add", DEV_PREFILL, "netns", NS_PREFILL, "type", "veth", "peer", "name", DEV_DECODE,
            "netns", NS_DECODE)
        for ns, dev, ip in ((NS_PREFILL, DEV_PREFILL, IP_PREFILL), (NS_DECODE, DEV_DECODE, IP_DECODE)):
            _ip("-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        yield
    finally:
        for ns in (NS_PREFILL, NS_DECODE):  # deleting a namespace deletes its end of the veth pair
            _ip("netns", "del", ns, check=False)


def _netem_missing() -> str | None:
    """None where tc netem works on the veth; else why not (e.g. a kernel built without sch_netem)."""
    added = subprocess.run(["ip", "netns", "exec", NS_PREFILL, "tc", "qdisc", "add", "dev", DEV_PREFILL,
                            "root", "netem", "delay", "1ms"], capture_output=True, text=True)
    if added.returncode != 0:
        return f"tc netem is unavailable in this kernel: {added.stderr.strip()}"
    _clear_netem()
    return None


def _set_netem(args: list[str]) -> None:
    subprocess.run(["ip", "netns", "exec", NS_PREFILL, "tc", "qdisc", "replace", "dev", DEV_PREFILL, "root",
                    "netem", *args], check=True, capture_output=True)


def _clear_netem() -> None:
    subprocess.run(["ip", "netns", "exec", NS_PREFILL, "tc", "qdisc", "del", "dev", DEV_PREFILL, "root"],
                   capture_output=True)


class Peer:
    """A netns_peer.py process: commands as JSON lines on its stdin, answers matched by tag."""

    def __init__(self, ns: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.soak.netns_peer", *args],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
        self._replies: dict[Any, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            reply = json.loads(line)
            with self._cond:
                self._replies[reply.pop("tag")] = reply
                self._cond.notify_all()

    def send(self, **cmd: Any) -> int:
        with self._cond:
            self._next += 1
            tag = self._next
        self.proc.stdin.write(json.dumps({"tag": tag, **cmd}) + "\n")
        self.proc.stdin.flush()
        return tag

    def wait(self, tag: Any) -> dict[str, Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: tag in self._replies or self.proc.poll() is not None, REPLY_S):
                raise TimeoutError(f"no answer to {tag} within {REPLY_S} s")
            if tag not in self._replies:
                raise RuntimeError(f"peer exited with {self.proc.returncode}")
            reply = self._replies.pop(tag)
        assert "exception" not in reply, reply["exception"]
        return reply

    def call(self, **cmd: Any) -> dict[str, Any]:
        return self.wait(self.send(**cmd))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Pair:
    prefill: Peer
    decode: Peer
    policy: str  # the decode side's --kv-failure-policy
    reference: list[list[int]]
    _count: int = 0

    def generate(self, prompt: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reserve on decode, prefill (KV over the veth), stream: (decode's result, prefill's answer)."""
        self._count += 1
        rid = f"r{self._count}"
        blocks = self.decode.call(op="reserve", rid=rid, prompt=prompt, max_tokens=MAX_TOKENS)["blocks"]
        prefilled = self.prefill.send(op="prefill", rid=rid, prompt=prompt, max_tokens=MAX_TOKENS,
                                      blocks=blocks)
        result = self.decode.call(op="result", rid=rid)
        return result, self.prefill.wait(prefilled)

    def stats(self) -> dict[str, Any]:
        return self.decode.call(op="stats")


@pytest.fixture(scope="module", params=["recompute", "fail"])
def pair(request: pytest.FixtureRequest, veth_pair: None) -> Iterator[Pair]:
    decode = Peer(NS_DECODE, "decode", "--host", IP_DECODE, "--lease", str(LEASE_S),
                  "--policy", request.param)
    prefill = None
    try:
        hello = decode.wait("hello")
        prefill = Peer(NS_PREFILL, "prefill", "--host", IP_PREFILL, "--lease", str(LEASE_S),
                       "--decode", json.dumps(hello))
        prefill.wait("hello")
        built = Pair(prefill, decode, request.param, [])
        for prompt in PROMPTS:  # the undisturbed run every faulty one is compared with
            result, answer = built.generate(prompt)
            assert result["reason"] == "LENGTH" and "first" in answer, (result, answer)
            built.reference.append(result["ids"])
        yield built
    finally:
        _clear_netem()
        _ip("-n", NS_PREFILL, "link", "set", DEV_PREFILL, "up", check=False)
        for peer in (prefill, decode):
            if peer is not None:
                peer.close()


def _failures(stats: dict[str, Any]) -> float:
    return sum(v for k, v in stats["counters"].items() if k.startswith("pdserve_kv_transfer_failures"))


def test_partition_ends_the_transfer_by_lease_and_the_policy_applies(pair: Pair) -> None:
    before = pair.stats()
    _ip("-n", NS_PREFILL, "link", "set", DEV_PREFILL, "down")  # both ends lose carrier: nothing crosses
    try:
        result, answer = pair.generate(PROMPTS[1])
    finally:
        _ip("-n", NS_PREFILL, "link", "set", DEV_PREFILL, "up")
    after = pair.stats()
    print(f"\npartition ({pair.policy}): decode {result['reason']} {result['error']!r}; prefill {answer}; "
          f"{after['frames_dropped']} stale frames dropped, failure counters {after['counters']}")
    assert "error" in answer, "the prefill side's send must fail by its lease"
    assert _failures(after) == _failures(before) + 1
    if pair.policy == "recompute":
        assert result["reason"] == "LENGTH" and result["ids"] == pair.reference[1]
    else:
        assert result["reason"] == "ABORT" and "KV transfer failed" in (result["error"] or "")
        assert result["ids"] == []
    # Healed: the next transfers cross the veth again (the stale frames of the cut one are dropped).
    for prompt, expected in zip(PROMPTS, pair.reference, strict=True):
        result, answer = pair.generate(prompt)
        assert "first" in answer and result["ids"] == expected
    final = pair.stats()
    assert _failures(final) == _failures(after)
    assert final["free"] == final["total"], "KV blocks leaked"


@pytest.mark.parametrize("fault", sorted(NETEM))
def test_netem_fault_gives_no_wrong_token(pair: Pair, fault: str) -> None:
    missing = _netem_missing()
    if missing:
        pytest.skip(missing)
    before = pair.stats()
    _set_netem(NETEM[fault])
    try:
        outcomes = [pair.generate(prompt) for prompt in PROMPTS]
    finally:
        _clear_netem()
    after = pair.stats()
    failed = _failures(after) - _failures(before)
    print(f"\nnetem {' '.join(NETEM[fault])} ({pair.policy}): {failed:.0f} transfers failed, "
          f"{after['frames_dropped']} frames dropped, counters {after['counters']}")
    for (result, _), expected in zip(outcomes, pair.reference, strict=True):
        if result["reason"] == "ABORT":  # only the fail policy may end a request, and only with the reason
            assert pair.policy == "fail" and "KV transfer failed" in (result["error"] or "")
        else:
            assert result["ids"] == expected, "a token differs from the undisturbed run"
    assert after["free"] == after["total"], "KV blocks leaked"
