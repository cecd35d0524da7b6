"""KVManager: the one owner of KV blocks. The scheduler and the admission policies ask it for blocks; nothing else
touches the pool's reference counts or a sequence's block list. Pure Python, no torch.

A sequence's own blocks live in `seq.blocks`: block i holds positions base + i * block_size ... where base is
seq.start rounded down to a block boundary (a sequence that starts mid-block, below a shared node ending there,
leaves its first block's leading slots unused). The runner reads them to map positions to slots; only this class
writes them.

    allocate(seq, upto)        give seq the blocks to hold positions < upto (all or nothing)
    free(seq)                  return seq's blocks (its KV stays valid while cached, for the caching baselines)
    match_prefix(seq)          the cached blocks holding a prefix of seq's prompt (caching baselines)
    release_ahead(seq, upto)   hand back the blocks seq took ahead of position `upto`, not yet written
    check_integrity(seqs)      every reference accounted for, the free queue consistent (tests, debugging)
"""

from __future__ import annotations

from collections.abc import Iterable

from batchllm.kv.block_pool import BlockPool
from batchllm.request import Sequence


class KVManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = False):
        """`caching`: keep the hashes of full prompt blocks so later sequences can reuse them (vLLM's automatic
        prefix caching, the baselines'); freed blocks then go tail first, so a prompt's head stays cached longest."""
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.caching = caching

    # ------------------------------------------------------------------ figures (read-only)
    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_used(self) -> int:
        return self.pool.num_used

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, seq: Sequence, upto: int) -> int:
        """Own blocks `seq` needs to hold its positions below `upto`."""
        if upto <= seq.start:
            return 0
        return -(-(upto - seq.start + seq.start % self.block_size) // self.block_size)

    def missing(self, seq: Sequence, upto: int) -> int:
        """Blocks `seq` still lacks to hold its positions below `upto` (0 when it has them)."""
        return max(0, self.blocks_for(seq, upto) - len(seq.blocks))

    def free_blocks(self) -> list[int]:
        """The free blocks in the order they will be handed out."""
        return list(self.pool.free_queue)

    def ref_count(self, block: int) -> int:
        return self.pool.ref_count[block]

    # ------------------------------------------------------------------ the verbs
    def allocate(self, seq: Sequence, upto: int) -> bool:
        """Give `seq` the blocks it lacks to hold positions below `upto`, from the head of the free queue. Returns
        False, changing nothing, when fewer are free."""
        extra = self.missing(seq, upto)
        if extra > self.pool.num_free:
            return False
        if extra:
            seq.blocks.extend(self.pool.allocate(extra))
        return True

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s own blocks; `seq.blocks` becomes empty."""
        self.pool.free(seq.blocks[::-1] if self.caching else seq.blocks)
        seq.blocks = []

    def match_prefix(self, seq: Sequence, compute_from: int | None = None) -> list[int]:
        """Cached blocks holding a prefix of `seq`'s prompt that ends at or before position `compute_from` (default:
        the last token, whose logits sample), so every position from there on is computed. Changes nothing;
        `take_prefix` claims them."""
        limit = seq.num_tokens - 1 if compute_from is None else min(compute_from, seq.num_tokens - 1)
        hit = []
        for h in seq.block_hashes[:limit // self.block_size]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def revive_cost(self, blocks: Iterable[int]) -> int:
        """How many of these cached blocks sit in the free queue: claiming them takes that many free blocks."""
        return sum(1 for b in blocks if self.pool.ref_count[b] == 0)

    def take_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        """`seq` (holding no blocks) starts with these cached blocks, one reference each."""
        assert not seq.blocks, "take_prefix on a sequence that holds blocks"
        self.pool.touch(blocks)
        seq.blocks = list(blocks)

    def cache_filled(self, seq: Sequence, before: int, after: int) -> None:
        """Register the prompt blocks `seq` filled while its computed tokens went from `before` to `after`
        (caching only)."""
        if not self.caching or not seq.block_hashes:
            return
        full = min(after // self.block_size, len(seq.block_hashes))
        for i in range(before // self.block_size, full):
            self.pool.cache(seq.blocks[i], seq.block_hashes[i])

    def release_ahead(self, seq: Sequence, upto: int) -> bool:
        """Hand back `seq`'s blocks beyond those holding positions below `upto` (taken ahead of its writes).
        Returns whether any came back."""
        keep = self.blocks_for(seq, upto)
        if len(seq.blocks) <= keep:
            return False
        self.pool.free(seq.blocks[keep:])
        del seq.blocks[keep:]
        return True

    def cached_prefix_blocks(self, seq: Sequence) -> int:
        """Leading prompt blocks of `seq` whose KV is cached (SGLang's longest-prefix-match key)."""
        n = 0
        for h in seq.block_hashes:
            if self.pool.lookup(h) is None:
                break
            n += 1
        return n

    def check_integrity(self, seqs: Iterable[Sequence]) -> None:
        """Raise AssertionError unless every block's reference count equals the number of live sequences holding
        it, and the free queue holds exactly the unreferenced blocks, each once."""
        refs = [0] * self.pool.num_blocks
        for s in seqs:
            for b in s.blocks:
                refs[b] += 1
        assert refs == self.pool.ref_count, "reference counts differ from the sequences' block lists"
        free = list(self.pool.free_queue)
        assert len(free) == len(set(free)), "a block is queued twice"
        assert set(free) == {b for b, r in enumerate(refs) if r == 0}, "the free queue is not the unreferenced set"
