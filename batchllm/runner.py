"""StepPlan -> tensors -> model -> sampled tokens.

The runner packs the step's tokens end to end (no padding), maps each token to the cache slot its K/V goes to, and
describes attention as *parts* (see `batchllm.model.attention`): every scheduled sequence attends to its own segment,
and under the "batchllm" policy each shared node above it contributes one part holding the queries of *all* scheduled
sequences below that node, so the node's KV is read once per step for the whole group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from batchllm.kv.cache import KVCache
from batchllm.model.attention import AttentionMetadata, AttnPart
from batchllm.model.decoder import DecoderModel, ForwardBatch
from batchllm.request import Sequence
from batchllm.sampler import SampleResult, SamplingBatch, sample
from batchllm.sampling_params import SamplingParams
from batchllm.scheduler import StepPlan
from batchllm.structured import MaskFiller


@dataclass
class SampleRow:
    """What the sampler needs of one sampling sequence; `matcher`: its structured-output constraint (llguidance),
    None without one."""

    seq: Sequence
    params: SamplingParams
    seed: int
    matcher: object = None


class ModelRunner:
    def __init__(self, model: DecoderModel, kv: KVCache, eos_token_id: int | None):
        self.model = model
        self.kv = kv
        self.device = kv.device
        self.eos_token_id = eos_token_id
        self._masks: MaskFiller | None = None

    def build_batch(self, plan: StepPlan) -> tuple[ForwardBatch, list[tuple[Sequence, int]]]:
        """Pack the plan into one ForwardBatch. Its logits rows are the last row of each sampling leaf (in plan
        order), then every row whose position wants prompt logprobs, listed as (sequence, position)."""
        bs = self.kv.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        parts: list[AttnPart] = []
        shared: dict[int, tuple[Sequence, list[int]]] = {}
        row = 0
        logits_rows = []
        lp_rows: list[int] = []
        lp_of: list[tuple[Sequence, int]] = []
        all_rows = np.arange(plan.num_tokens, dtype=np.int64)  # [T]; each part's rows are a view of it
        for seq, n in zip(plan.seqs, plan.num_new):
            c = seq.num_computed_tokens
            first = seq.start % bs  # a sequence below a node that ends mid-block starts mid-block too
            if n == 1:  # a decode: plain ints (most rows of a decode step; numpy per row costs more than it saves)
                ids.append(seq.token_ids[c])
                positions.append(c)
                slots.append(seq.slot_of(c, bs))
            else:
                ids.extend(seq.token_ids[c:c + n])
                positions.extend(range(c, c + n))
                rel = c - seq.start + first  # index of position c in the run of seq.blocks' slots
                rel_pos = np.arange(rel, rel + n, dtype=np.int64)  # [n]
                slots.extend((np.asarray(seq.blocks, dtype=np.int64)[rel_pos // bs] * bs + rel_pos % bs).tolist())
            parts.append(AttnPart(all_rows[row:row + n], seq.blocks, seq.start, c + n - seq.start, first))
            for node in seq.ancestors():  # every shared node above, outermost first: its part takes these rows too
                entry = shared.get(id(node))
                if entry is None:
                    entry = shared[id(node)] = (node, [])
                if n == 1:
                    entry[1].append(row)
                else:
                    entry[1].extend(range(row, row + n))
            if seq.lp_from <= c + n - 1 and seq.lp_last >= c:  # rows of positions that give prompt logprobs
                for p in range(max(c, seq.lp_from), min(c + n - 1, seq.lp_last) + 1):
                    lp_rows.append(row + p - c)
                    lp_of.append((seq, p))
            row += n
            if c + n == seq.num_tokens and not seq.is_node and seq.max_tokens > 0:
                logits_rows.append(row - 1)
        logits_rows += lp_rows
        for node, rows in shared.values():
            parts.append(AttnPart(np.asarray(rows, dtype=np.int64), node.blocks, node.start,
                                  node.num_tokens - node.start, node.start % bs))
        positions = np.asarray(positions, dtype=np.int64)  # [T]
        slots_np = np.asarray(slots, dtype=np.int64)  # [T]
        logits_np = np.asarray(logits_rows, dtype=np.int64)  # [B]
        dev = self.device
        attn, attn_last = {}, {}
        for window in self.model.windows:  # one metadata per window size among the layers (0: no window)
            attn[window] = AttentionMetadata.build(parts, positions, slots_np, bs, dev, sliding_window=window or None,
                                                   dtype=self.model.dtype)
            attn_last[window] = self._logits_attention(parts, positions, logits_np, window)
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),  # [T]
            positions=torch.from_numpy(positions).to(dev),  # [T]
            slots=torch.from_numpy(slots_np).to(dev),  # [T]
            attn=attn,
            logits_rows=torch.tensor(logits_rows, dtype=torch.int64, device=dev),  # [B]
            attn_last=None if attn_last[self.model.windows[0]] is None else attn_last,
        ), lp_of

    def _logits_attention(self, parts: list[AttnPart], positions: np.ndarray, logits_rows: np.ndarray,
                          window: int) -> AttentionMetadata | None:
        """The step's attention restricted to `logits_rows` (renumbered 0 .. B-1, in that order), for the last layer;
        None when every row is a logits row (pure decode), where the restriction saves nothing."""
        num_tokens = positions.shape[0]
        if logits_rows.shape[0] == num_tokens:
            return None
        renumber = np.full(num_tokens, -1, dtype=np.int64)  # [T] row -> its index among the logits rows, or -1
        renumber[logits_rows] = np.arange(logits_rows.shape[0])
        kept = []
        for p in parts:
            rows = renumber[p.q_rows]
            rows = rows[rows >= 0]
            if rows.shape[0]:
                kept.append(AttnPart(rows, p.block_ids, p.kv_start, p.kv_len, p.first_slot))
        no_write = np.full(logits_rows.shape[0], -1, dtype=np.int64)  # the full step's metadata writes the K/V
        return AttentionMetadata.build(kept, positions[logits_rows], no_write, self.kv.block_size, self.device,
                                       sliding_window=window or None, dtype=self.model.dtype)

    def execute(self, plan: StepPlan, rows: list[SampleRow]) -> tuple[SampleResult | None, list[PromptLogprobRow]]:
        """Run the step's forward pass, sample one token for each of `rows` (the plan's sampling leaves), and compute
        the prompt logprobs of the rows that want them."""
        batch, lp_of = self.build_batch(plan)
        constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
        masks = self._start_masks([rows[i].matcher for i in constrained]) if constrained else None
        hidden = self.model(batch, self.kv.layers)  # [B + P, hidden]
        prompt_lps = self._prompt_logprobs(hidden[len(rows):], lp_of) if lp_of else []
        if not rows:
            return None, prompt_lps
        logits = self.model.logits(hidden[:len(rows)])  # [B, V]
        grammar = None
        if masks is not None:
            grammar = (torch.tensor(constrained, dtype=torch.int64, device=self.device), masks.result())  # [R], [R, W]
        need_prompt = any(r.params.repetition_penalty != 1.0 for r in rows)
        sbatch = SamplingBatch.build(
            params=[r.params for r in rows],
            seeds=[r.seed for r in rows],
            output_positions=[r.seq.num_output_tokens for r in rows],
            prompt_ids=[r.seq.token_ids[:r.seq.num_prompt_tokens] for r in rows] if need_prompt else None,
            output_ids=[r.seq.output_ids if r.params.has_penalties else [] for r in rows],
            eos_token_id=self.eos_token_id,
            vocab_size=logits.shape[-1],
            device=self.device,
        )
        return sample(logits, sbatch, grammar), prompt_lps

    def _start_masks(self, matchers: list):
        """The token masks of the constrained rows, as a Future: computed during the forward pass where it leaves
        cores idle (an accelerator, spare cores), else right now (see MaskFiller)."""
        if self._masks is None:
            spare = self.device.type != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()
            self._masks = MaskFiller(self.model.cfg.vocab_size, overlap=spare)
        return self._masks.start(matchers)

    def _prompt_logprobs(self, hidden: torch.Tensor, lp_of: list[tuple[Sequence, int]]) -> list[PromptLogprobRow]:
        """log-softmax (fp32) of the rows' logits, in chunks of LP_CHUNK rows (a chunk's logits are [rows, vocab]):
        per row its k most likely tokens and the logprobs of the tokens that follow its position (a node's last
        position: each child's first token)."""
        out: list[PromptLogprobRow] = []
        for start in range(0, len(lp_of), LP_CHUNK):
            chunk = lp_of[start:start + LP_CHUNK]
            lsm = torch.log_softmax(self.model.logits(hidden[start:start + len(chunk)]).float(), dim=-1)  # [C, V]
            targets = [_next_tokens(seq, p) for seq, p in chunk]
            flat_rows = [i for i, t in enumerate(targets) for _ in t]
            flat_ids = [tok for t in targets for tok in t]
            picked = lsm[torch.tensor(flat_rows), torch.tensor(flat_ids)].tolist()  # [N]
            k = max(seq.lp_k for seq, _ in chunk)
            top_vals, top_ids = (torch.topk(lsm, k, dim=-1) if k else (lsm[:, :0], lsm[:, :0].long()))
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
            at = 0
            for i, ((seq, p), t) in enumerate(zip(chunk, targets)):
                lps = dict(zip(t, picked[at:at + len(t)]))
                at += len(t)
                top = list(zip(top_ids[i][:seq.lp_k], top_vals[i][:seq.lp_k]))
                out.append(PromptLogprobRow(seq, p, lps, top))
        return out


LP_CHUNK = 256  # prompt-logprob rows whose logits are materialized at once (256 x a 152k vocab = 150 MB fp32)


@dataclass
class PromptLogprobRow:
    """Prompt logprobs of one row: the row at `position` of `seq` predicts the token at position + 1 (for a node's
    last position, each child's first token): `logprobs` maps those tokens to their logprob; `top` holds the
    sequence's lp_k most likely tokens, best first."""

    seq: Sequence
    position: int
    logprobs: dict[int, float]
    top: list[tuple[int, float]]


def _next_tokens(seq: Sequence, position: int) -> list[int]:
    if position + 1 < seq.num_tokens:
        return [seq.token_ids[position + 1]]
    return sorted({c.token_ids[position + 1] for c in seq.children})  # a node's last position
