"""Joins in-process prefill and decode services by a KV channel, as the launcher joins their actors."""
from __future__ import annotations

import threading

from decode_worker.service import DecodeService
from prefill_worker.service import PrefillService


def connect_services(prefill: PrefillService, decode: DecodeService) -> None:
    """The decode side accepts the prefill side's channel (blocking, so on a thread) while it connects."""
    accept = threading.Thread(target=decode.accept_channel, args=(prefill.worker_id,))
    accept.start()
    prefill.connect_channel(decode.channel_address())
    accept.join(timeout=60)
