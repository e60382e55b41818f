"""The messages rank 0 broadcasts: a batch survives encode → decode with what the model reads; a load names
its blocks; an idle follower waits for the next one however long it takes."""
import time
from datetime import timedelta

import torch.distributed as dist

from contracts.sampling import SamplingParams
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence
from engine.tp.group import TPGroup
from engine.tp.local_ranks import run_local_ranks
from engine.tp.step_message import (
    LoadMessage,
    StepMessage,
    decode,
    encode,
    encode_load,
    receive_message,
    send_message,
    send_step,
)


def test_batch_round_trips_tokens_positions_blocks_and_drafts():
    prefill = Sequence("a", [5, 6, 7, 8, 9], SamplingParams(), block_table=[3, 4])
    decode_seq = Sequence("b", [1, 2, 3], SamplingParams(temperature=0.7), block_table=[9])
    verify = ScheduledChunk(decode_seq, 2, 3, 3, draft_token_ids=(40, 41))
    batch = SchedulerOutput((ScheduledChunk(prefill, 1, 3, 0), verify), ())
    message = decode(encode(batch.chunks, (3, 4)))
    back = message.batch
    assert [c.token_ids for c in back.chunks] == [[6, 7, 8], [3, 40, 41]]
    assert [(c.start, c.num_new_tokens, c.num_sampled) for c in back.chunks] == [(1, 3, 0), (2, 3, 3)]
    assert [c.seq.block_table for c in back.chunks] == [[3, 4], [9]]
    assert message.export_blocks == (3, 4)
    assert decode(encode(())) == StepMessage(SchedulerOutput((), ()), ())


def test_load_message_round_trips_its_blocks():
    assert decode(encode_load((7, 2, 9))) == LoadMessage((7, 2, 9))


def _idle_then_stop(group: TPGroup, path: str) -> object:
    """Re-join on a group whose collectives time out after 1 s; rank 0 stays idle for 3 s, then stops."""
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timedelta(seconds=1)
    options._devices = [dist.ProcessGroupGloo.create_default_device()]
    short = TPGroup(group.rank, group.size, dist.ProcessGroupGloo(dist.FileStore(path, 2), group.rank, 2,
                                                                  options), group.device)
    if short.rank == 0:
        time.sleep(3)
        send_message(short, encode_load((5,)))
        send_step(short, None)
        return None
    return [receive_message(short), receive_message(short)]


def test_an_idle_follower_waits_past_the_groups_timeout(tmp_path):
    # A worker may see no request for longer than any collective's timeout: followers must keep waiting.
    _, follower = run_local_ranks(_idle_then_stop, 2, str(tmp_path / "store"))
    assert follower == [LoadMessage((5,)), None]
