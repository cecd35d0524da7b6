"""What the scheduler tracks per sequence. Pure Python, no torch.

A *sequence* owns a run of consecutive token positions `[start, num_tokens)` and the KV blocks that hold them. Two
kinds exist:

- a **node**: a shared prefix of a group, computed once, sampling nothing; it holds its blocks until every sequence
  below it has finished;
- a **leaf**: one sample of one request (a request with n = 3 is three leaves). It samples a token whenever all of its
  tokens have been computed.

A leaf's KV lies in its ancestors' blocks, then its own:

    positions  0 ........ 70 ............ 133 .............. num_tokens
               [ node A (root) ][ node B (nested) ][ leaf's own tokens + output ]
    blocks     A.blocks          B.blocks           leaf.blocks
               start=0           start=A.end        start=B.end

A shared node may end mid-block (its requests share a few tokens past a block boundary). The sequence below it then
starts mid-block too: its position `start` sits at slot `start % block_size` of its first own block, and that
block's leading slots stay unused (never read), so siblings write their own tokens into their own blocks and no
block is copied. `slot_of` maps a position to its cache slot.
"""

from __future__ import annotations

from enum import Enum

NO_LOGPROBS = 1 << 62  # lp_from of a sequence none of whose positions needs prompt logprobs


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    COMPUTED = "computed"  # a node whose tokens are all in KV; waits for its children
    FINISHED = "finished"


class Sequence:
    __slots__ = (
        "seq_id", "token_ids", "start", "parent", "is_node", "num_prompt_tokens", "num_computed_tokens", "blocks",
        "status", "children", "pending_children", "request_index", "sample_index", "max_tokens", "group",
        "block_hashes", "num_cached_tokens", "num_preemptions", "admitted_step", "lp_from", "lp_k",
    )

    def __init__(self, seq_id: int, token_ids: list[int], start: int, parent: Sequence | None, is_node: bool,
                 request_index: int = -1, sample_index: int = 0, max_tokens: int = 0, group: int = 0):
        self.seq_id = seq_id
        self.token_ids = token_ids  # positions 0 .. num_tokens - 1 (prompt, then output for leaves)
        self.start = start
        self.parent = parent
        self.is_node = is_node
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = start  # absolute: positions below this are in the KV cache
        self.blocks: list[int] = []  # own blocks (block i holds positions start + i * block_size ...); KVManager's
        self.status = Status.WAITING
        self.children: list[Sequence] = []
        self.pending_children = 0
        self.request_index = request_index
        self.sample_index = sample_index
        self.max_tokens = max_tokens
        self.group = group
        self.block_hashes: list[int] = []  # caching policies: chain hashes of the prompt's full blocks
        self.num_cached_tokens = 0  # prompt tokens whose KV came from elsewhere (a shared node or the cache)
        self.num_preemptions = 0
        self.admitted_step = -1
        # prompt logprobs: the rows at positions >= lp_from (below the last prompt position of a leaf; every position
        # of a node) go through the lm_head, with the lp_k most likely tokens; NO_LOGPROBS: none
        self.lp_from = NO_LOGPROBS
        self.lp_k = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def lp_last(self) -> int:
        """The last position whose row gives a prompt logprob: a node's last (it predicts its children's first
        tokens), a leaf's last but one prompt position (its last predicts the output)."""
        return self.num_tokens - 1 if self.is_node else self.num_prompt_tokens - 2

    def wants_prompt_logprobs(self, row_position: int) -> bool:
        return self.lp_from <= row_position <= self.lp_last

    def slot_of(self, position: int, block_size: int) -> int:
        """The cache slot of one of this sequence's own positions (start <= position < its blocks' end)."""
        rel = position - self.start + self.start % block_size
        return self.blocks[rel // block_size] * block_size + rel % block_size

    def block_table(self) -> list[int]:
        """All blocks holding this sequence's KV and its ancestors', outermost first (where a sequence starts
        mid-block, its first block's leading slots are unused: see the module docstring)."""
        chain = []
        s = self
        while s is not None:
            chain.append(s.blocks)
            s = s.parent
        return [b for blocks in reversed(chain) for b in blocks]

    def walk(self, self_too: bool = True):
        """This sequence (unless `self_too` is False) and every sequence below it, depth first: each child's
        subtree before its earlier siblings' (the order of a stack)."""
        stack = [self] if self_too else list(self.children)
        while stack:
            s = stack.pop()
            yield s
            stack.extend(s.children)

    def leaves(self) -> list[Sequence]:
        """The leaves at or below this sequence."""
        return [s for s in self.walk() if not s.is_node]

    def ancestors(self) -> list[Sequence]:
        """Shared nodes above this sequence, outermost first."""
        out = []
        s = self.parent
        while s is not None:
            out.append(s)
            s = s.parent
        return out[::-1]

    def __repr__(self) -> str:
        kind = "node" if self.is_node else f"leaf(req={self.request_index},n={self.sample_index})"
        span = f"[{self.start},{self.num_computed_tokens}/{self.num_tokens})"
        return f"Seq#{self.seq_id}<{kind} {span} {self.status.value}>"
