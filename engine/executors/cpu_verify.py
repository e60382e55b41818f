"""CPU bs1 verify steps: FlatDecoder's math over the k + 1 rows of one sequence, and their chain sampling."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from engine.cpu_decode import FlatDecoder
from engine.sampler import sample
from engine.scheduler import ScheduledChunk
from engine.spec.tree import DraftTree
from kernels.store_kv.reference import store_kv_ref

# (layer index, residual stream [T, H] after it): where a draft head's feature capture is fed.
LayerKeep = Callable[[int, torch.Tensor], None]


class FlatRows:
    """T consecutive positions of one sequence (a verify chunk: the last token and its drafts) through the
    flat decoder's weights and rotary tables, in ~40 torch calls a layer as its bs1 step; the eager forward
    costs ~30 ms more per step at this model's size on this CPU (docs/benchmarks.md, speculation on CPU).

    `keep`, when given, receives each layer's residual stream — the layer output a forward hook sees as
    h + residual — so the draft head's feature capture needs no module hooks (which this path never calls).
    Same math as LlamaModel.forward up to the order of fp32 roundings (tests/unit/test_cpu_verify_path.py).
    """

    def __init__(self, flat: FlatDecoder) -> None:
        self.flat = flat

    def __call__(self, token_ids: Sequence[int], position: int, first_slot: int,
                 keep: LayerKeep | None = None, tree: DraftTree | None = None) -> torch.Tensor:
        """Final-normed hidden states [T, H] of `token_ids` at positions position.., whose context occupies
        cache slots first_slot..first_slot + position + T - 1; stores their KV in every layer. With `tree`
        (a tree verify): row i sits at slot position + i but at position position + depth(i) (RoPE) and
        sees the context and its tree ancestors instead of the rows before it."""
        f = self.flat
        hq, hk, d = f.num_heads, f.num_kv_heads, f.head_dim
        t, half, group = len(token_ids), d // 2, hq // hk
        seq_len = position + t
        slots = torch.arange(position, seq_len) + first_slot
        positions = slots - first_slot if tree is None else torch.tensor(tree.positions(position))
        cos, sin = f.model.rotary(positions)  # [T, D/2] each
        cos_t = torch.addcmul(f.cos_bias, cos.view(t, 1, 1, half), f.cos_scale)  # [T, Hq + 2Hk, 1, D/2]
        sin_t = sin.view(t, 1, 1, half) * f.sin_scale  # [T, Hq + 2Hk, 2, D/2]
        if tree is None:  # row i (position + i) sees the context and the rows up to itself
            future = (torch.arange(seq_len).view(1, seq_len) > positions.view(t, 1)).view(1, t, 1, seq_len)
        else:  # row i sees the context and the rows of its ancestor mask
            hidden_rows = [[not mask >> j & 1 for j in range(t)] for mask in tree.ancestor_masks()]
            future = torch.cat([torch.zeros(t, position, dtype=torch.bool), torch.tensor(hidden_rows)], dim=1)
            future = future.view(1, t, 1, seq_len)
        s = f.model.embed_tokens(torch.tensor(list(token_ids)))  # the residual stream [T, H]
        for i, (w_in, qkv_proj, o_proj, w_post, gate_up_proj, down_proj) in enumerate(f.layers):
            qkv = qkv_proj(f._norm(s, w_in)).view(t, hq + 2 * hk, 2, half)
            rot = torch.addcmul(qkv * cos_t, qkv.flip(2), sin_t).view(t, hq + 2 * hk, d)
            k_cache, v_cache = f.kv.layer(i)
            store_kv_ref(rot[:, hq:hq + hk], rot[:, hq + hk:], k_cache, v_cache, slots)
            keys_t, values = f.context(i, seq_len, first_slot, None)
            q = rot[:, :hq].reshape(t, hk, group, d).transpose(0, 1).reshape(hk, t * group, d)
            scores = torch.bmm(q, keys_t).view(hk, t, group, seq_len)  # already scaled
            probs = scores.masked_fill_(future, float("-inf")).softmax(dim=-1).view(hk, t * group, seq_len)
            attn = torch.bmm(probs, values).view(hk, t, group * d).transpose(0, 1).reshape(t, hq * d)
            s = f.mlp(o_proj(attn, residual=s), w_post, gate_up_proj, down_proj)
            if keep is not None:
                keep(i, s)
        return f.model.norm(s)


def sample_chain(logits: torch.Tensor, chunk: ScheduledChunk) -> list[int]:
    """The chunk's sampled ids from its rows' logits [T, V], up to the first row that rejects its draft.

    Row j decides draft j; rows past a rejection decide nothing, so they get -1 (the scheduler keeps the
    drafts up to the first mismatch and the token there). Each row is sampled as a one-row decode step
    would (seed, position). The LM head runs over every row in one pass: kernels/cpu_quant's f32_linear
    reads the 49k × 576 head once for all rows (2-3 rows cost about one, 6 rows ~1.6× one on this CPU, where
    one row at a time cost τ rows), and each row's logits are the one-row product's bits.
    Only for chunks without draft distributions (those are rejection-sampled over all rows together).
    """
    drafts, params = chunk.draft_token_ids, chunk.seq.sampling
    first = chunk.start + chunk.num_new_tokens - chunk.num_sampled + 1  # the index row 0's token takes
    rows = chunk.num_sampled
    ids = sample(logits[:rows], [params] * rows, list(range(first, first + rows))).tolist()
    for j, token in enumerate(ids[:len(drafts)]):
        if token != drafts[j]:
            return ids[:j + 1] + [-1] * (rows - j - 1)
    return ids
