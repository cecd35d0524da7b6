"""The KV block pool: block ids, reference counts, the free queue and (for the caching baselines) a hash -> block map.

Pure Python. A block is *free* when its reference count is 0; free blocks wait in `free_queue`. A free block may still
carry a hash (its KV is valid and can be revived by `touch`); `allocate` takes blocks from the head of the queue and
evicts the hash of any block it hands out. Freed blocks with a hash join the tail, so cached blocks are evicted in
least-recently-freed order; freed blocks without one join the head and are handed out first: they hold nothing worth
keeping, and their memory is already mapped, while a never-used block costs a page fault per 4 KiB on its first write
(on CPU, when the cache is committed lazily; about 0.5 GB/s here).

    allocate(n)  -> takes n blocks from the queue head (ref 0 -> 1, hash evicted)
    touch(b)     -> ref += 1 (a free cached block leaves the queue)
    free(b)      -> ref -= 1; at 0 the block goes to the queue tail if it has a hash (keeping it), else to the head
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class NoFreeBlocks(Exception):
    """Raised by `allocate` when fewer blocks are free than asked for; nothing was changed."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks from the head of the free queue, evicting their cached hashes."""
        if n > len(self.free_queue):
            raise NoFreeBlocks(f"asked for {n} blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            block, _ = self.free_queue.popitem(last=False)
            h = self.block_hash[block]
            if h is not None:
                del self.cached[h]
                self.block_hash[block] = None
            self.ref_count[block] = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[int]) -> None:
        """Add a reference to each block (reviving free cached blocks)."""
        for b in blocks:
            if self.ref_count[b] == 0:
                del self.free_queue[b]
            self.ref_count[b] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block. Blocks reaching 0 join the queue in the given order: at the tail when
        they carry a hash, at the head (handed out next, in that order) when they do not."""
        reuse = []
        for b in blocks:
            if self.ref_count[b] <= 0:
                raise RuntimeError(f"block {b} freed more often than referenced")
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self.free_queue[b] = None
                if self.block_hash[b] is None:
                    reuse.append(b)
        for b in reversed(reuse):
            self.free_queue.move_to_end(b, last=False)

    def cache(self, block: int, block_hash: int) -> None:
        """Record that `block` holds the KV of the full block chain `block_hash` (first writer wins)."""
        if block_hash in self.cached or self.block_hash[block] is not None:
            return
        self.cached[block_hash] = block
        self.block_hash[block] = block_hash

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chain hashes of the full blocks of `token_ids`: hash i covers tokens [0, (i + 1) * block_size)."""
    out: list[int] = []
    parent = 0
    for i in range(len(token_ids) // block_size):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        out.append(parent)
    return out
