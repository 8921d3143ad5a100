"""Per-request logits work inside transformers' continuous batching: grammars, logit_bias,
presence / frequency penalties, and the model's own logprobs; and transformers' temperature
and top_p processors made exact at temperature 0 and free at top_p 1.

transformers' batch holds requests that asked for different things; its per-request logits
processors take one number per request (temperature, top_p). `PerRequestLogits` is one more
processor of that kind, first in the list (so it sees the model's raw logits): for every row
of the step whose request asked for something it

1. keeps the row's log-softmax when logprobs were asked (the model's own distribution,
   before any change below, as vLLM reports logprobs);
2. adds the logit_bias, subtracts the penalties over the tokens generated so far (vLLM's
   definition: frequency * count + presence * (count > 0));
3. masks every token the request's grammar does not allow next (llguidance's matcher).

After sampling (`sampled`, hooked on transformers' sampler) it records the chosen token's
logprob and the top alternatives, counts it for the penalties and advances the grammar; the
next masks of all the step's grammars are then filled together on a worker thread while the
model runs the next forward pass, and applied in one operation (hf_masks.py), so a
constrained step costs little more than a free one. Rows of requests that asked for nothing
are left untouched, without per-row work.

The rows of a step are the requests that get a new token in it, in the batch's order
(transformers' `requests_with_new_token`, the order of the logits rows it samples).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTemperatureLogitsWarper as _Temperature,
)
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTopPLogitsWarper as _TopP,
)

from llmray_serve.hf_masks import GrammarMasks

log = logging.getLogger(__name__)


@dataclass
class Recorded:
    """A generated token's logprob and its top alternatives (token id, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass
class RequestControls:
    """What one sequence (a request, or one of its n choices) asked for, and its state."""

    top: int | None = None  # logprobs: how many alternatives (None: no logprobs)
    bias: torch.Tensor | None = None  # dense, added to the logits
    presence: float = 0.0
    frequency: float = 0.0
    matcher: Any = None  # llguidance.LLMatcher
    counts: torch.Tensor | None = None  # generated tokens so far, per token id (penalties)
    recorded: list[Recorded] = field(default_factory=list)  # one per generated token
    grammar_error: str | None = None

    @property
    def penalised(self) -> bool:
        return bool(self.presence or self.frequency)


class PerRequestLogits(ContinuousBatchingLogitsProcessor):
    supported_kwargs: ClassVar[dict[str, type]] = {}
    ignored_kwargs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.controls: dict[str, RequestControls] = {}  # by transformers' request id
        self.rows: list[RequestControls | None] = []
        self._raw: dict[int, torch.Tensor] = {}
        self._masks = GrammarMasks(vocab_size)

    def controls_for(
        self,
        *,
        top: int | None,
        logit_bias: tuple[tuple[int, float], ...],
        presence: float,
        frequency: float,
        matcher: Any,
    ) -> RequestControls | None:
        """One sequence's controls, or None when it asks for nothing this processor does."""
        if top is None and not logit_bias and not presence and not frequency and matcher is None:
            return None
        bias = None
        if logit_bias:
            bias = torch.zeros(self.vocab_size)
            for token, value in logit_bias:
                bias[token] += value
        counts = torch.zeros(self.vocab_size) if presence or frequency else None
        return RequestControls(top, bias, presence, frequency, matcher, counts)

    # --- transformers' processor interface (the generation thread) ---

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.zero_()

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        self.rows = [self.controls.get(r.state.request_id) for r in requests_with_new_token]
        return torch.zeros(len(requests_with_new_token), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        self._raw.clear()  # (a step that failed before sampling left its rows here)
        if not any(self.rows):
            return scores
        vocab = scores.size(-1)
        constrained = []
        for i, c in enumerate(self.rows):
            if c is None:
                continue
            if c.matcher is not None:
                constrained.append((i, c.matcher))
            if c.top is None and c.bias is None and c.counts is None:
                continue
            row = scores[i]
            if c.top is not None:
                self._raw[i] = torch.log_softmax(row, dim=-1)
            if c.bias is not None:
                row += c.bias[:vocab].to(row.device)
            if c.counts is not None:
                counts = c.counts[:vocab].to(row.device)
                row -= c.frequency * counts + c.presence * (counts > 0).float()
        if constrained:
            self._masks.apply(scores, constrained)
        return scores

    def sampled(self, tokens: list[int]) -> None:
        """After sampling: `tokens` are the rows' new tokens, in row order."""
        constrained = []
        for i, c in enumerate(self.rows):
            if c is None or i >= len(tokens):
                continue
            token = tokens[i]
            raw = self._raw.pop(i, None)
            if raw is not None:
                c.recorded.append(_recorded(raw, token, c.top or 0))
            if c.counts is not None:
                c.counts[token] += 1
            if c.matcher is not None:
                self._advance(c, token)
                constrained.append(c.matcher)
        self._raw.clear()
        self._masks.prefetch(constrained)  # the next step's masks, during its forward pass

    def _advance(self, c: RequestControls, token: int) -> None:
        matcher = c.matcher
        if matcher.is_stopped():  # only the end-of-sequence token was allowed: it came
            return
        if not matcher.consume_token(token):
            # Masked logits cannot produce a refused token: this is a bug, not the model.
            # (A matcher in error allows only the end token from then on.)
            c.grammar_error = matcher.get_error() or f"token {token} refused"
            log.error("the grammar refused token %d: %s", token, c.grammar_error)


def _recorded(raw: torch.Tensor, token: int, top: int) -> Recorded:
    alternatives: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = torch.topk(raw, top)
        alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return Recorded(token, float(raw[token]), alternatives)


def exact_greedy_and_cheap_top_p(manager: Any) -> None:
    """Swap transformers' per-request temperature and top_p processors for ones where
    temperature 0 means greedy (argmax, exactly) and top_p 1 skips the vocabulary sort."""
    processors = manager.logit_processor.logits_processor
    swapped = 0
    for p in processors:
        for base, ours in ((_Temperature, _GreedyAtZero), (_TopP, _TopPUnlessOne)):
            if type(p) is base:
                p.__class__ = ours  # same state, our __call__
                swapped += 1
    if swapped != 2:  # a transformers upgrade changed its processors: fail loudly, not subtly
        raise RuntimeError(f"expected transformers' temperature and top_p processors: {processors}")


class _GreedyAtZero(_Temperature):
    """Temperature per row; a row at temperature 0 keeps only its argmax (sampling it is exact)."""

    all_greedy = False  # every row of the last batch was at temperature 0 (hook_sampler reads it)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        temps = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        greedy = (temps <= 0).unsqueeze(-1)
        best = scores.argmax(dim=-1, keepdim=True)
        onehot = torch.full_like(scores, float("-inf")).scatter(1, best, 0.0)
        self.all_greedy = bool(greedy.all())
        if self.all_greedy:  # the common all-greedy batch: no scaling at all
            return onehot
        return torch.where(greedy, onehot, scores / temps.clamp(min=1e-5).unsqueeze(-1))


class _TopPUnlessOne(_TopP):
    """top_p per row, skipping the vocabulary sort when no row of the batch needs it."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if bool((tensor_arg[: scores.size(0)].view(dtype=torch.float32) >= 1).all()):
            return scores
        return super().__call__(scores, tensor_arg)


def install(manager: Any, vocab_size: int) -> PerRequestLogits:
    """Put a PerRequestLogits first in the manager's logits processors (before its
    generation loop starts: the batch's tensor storage is sized from the processor count)."""
    processors = manager.logit_processor
    ours = PerRequestLogits(vocab_size)
    processors.logits_processor.insert(0, ours)
    processors.tensors_required += 1
    processors.do_processing = True
    return ours


def hook_sampler(batch_processor: Any, ours: PerRequestLogits) -> None:
    """Tell `ours` each step's sampled tokens (transformers' ModelRunner._sample writes them
    into output_ids[0, :rows]); a step whose rows are all greedy takes the argmax itself."""
    runner = batch_processor.model_runner
    if getattr(runner, "_llmray_hooked", False):
        return
    sample = runner._sample  # a transformers upgrade that renames it fails here
    (greedy,) = [
        p for p in batch_processor.logit_processor.logits_processor if type(p) is _GreedyAtZero
    ]

    def _sample(scores: torch.Tensor, output_ids: torch.Tensor) -> None:
        # transformers samples every step (do_sample is on for the per-request temperatures):
        # a softmax and a multinomial over the whole vocabulary, ~2 ms of a SmolLM2 decode
        # step, to draw the one token a greedy row left. Its argmax is that token.
        if greedy.all_greedy and not runner.return_logprobs:
            rows = scores.size(1)
            output_ids[0, :rows].copy_(scores[0].argmax(dim=-1))
        else:
            sample(scores, output_ids)
        if any(ours.rows):
            ours.sampled(output_ids[0, : len(ours.rows)].tolist())

    runner._sample = _sample
    runner._llmray_hooked = True


def prompt_logprobs(
    model: Any, ids: list[int], top: int, rows: int
) -> list[tuple[int, float | None, tuple[tuple[int, float], ...]]]:
    """(token, logprob, top alternatives) of each prompt token under the model given the
    ones before it (the first has none), from one plain forward pass; the lm head runs on
    `rows` positions at a time (a whole prompt's logits can be hundreds of MB)."""
    with torch.inference_mode():
        x = torch.tensor([ids], device=model.device)
        hidden = model.base_model(input_ids=x).last_hidden_state[0]
        head = model.get_output_embeddings()
        out: list[tuple[int, float | None, tuple[tuple[int, float], ...]]] = [(ids[0], None, ())]
        for start in range(0, len(ids) - 1, rows):
            chunk = hidden[start : min(start + rows, len(ids) - 1)]
            logprobs = torch.log_softmax(head(chunk).float(), dim=-1)
            for j, row in enumerate(logprobs):
                token = ids[start + j + 1]
                out.append((token, float(row[token]), _recorded(row, token, top).top))
        return out
