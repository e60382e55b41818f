"""CPU split-fused steps run flat: decode rows and prompt chunks' rows through FlatDecoder's weights."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.cpu_decode import FlatDecoder
from engine.executor import SampledStep
from engine.executors.batch_inputs import SamplingRows
from engine.sampler import sample
from engine.scheduler import ScheduledChunk, SchedulerOutput
from kernels.store_kv.reference import store_kv_ref

Plan = Sequence[tuple[ScheduledChunk, Sequence[int]]]  # (chunk, the KV blocks its context uses) per chunk


class FlatFusedStep:
    """A step of decodes plus prefill chunks (split-fused) through the flat decoder's weights: every row of
    every chunk shares one [R, K] product per projection and the LM head's rows, attention runs per chunk
    over its own blocks (views when consecutive, else gathered), each chunk's rows causal among themselves.

    Why: the eager forward costs a fixed ~30 ms more than the flat step at this model's size on this CPU, so
    even one prefill token beside one decode made the step 1.86x a decode-only one (docs/benchmarks.md,
    "Flat CPU decode of small batches"); the split-fused credit (engine/step_cost.py) paid that fixed cost
    from the decode streams' budget instead of buying prefill tokens with it. Same math as LlamaModel.forward
    up to the order of fp32 roundings (tests/unit/test_cpu_fused_step.py).
    """

    def __init__(self, flat: FlatDecoder, max_decodes: int) -> None:
        self.flat = flat
        self.max_decodes = max_decodes

    def plan(self, batch: SchedulerOutput) -> list[tuple[ScheduledChunk, list[int]]] | None:
        """(chunk, the KV blocks its context uses) per chunk of a split-fused step — 1..max_decodes
        one-token decodes and at least one prompt chunk, no drafts; None for anything else (decode-only
        and bs1 steps have their own flat paths; prefill-only steps, verifies and short block tables go
        to the eager forward)."""
        chunks = batch.chunks
        decodes = sum(c.num_new_tokens == c.num_sampled == 1 for c in chunks)
        if not 1 <= decodes <= self.max_decodes or decodes == len(chunks):
            return None
        block_size, found = self.flat.kv.block_size, []
        for chunk in chunks:
            if chunk.tree is not None or chunk.draft_token_ids or chunk.num_sampled > 1:
                return None
            blocks = chunk.seq.block_table[:(chunk.start + chunk.num_new_tokens - 1) // block_size + 1]
            if len(blocks) * block_size < chunk.start + chunk.num_new_tokens:
                return None  # the eager path reports a short block table
            found.append((chunk, blocks))
        return found

    def launch(self, batch: SchedulerOutput, plan: Plan) -> SampledStep | None:
        """The step's sampled ids (one per chunk that ends a prompt or decodes); stores every row's KV."""
        rows = SamplingRows.of(batch.chunks)
        hidden = self.hidden(plan, rows.rows)
        if not rows.rows:
            return None
        token_ids = sample(self.flat.logits(hidden), rows.params, rows.positions)
        return SampledStep(token_ids, rows.seqs, hidden)

    def hidden(self, plan: Plan, keep_rows: Sequence[int]) -> torch.Tensor:
        """Final-normed hidden states [len(keep_rows), H] of the rows keep_rows (flat row indices, chunks in
        order) of the chunks in `plan`, each chunk's tokens at positions start.. with their context in its
        blocks; stores every row's KV in every layer."""
        f = self.flat
        hq, hk, d = f.num_heads, f.num_kv_heads, f.head_dim
        heads, half, group = hq + 2 * hk, d // 2, hq // hk
        block_size = f.kv.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        # Per chunk: first row, rows, context length, first slot (consecutive blocks) or the blocks to gather,
        # and its causal mask (rows past the first see later positions as -inf).
        spans: list[tuple[int, int, int, int, torch.Tensor | None, torch.Tensor | None]] = []
        for chunk, blocks in plan:
            n, start = chunk.num_new_tokens, chunk.start
            seq_len = start + n
            consecutive = list(blocks) == list(range(blocks[0], blocks[0] + len(blocks)))
            gather = None if consecutive else torch.tensor(list(blocks))
            future = None
            if n > 1:
                future = (torch.arange(seq_len).view(1, seq_len) >
                          torch.arange(start, seq_len).view(n, 1)).view(1, n, 1, seq_len)
            spans.append((len(token_ids), n, seq_len, blocks[0] * block_size, gather, future))
            token_ids.extend(chunk.token_ids)
            positions.extend(range(start, seq_len))
            slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, seq_len))
        r = len(token_ids)
        s, cos_t, sin_t, slot = f.row_inputs(token_ids, positions, slots)
        for i, (w_in, qkv_proj, o_proj, w_post, gate_up_proj, down_proj) in enumerate(f.layers):
            qkv = qkv_proj(f._norm(s, w_in)).view(r, heads, 2, half)
            rot = torch.addcmul(qkv * cos_t, qkv.flip(2), sin_t).view(r, heads, d)  # q pre-scaled, v as is
            k_cache, v_cache = f.kv.layer(i)
            store_kv_ref(rot[:, hq:hq + hk], rot[:, hq + hk:], k_cache, v_cache, slot)
            outs = []
            for first, n, seq_len, first_slot, gather, future in spans:
                keys_t, values = f.context(i, seq_len, first_slot, gather)
                q = rot[first:first + n, :hq].reshape(n, hk, group, d).transpose(0, 1)
                q = q.reshape(hk, n * group, d)  # already scaled
                scores = torch.bmm(q, keys_t)  # [Hk, n G, S]
                if future is not None:
                    scores = scores.view(hk, n, group, seq_len).masked_fill_(future, float("-inf"))
                    scores = scores.view(hk, n * group, seq_len)
                attn = torch.bmm(scores.softmax(dim=-1), values)  # [Hk, n G, D]
                outs.append(attn.view(hk, n, group * d).transpose(0, 1).reshape(n, hq * d))
            s = f.mlp(o_proj(torch.cat(outs), residual=s), w_post, gate_up_proj, down_proj)
        # Only the sampling rows need the final norm (it is per row).
        return f.model.norm(s[torch.tensor(list(keep_rows), dtype=torch.long)])

