"""LocalCluster.close(), pdserve up's last step: a second Ctrl-C while it runs hurries it, never breaks it."""

from __future__ import annotations

import os
import signal

import pytest
import ray

from deploy import launcher

pytestmark = pytest.mark.timeout(30)


class _Handle:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self._calls = name, calls
        self.shutdown = self  # handle.shutdown.remote(), as on a Ray actor

    def remote(self) -> str:
        self._calls.append(f"shutdown {self.name}")
        return self.name


def test_ctrl_c_during_close_skips_polite_shutdowns_but_kills_every_worker_and_stops_ray(monkeypatch) -> None:
    calls: list[str] = []

    def get(ref: str, timeout: float) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again while the first worker stops

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "kill", lambda handle: calls.append(f"kill {handle.name}"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    cluster = launcher.LocalCluster(launcher.ClusterConfig(engine=None, router=None))  # type: ignore[arg-type]
    cluster.prefill = [("prefill-0", _Handle("p0", calls))]
    cluster.decode = [("decode-0", _Handle("d0", calls)), ("decode-1", _Handle("d1", calls))]
    cluster._started_ray = True
    before = signal.getsignal(signal.SIGINT)
    try:
        cluster.close()
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during close() raised KeyboardInterrupt (a traceback; the kills never ran)")
    assert calls == ["shutdown p0", "kill p0", "kill d0", "kill d1", "ray.shutdown"]
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C works as before once close() is done
