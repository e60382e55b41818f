"""The step message rank 0 broadcasts: a batch survives encode → decode with what the model reads."""
from contracts.sampling import SamplingParams
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence
from engine.tp.step_message import LoadMessage, StepMessage, decode, encode, encode_load


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
