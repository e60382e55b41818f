"""The draft head's KV of every drafting sequence, resident in one preallocated slot per sequence."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from contracts.sampling import SamplingParams
from engine.spec.draft_head import DraftHead
from engine.spec.head_drafter import HeadDrafter
from engine.spec.head_rows import accept_rows


class HeadKVSlots:
    """`k`, `v` [slots, Hk, capacity, D] and `last` [slots, H] in the head's dtype: slot s holds one
    sequence's head KV of its accepted positions in rows 0 .. length - 1 and the block output of its last
    one. Accepts append rows in place at the sequence's length (no concatenation, no copy into graph
    inputs); the batched accept and the drafting graphs (engine/spec/head_graphs.py) read and write the
    leading slots of these same buffers, so a slot is also the sequence's row in every batched call.

    `capacity` is max_len plus `spare` rows: batched calls compute padded rows and drafts past a
    sequence's accepted rows and write their k, v there (nothing reads them). Slots are handed out lowest
    first, so the live ones stay near the front and the batched calls' bucket (the highest live slot + 1)
    near the number of drafting sequences. The host keeps each slot's length and position (its drafter):
    batched calls get them as inputs, never read them back.

    Memory: 2 · slots · Hk · capacity · D elements of the head's dtype (the embedded model's head at 32
    slots, max_len 8192: 385 MiB in float32, which DraftHead.load keeps its parameters in today).
    """

    def __init__(self, head: DraftHead, embed: nn.Embedding, slots: int, max_len: int, spare: int,
                 draft_vocab_limit: int | None = None) -> None:
        c = head.config
        weight = head.fc.weight
        self.head, self.embed, self.limit = head, embed, draft_vocab_limit
        self.device, self.max_len = weight.device, max_len
        capacity = -(-(max_len + spare) // 16) * 16  # 16-row multiples keep the attention mask aligned
        self.k = torch.zeros(slots, c.num_kv_heads, capacity, c.head_dim, dtype=weight.dtype,
                             device=self.device)
        self.v = torch.zeros_like(self.k)
        self.capacity = capacity
        self.last = torch.zeros(slots, c.hidden_size, dtype=weight.dtype, device=self.device)
        self.owners: list[SlotHeadDrafter | None] = [None] * slots

    @property
    def in_use(self) -> int:
        """The highest live slot + 1 (0 when none is): the rows a batched call must cover."""
        return max((s + 1 for s, owner in enumerate(self.owners) if owner is not None), default=0)

    def new_drafter(self, first_position: int = 0,
                    sampling: SamplingParams | None = None) -> SlotHeadDrafter | None:
        """A drafter in the lowest free slot, or None when every slot is taken."""
        try:
            slot = self.owners.index(None)
        except ValueError:
            return None
        drafter = SlotHeadDrafter(self, slot, first_position, sampling)
        self.owners[slot] = drafter
        return drafter

    def release(self, drafter: SlotHeadDrafter) -> None:
        if self.owners[drafter.slot] is drafter:
            self.owners[drafter.slot] = None

    def host_state(self, rows: int) -> list[list[int]]:
        """[length, position] of slots 0 .. rows - 1 (free slots: 0, 0; their rows compute garbage that
        lands in their own free slot)."""
        return [[0, 0] if o is None else [o.length, o.num_committed] for o in self.owners[:rows]]

    @torch.inference_mode()  # as the graphs write them: the buffers may have been made in inference mode
    def append(self, drafter: SlotHeadDrafter, next_ids: Sequence[int], g: torch.Tensor) -> None:
        """One sequence's rows (next tokens, fused features [n, H]) into its slot, eagerly: prompts, the
        prefill worker's shipped feature, and accepts too wide for the batched call."""
        s, n, length = drafter.slot, g.shape[0], drafter.length
        if length + n > self.max_len:
            raise ValueError(f"{length + n} head rows exceed the slots' max_len {self.max_len}")
        device = self.device
        state = torch.tensor([[length, drafter.num_committed, n]], device=device)
        accept_rows(self.head, self.embed, self.k[s:s + 1, :, :length + n], self.v[s:s + 1, :, :length + n],
                    self.last[s:s + 1], g.unsqueeze(0), torch.tensor([list(next_ids)], device=device),
                    state[:, 0], state[:, 1], state[:, 2])


class SlotHeadDrafter(HeadDrafter):
    """A HeadDrafter whose head KV and last output live in one slot of a HeadKVSlots: `k`, `v` and `last`
    are views of the slot, so its own `propose` (sampled drafts, T > 0) and tree drafts read them as they
    read a HeadDrafter's. Its accepts either run alone (`accept`) or in the batched accept of
    HeadDraftGraphs, which then calls `advance`. `release` gives the slot back (the sequence is gone)."""

    def __init__(self, slots: HeadKVSlots, slot: int, first_position: int,
                 sampling: SamplingParams | None) -> None:
        super().__init__(slots.head, slots.embed, slots.limit, first_position, sampling)
        self.slots, self.slot = slots, slot
        self.length = 0  # head KV rows in the slot
        self.has_last = False

    @property
    def k(self) -> torch.Tensor | None:
        return self.slots.k[self.slot:self.slot + 1, :, :self.length] if self.length else None

    @property
    def v(self) -> torch.Tensor | None:
        return self.slots.v[self.slot:self.slot + 1, :, :self.length] if self.length else None

    @property
    def last(self) -> torch.Tensor | None:
        return self.slots.last[self.slot:self.slot + 1, None] if self.has_last else None

    def _append(self, next_ids: Sequence[int], g: torch.Tensor) -> None:
        self.slots.append(self, next_ids, g)
        self.length += g.shape[0]
        self.has_last = True

    def advance(self, n: int) -> None:
        """The batched accept wrote n (> 0) more accepted positions into the slot."""
        self.length += n
        self.num_committed += n
        self.has_last = True

    def release(self) -> None:
        self.slots.release(self)
