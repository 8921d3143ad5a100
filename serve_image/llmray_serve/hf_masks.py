"""The grammar masks of a decode step: one bitmask for all its constrained rows, applied at once.

After a step's tokens are sampled and each constrained sequence's matcher has consumed its
token, `prefetch` fills the next step's masks of all of them in one llguidance call
(`fill_next_token_bitmask_par`: Rust threads, the GIL released) on a worker thread, while
the model runs the next forward pass. `apply` then waits for that bitmask, fills the rows it
lacks (a request on its first token), and masks the step's logits with one vectorised
operation on the logits' device: no per-row Python work, no per-row tensors.

    masks = GrammarMasks(vocab_size)
    masks.apply(scores, [(row, matcher), ...])   # in the logits processor
    masks.prefetch([matcher, ...])                # after sampling
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

_BITS = torch.arange(32, dtype=torch.int32)


class GrammarMasks:
    def __init__(self, vocab_size: int) -> None:
        import llguidance

        self.vocab_size = vocab_size
        self._executor = llguidance.LLExecutor()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmray-grammar")
        self._next: Future[tuple[list[Any], torch.Tensor]] | None = None
        self._bits: dict[torch.device, torch.Tensor] = {}

    def prefetch(self, matchers: list[Any]) -> None:
        """Start filling the masks `matchers` allow next (those of the coming step)."""
        self._next = self._worker.submit(self._fill, matchers) if matchers else None

    def apply(self, scores: torch.Tensor, rows: list[tuple[int, Any]]) -> None:
        """Set to -inf, in place, every token of `scores[row]` its matcher does not allow."""
        # (`filled` keeps its matchers alive, so that no other matcher can reuse their ids)
        filled, bitmask = self._next.result() if self._next is not None else ([], None)
        self._next = None
        rows_of = {id(m): k for k, m in enumerate(filled)}
        missing = [m for _, m in rows if id(m) not in rows_of]
        if missing:  # sequences the prefetch did not know of (their first token)
            extra = self._fill(missing)[1]
            rows_of.update({id(m): len(filled) + k for k, m in enumerate(missing)})
            bitmask = extra if bitmask is None else torch.cat([bitmask, extra])
        assert bitmask is not None
        words = bitmask[[rows_of[id(m)] for _, m in rows]].to(scores.device, non_blocking=True)
        banned = self._unpack(words, scores.size(-1)).logical_not_()
        if len(rows) == scores.size(0) and all(i == k for k, (i, _) in enumerate(rows)):
            scores.masked_fill_(banned, float("-inf"))  # every row constrained: no indexing
            return
        index = torch.tensor([i for i, _ in rows], device=scores.device)
        scores[index] = scores[index].masked_fill(banned, float("-inf"))

    def _fill(self, matchers: list[Any]) -> tuple[list[Any], torch.Tensor]:
        """`matchers` and their masks (a row each, in their order)."""
        import llguidance.torch

        # (not llguidance's allocate_token_bitmask: it pins the memory, milliseconds a step)
        bitmask = torch.zeros(
            llguidance.torch.get_bitmask_shape(len(matchers), self.vocab_size), dtype=torch.int32
        )
        llguidance.torch.fill_next_token_bitmask_par(
            self._executor, [(m, k) for k, m in enumerate(matchers)], bitmask
        )
        return matchers, bitmask

    def _unpack(self, words: torch.Tensor, vocab: int) -> torch.Tensor:
        """Bit j of word w (int32 rows) as token 32 * w + j allowed, `vocab` tokens a row
        (past the mask's width: not allowed)."""
        bits = self._bits.get(words.device)
        if bits is None:
            bits = self._bits[words.device] = _BITS.to(words.device)
        allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().flatten(1)
        if allowed.size(1) >= vocab:
            return allowed[:, :vocab]
        pad = torch.zeros(allowed.size(0), vocab - allowed.size(1), dtype=torch.bool)
        return torch.cat([allowed, pad.to(allowed.device)], dim=1)
