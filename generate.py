"""
Text generation on top of model.GPT: sampling settings, stop sequences, streaming deltas, and a
Batcher that decodes many sequences at once with a KV cache. Sequences may join (prefill) and
leave (finish) between any two tokens, which is what the server's continuous batching needs;
sample.py and the tests use the same code through generate().
"""
import random
import time
from dataclasses import dataclass, field

import torch

import cpu_kernels
from tokenizer import TextStream


class GenerationError(ValueError):
    """A request that cannot be generated as asked (the message names the field)."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; CTRL-style, over prompt and output tokens
    do_sample: bool = True  # False, or temperature 0, = greedy
    seed: int | None = None  # fixes this sequence's draws whatever else shares the batch
    stop: list = field(default_factory=list)  # strings that end the text (not included)
    ignore_eos: bool = False  # keep going past <|endoftext|> (benchmarks)
    presence_penalty: float = 0.0  # OpenAI-style, over generated tokens: - presence if seen at all
    frequency_penalty: float = 0.0  # ... and - frequency * times seen
    logprobs: int | None = None  # record each token's log-probability and this many alternatives
    # When the context is full, go on from its newest half (nanoGPT crops the context too; the
    # positions restart at 0). Off: a prompt plus max_new_tokens beyond the context is refused.
    sliding_window: bool = False

    def validate(self):
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", _number(self.temperature) and 0 <= self.temperature <= 2, "a number in [0, 2]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", _number(self.top_p) and 0 <= self.top_p <= 1, "a number in [0, 1]"),
            ("repetition_penalty", _number(self.repetition_penalty) and 0 < self.repetition_penalty <= 10,
             "a number in (0, 10]"),
            ("do_sample", isinstance(self.do_sample, bool), "true or false"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
             "an integer in [0, 2**63)"),
            ("presence_penalty", _number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "a number in [-2, 2]"),
            ("frequency_penalty", _number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "a number in [-2, 2]"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "an integer in [0, 20]"),
            ("stop", isinstance(self.stop, list) and len(self.stop) <= 8
             and all(isinstance(s, str) and 0 < len(s) <= 256 for s in self.stop),
             "up to 8 non-empty strings"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise GenerationError(f"{name} must be {what}")
        return self

    @property
    def greedy(self):
        return not self.do_sample or self.temperature == 0


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Sequence:
    """One prompt being continued: its tokens, settings, LUT, and the text produced so far."""

    def __init__(self, prompt_ids, params, tokenizer, lut=None, tag=None):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.lut = lut
        self.tag = tag  # the caller's handle (the server keeps its request here)
        self.out_ids = []
        self.tokens = list(prompt_ids)  # prompt_ids + out_ids, kept as one list: a LUT reads it every step
        self.text = ""  # generated text, stop sequence excluded
        self.emitted = 0  # how much of text new_text() has handed out
        self.finish_reason = None  # "length" | "stop" | "cancelled"
        self.eot = None if params.ignore_eos else tokenizer.eot_token
        self.stream = TextStream(tokenizer)
        self.generator = torch.Generator().manual_seed(
            params.seed if params.seed is not None else random.getrandbits(63))
        self._seen = set(self.prompt_ids)  # for the repetition penalty
        self._seen_tensor = None
        self.logprobs = []  # with params.logprobs: (token logprob, [(alternative, logprob), ...]) per token
        self.next_logprobs = None  # (V,) log-softmax of the raw logits for the token being chosen
        self.draft_pause = 0  # plain decode steps to take before drafting again (speculative decoding)
        self.lut_fires = []  # (token index, text start, text end, lut, entry, how) of tokens a LUT produced
        self.lut_memo = {}  # what the LUT remembers of this text between steps (variants.Variants.read)

    @property
    def done(self):
        return self.finish_reason is not None

    def check_fits(self, limit):
        """Raise GenerationError unless this prompt and max_new_tokens fit a context of limit tokens."""
        n = len(self.prompt_ids)
        if not n:
            raise GenerationError("prompt must not be empty")
        if self.params.sliding_window and n >= limit:
            raise GenerationError(f"prompt ({n} tokens) must be shorter than the model's context of {limit} tokens")
        if n + self.params.max_new_tokens > limit and not self.params.sliding_window:
            raise GenerationError(f"prompt ({n} tokens) plus max_new_tokens ({self.params.max_new_tokens}) "
                                  f"exceeds the model's context of {limit} tokens")

    def may_draft(self):
        """Whether speculation applies to this sequence's settings: greedy, unpenalised, no logprobs."""
        p = self.params
        return (p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
                and p.logprobs is None)

    def next_drafts(self, k):
        """Up to k drafts to verify (draft_tokens()), none where speculation does not apply (see
        may_draft), at the last token, or after drafts that missed lately (a few plain steps)."""
        k = min(k, self.params.max_new_tokens - len(self.out_ids) - 1)
        if not self.may_draft() or k <= 0:
            return []
        if self.draft_pause:
            self.draft_pause -= 1
            return []
        return draft_tokens(self, k)

    def seen_tensor(self, device):
        if self._seen_tensor is None:
            self._seen_tensor = torch.tensor(sorted(self._seen), dtype=torch.long, device=device)
        return self._seen_tensor

    def append(self, token, fire=None):
        """Record a sampled token (fire: (lut, entry, how) where a LUT produced it); decide whether
        the sequence is finished."""
        if token == self.eot:
            self._finish("stop")
            return
        if self.next_logprobs is not None:
            top = torch.topk(self.next_logprobs, self.params.logprobs) if self.params.logprobs else None
            alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            self.logprobs.append((float(self.next_logprobs[token]), alternatives))
            self.next_logprobs = None
        self.out_ids.append(token)
        self.tokens.append(token)
        if token not in self._seen:
            self._seen.add(token)
            self._seen_tensor = None
        before = len(self.text)
        piece = self.stream.push(token)
        if fire is not None:
            self.lut_fires.append((len(self.out_ids) - 1, before, before + len(piece)) + tuple(fire))
        if self._extend(piece):
            return
        if len(self.out_ids) >= self.params.max_new_tokens:
            self._finish("length")

    def _extend(self, piece):
        """Add piece to the text, cut at a stop sequence if one is complete now (True then). The
        text is assigned once, already cut: a stream reading it from another thread never sees
        a stop sequence."""
        before, text = len(self.text), self.text + piece
        for s in self.params.stop:
            i = text.find(s, max(0, before - len(s) + 1))
            if i >= 0:
                self.text = text[:i]
                self.finish_reason = "stop"
                return True
        self.text = text
        return False

    def _finish(self, reason):
        if not self._extend(self.stream.flush()):
            self.finish_reason = reason

    def cancel(self):
        self.finish_reason = "cancelled"

    def lut_trace(self):
        """The spans of the generated text that a LUT produced: [{start, end, text, label_id, label,
        label_context, how}], offsets into the text; neighbouring tokens of one label make one
        span, whose `how` is how its first token fired."""
        spans = []
        for i, start, end, lut, entry, how in self.lut_fires:
            end = min(end, len(self.text))
            if start >= end:
                continue
            label_id, label, context = lut.label_of(entry)
            last = spans[-1] if spans else None
            if last and last["label_id"] == label_id and last["end"] == start and last["_token"] == i - 1:
                last["end"], last["_token"] = end, i
            else:
                spans.append(dict(start=start, end=end, label_id=label_id, label=label, label_context=context,
                                  how=how, _token=i))
        for span in spans:
            span.pop("_token")
            span["text"] = self.text[span["start"]:span["end"]]
        return spans

    def new_text(self):
        """Text not handed out yet. While running, a tail that could still become a stop sequence
        is held back, so a stop string never leaks into a stream."""
        end = len(self.text)
        if not self.done:
            for s in self.params.stop:
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta


def sample_next(logits, seqs, forced=None):
    """logits: (B, V) for the rows of seqs; returns (B,) next token ids (on the CPU).
    forced: (B,) the taught next token of rows where a LUT entry fired (-1 elsewhere): those rows
    take it, so a taught label comes out exactly whatever the sampling settings (the entry's value
    has already made it the argmax of the logits wherever the model's output layer can)."""
    logits = logits.float()  # edited in place below: the caller has no further use for it
    device = logits.device
    forced = forced.tolist() if forced is not None else [-1] * len(seqs)
    for b, s in enumerate(seqs):
        if s.params.logprobs is not None:  # the model's own distribution, before any sampling setting
            s.next_logprobs = logits[b].log_softmax(-1).cpu()
        p = s.params.repetition_penalty
        if p != 1.0:  # make seen tokens less likely: shrink positive logits, grow negative ones
            seen = s.seen_tensor(device)
            vals = logits[b, seen]
            logits[b, seen] = torch.where(vals > 0, vals / p, vals * p)
        if (s.params.presence_penalty or s.params.frequency_penalty) and s.out_ids:
            ids, counts = torch.tensor(s.out_ids, device=device).unique(return_counts=True)
            logits[b, ids] -= s.params.frequency_penalty * counts + s.params.presence_penalty
    if any(s.params.greedy and forced[b] < 0 for b, s in enumerate(seqs)):
        # ties: the first, as torch's argmax
        out = cpu_kernels.argmax_rows(logits) if cpu_kernels.cpu_fp32(logits) else logits.argmax(-1).cpu()
    else:  # only sampled rows: no argmax is needed
        out = torch.empty(len(seqs), dtype=torch.long)
    for b, s in enumerate(seqs):
        if forced[b] >= 0:
            out[b] = forced[b]
            continue
        if s.params.greedy:
            continue
        out[b] = sample_row(logits[b], s.params, s.generator)
    return out


def sample_row(logits, params, generator):
    """One token id drawn from (V,) logits under temperature, top_k, then top_p. Only the
    candidates that survive are sorted and drawn from (one uniform number by inverse CDF), so a
    step costs little more than greedy; each sequence has its own generator, so a seeded one
    samples the same tokens alone or in any batch."""
    u = torch.rand(1, generator=generator)
    if (params.top_k == 0 or params.top_k >= logits.numel()) and params.top_p >= 1.0 and cpu_kernels.cpu_fp32(logits):
        return cpu_kernels.sample(logits, params.temperature, float(u))  # the same draw in one pass
    scaled = logits / params.temperature if params.temperature != 1.0 else logits
    ids = None  # candidate token ids, most likely first; None = the whole vocabulary in order
    if 0 < params.top_k < scaled.numel():
        top, ids = torch.topk(scaled, params.top_k)
        probs = top.softmax(-1)
    elif params.top_p < 1.0:  # the nucleus usually lies in the top 1024; sort everything only if not
        top, ids = torch.topk(scaled, min(1024, scaled.numel()))
        probs = (top - scaled.logsumexp(-1)).exp()
        if probs.sum() < params.top_p:
            top, ids = torch.sort(scaled, descending=True)
            probs = top.softmax(-1)
    else:
        probs = scaled.softmax(-1)
    if params.top_p < 1.0:  # keep the smallest prefix whose mass reaches top_p
        keep = max(1, int((probs.cumsum(-1) - probs < params.top_p).sum()))  # a tiny top_p keeps the most likely
        probs, ids = probs[:keep], ids[:keep]
    cdf = probs.cumsum(-1).cpu()
    j = min(int(torch.searchsorted(cdf, u * cdf[-1], right=True)), cdf.numel() - 1)
    return j if ids is None else int(ids[j])


DRAFT_TOKENS = 8  # drafts verified per forward pass in speculative decoding (0 = off)
PREFILL_CHUNK = 48  # prompt tokens prefilled per step while other rows decode (0 = whole prompts at once)
# ... and fewer where the measured prefill rate (CPU) says those would take longer than this: what
# a 48-token piece costs depends on the machine and on int8 or fp32 (~70 ms and ~110 ms on AVX-512)
PREFILL_PIECE_SECONDS = 0.06


def draft_tokens(seq, k):
    """Up to k tokens that will likely come next, for speculative decoding: where the row's LUT
    fires, its taught continuation (the decoder forces exactly those tokens); else prompt lookup,
    what followed the latest earlier occurrence of the text's last 3 (or 2) tokens."""
    tokens = seq.tokens
    drafts = []
    seq.lut_memo["stable"] = len(tokens)
    while seq.lut is not None and len(drafts) < k:
        e, _ = seq.lut.fire(tokens + drafts if drafts else tokens, len(tokens) + len(drafts) - 1, seq.lut_memo)
        if e < 0:
            break
        drafts.append(int(seq.lut.targets[e]))
    if drafts:
        return drafts
    for n in (3, 2):
        tail = tokens[-n:]
        for i in range(len(tokens) - n - 1, -1, -1):
            if tokens[i:i + n] == tail:
                return tokens[i + n:i + n + k]
    return []


class Batcher:
    """Decodes up to max_batch sequences together in cache rows 0..n-1: first the decoding ones
    (rows 0..decoding-1), then the prompts being prefilled, first come first served (only the
    first may be part-way). A finished decoding row takes the last decoding one, so a decode step
    is one dense pass. A greedy sequence decoding alone verifies drafts (draft_tokens()) in one
    pass. prefill_chunk: while rows decode, a step prefills at most this many prompt tokens beside
    them, so a long prompt does not stop them for its whole prefill (0 = whole prompts at once);
    on the CPU, also no more than piece_seconds' worth at the rate the last such steps measured."""

    def __init__(self, model, max_batch=8, draft_tokens=DRAFT_TOKENS, prefill_chunk=PREFILL_CHUNK,
                 piece_seconds=PREFILL_PIECE_SECONDS):
        self.model = model
        self.draft_tokens = draft_tokens
        self.prefill_chunk = prefill_chunk
        self.piece_seconds = piece_seconds
        self.token_seconds = None  # prefill time per prompt token beside decoding rows (moving average)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_batch = max_batch
        self.cache = None
        self.seqs = []  # live sequences, row i of the cache belongs to seqs[i]
        self.lengths = []  # tokens cached per row
        self.decoding = 0  # rows 0..decoding-1 decode; the rest are prompts being prefilled

    @property
    def free_slots(self):
        return self.max_batch - len(self.seqs)

    @torch.inference_mode()
    def admit(self, new_seqs):
        """Give new sequences free rows; returns those that got their first token. Their prompts
        are prefilled here, whole and together, unless rows decode with prefill_chunk set: then
        the next step()s prefill them."""
        assert len(new_seqs) <= self.free_slots
        if not new_seqs:
            return []
        for s in new_seqs:
            s.check_fits(self.model.config.block_size)
        if self.cache is None:
            from model import KVCache
            self.cache = KVCache(self.model.config, self.max_batch, self.device, self.dtype)
        self.seqs += new_seqs
        self.lengths += [0] * len(new_seqs)
        if self.decoding and self.prefill_chunk:
            return []
        return self._prefill(self._prefill_plan())

    @torch.inference_mode()
    def step(self):
        """One token for every decoding sequence (more with drafts), then a round of prefill for
        the prompts waiting in rows (see _prefill_plan), in the same pass where it can (_fused).
        Returns the sequences that advanced."""
        plan = self._prefill_plan() if self.decoding < len(self.seqs) else []
        if self.decoding and plan:
            advanced = self._fused(plan)
            if advanced is not None:
                return advanced
        advanced = self._decode() if self.decoding else []
        return advanced + self._prefill(plan)

    def _decode(self):
        seqs = self.seqs[:self.decoding]
        if len(seqs) == 1 and self.draft_tokens and self._speculate(seqs[0]):
            return seqs
        B = len(seqs)
        lengths = self._make_room(B)
        idx = torch.tensor([[s.out_ids[-1]] for s in seqs], device=self.device)
        pos = lengths[0] if len(set(lengths)) == 1 else torch.tensor(lengths, device=self.device)
        luts = _lut_batch(seqs, [1] * B)
        logits, _ = self.model(idx, cache=self.cache.rows(0, B), pos=pos, logits_at=None, lut=luts)
        self.lengths[:B] = [n + 1 for n in lengths]
        forced = luts.taught_at(torch.zeros(B, dtype=torch.long)) if luts and luts.hits else None
        self._take(seqs, sample_next(logits[:, -1], seqs, forced), luts.fires_at([0] * B) if forced is not None else None)
        return seqs

    def _make_room(self, B):
        """Slide the decoding rows 0..B-1 that are full and reserve a position for each; returns
        their lengths."""
        for i in range(B):
            if self.lengths[i] == self.model.config.block_size:  # full: only sliding_window sequences get here
                self._slide(i)
        lengths = self.lengths[:B]
        self.cache.reserve(max(lengths) + 1)
        return lengths

    def _prefill_plan(self):
        """The prompt work of this round, in row order from the first waiting row: (first, k, T),
        the whole prompts of k rows from the one holding sequence `first`, padded to the longest
        (T tokens); or (first, None, c), the next c tokens of that row's prompt. While rows decode
        with prefill_chunk set, at most prefill_chunk tokens (padding counted): longer prompts go in
        pieces, shorter whole; else everything waiting."""
        self.retire()  # sequences cancelled while they waited
        budget = self._piece_budget() if self.prefill_chunk and self.decoding else None  # None: no limit
        full, plan, d = budget, [], self.decoding
        while d < len(self.seqs) and (budget is None or budget > 0):
            n = len(self.seqs[d].prompt_ids)
            if self.lengths[d] == 0 and (budget is None or n <= budget):
                k, T = 1, n  # whole prompts: as many as fit the budget, padded to the longest
                while d + k < len(self.seqs):
                    longest = max(T, len(self.seqs[d + k].prompt_ids))
                    if budget is not None and (k + 1) * longest > budget:
                        break
                    k, T = k + 1, longest
                plan.append((self.seqs[d], k, T))
                used = k * T
                d += k
            elif self.lengths[d] == 0 and n <= full:
                break  # a short prompt waits for the next round rather than being split
            else:
                used = n - self.lengths[d] if budget is None else min(budget, n - self.lengths[d])
                plan.append((self.seqs[d], None, used))
                d += 1
            if budget is not None:
                budget -= used
        return plan

    def _prefill(self, plan):
        """Run the plan (_prefill_plan) pass by pass; returns the sequences whose prompts completed
        (their first token sampled). A row is found by its sequence: a finished one retired on the
        way moves the rows after it."""
        started, full = [], self._piece_budget() if self.prefill_chunk and self.decoding else None
        for first, k, n in plan:
            if first not in self.seqs:  # finished meanwhile (cancelled)
                continue
            d = self.seqs.index(first)
            if k is not None:
                started += self._prefill_whole(d, k, n)
                continue
            t0 = time.perf_counter()
            started += self._prefill_piece(d, n)
            if n == full:  # a whole step's piece: what the next ones will be sized by
                self._measure(time.perf_counter() - t0, n)
        return started

    def _fused(self, plan):
        """The decode step of the decoding rows and the plan's prompt tokens in one pass of the
        model (GPT.forward_tokens), so they share one read of the weights: a prompt costs its own
        rows' compute, not a pass of its own. Only where the CPU runs it in one call, without
        drafts and with no LUT firing (the LUT paths are the separate passes'); returns None
        where it does not apply, else the sequences that advanced."""
        seqs = self.seqs[:self.decoding]
        B = len(seqs)
        if B == 1 and self.draft_tokens and seqs[0].may_draft():
            return None  # a lone greedy stream verifies drafts instead (_speculate)
        ids, rows, positions, last, prompts = [s.out_ids[-1] for s in seqs], list(range(B)), self._make_room(B), [], []
        for first, k, n in plan:
            d = self.seqs.index(first)
            for r in range(d, d + k) if k is not None else [d]:
                prompt, start = self.seqs[r].prompt_ids, self.lengths[r]
                end = len(prompt) if k is not None else start + n
                ids += prompt[start:end]
                rows += [r] * (end - start)
                positions += range(start, end)
                if end == len(prompt):
                    last.append(len(ids) - 1)
                    prompts.append(self.seqs[r])
        if not self.model.one_call_tokens(len(ids)):
            return None
        if _lut_batch(seqs, [1] * B) or _lut_batch(prompts, [len(s.prompt_ids) for s in prompts], last_only=True):
            return None
        self.cache.reserve(max(positions) + 1)
        t0 = time.perf_counter()
        logits = self.model.forward_tokens(torch.tensor(ids), torch.tensor(rows), torch.tensor(positions),
                                           self.cache.rows(0, len(self.seqs)), torch.tensor(list(range(B)) + last))
        for r, p in zip(rows, positions):
            self.lengths[r] = max(self.lengths[r], p + 1)
        pieces = [n for _, k, n in plan if k is None]
        if pieces and pieces[-1] == self._piece_budget():  # timed with the decode rows: the step's pause
            self._measure(time.perf_counter() - t0, pieces[-1])
        self.decoding += len(prompts)  # completed prompts are the rows right after the decoding ones
        self._take(seqs + prompts, sample_next(logits, seqs + prompts))
        return seqs + prompts

    def _piece_budget(self):
        """Prompt tokens a step may prefill beside decoding rows: prefill_chunk, or fewer where the
        pieces measured so far say they would take longer than piece_seconds. Only the CPU's
        times are the work's (on a GPU they would be the launches'); only whole-step pieces are
        timed, as a pass costs more per token the fewer tokens it has."""
        if self.token_seconds is None or self.device.type != "cpu":
            return self.prefill_chunk
        return max(1, min(self.prefill_chunk, int(self.piece_seconds / self.token_seconds)))

    def _measure(self, seconds, tokens):
        rate = seconds / tokens
        self.token_seconds = rate if self.token_seconds is None else (self.token_seconds + rate) / 2

    def _prefill_whole(self, d, k, T):
        """Prefill the prompts of rows d..d+k-1 (none begun; the longest T tokens) in one pass."""
        seqs = self.seqs[d:d + k]
        self.cache.reserve(T)
        idx = torch.zeros(k, T, dtype=torch.long)  # right-padded prompts
        for i, s in enumerate(seqs):
            idx[i, :len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
        last = torch.tensor([len(s.prompt_ids) - 1 for s in seqs], device=self.device)
        luts = _lut_batch(seqs, [len(s.prompt_ids) for s in seqs], last_only=True)
        logits, _ = self.model(idx.to(self.device), cache=self.cache.rows(d, d + k), pos=0,
                               logits_at=last, lut=luts)
        self.lengths[d:d + k] = [len(s.prompt_ids) for s in seqs]
        self.decoding += k
        self._take(seqs, sample_next(logits, seqs, luts.taught_at(last) if luts else None),
                   luts.fires_at(last.tolist()) if luts else None)
        return seqs

    def _prefill_piece(self, d, c):
        """Prefill the next c prompt tokens of row d after those it has cached, each attending to
        the cache before it as in a whole prefill. The last piece samples the first token (a LUT,
        which adds to the final residual and so never changes what is cached, is matched there
        only); returns [the sequence] then, else []."""
        s = self.seqs[d]
        start = self.lengths[d]
        end = start + c
        self.cache.reserve(end)
        last = torch.tensor([c - 1], device=self.device)
        final = end == len(s.prompt_ids)
        luts = _lut_batch([s], [c], last_only=True) if final else None
        logits, _ = self.model(torch.tensor([s.prompt_ids[start:end]], device=self.device),
                               cache=self.cache.rows(d, d + 1), pos=start, logits_at=last, lut=luts)
        self.lengths[d] = end
        if not final:
            return []
        self.decoding += 1
        self._take([s], sample_next(logits, [s], luts.taught_at(last) if luts else None),
                   luts.fires_at([c - 1]) if luts else None)
        return [s]

    def _speculate(self, s):
        """Verify drafts for s in one forward pass over [last token, drafts...], keeping the drafts
        up to the first that plain greedy decoding would not have chosen, plus the token chosen
        there: the tokens are those plain decoding gives (each position is computed as its own
        decode step would be, LUT included). Returns False where it does not apply."""
        n = self.lengths[0]
        drafts = s.next_drafts(min(self.draft_tokens, self.model.config.block_size - n - 1))
        if not drafts:
            return False
        self.cache.reserve(n + 1 + len(drafts))
        chosen, fires = _verify(self.model, self.cache.rows(0, 1), s, n, drafts, self.device)
        kept = 0
        while kept < len(drafts) and chosen[kept] == drafts[kept]:
            kept += 1
        self.lengths[0] = n + kept + 1  # the inputs whose keys and values are right
        s.draft_pause = 0 if kept else 4
        for token, fire in zip(drafts[:kept] + [chosen[kept]], fires):
            s.append(token, fire)
            if s.done:
                break
        self.retire()
        return True

    def _slide(self, i):
        """Refill row i with the newest half of its context, all but the last token (which the
        next step feeds). The cache holds keys and values only, which a LUT never changes (it adds
        to the final residual), so no LUT is needed here."""
        s = self.seqs[i]
        window = s.tokens[-(self.model.config.block_size // 2) - 1:-1]
        self.model(torch.tensor([window], device=self.device), cache=self.cache.rows(i, i + 1), pos=0,
                   logits_at=torch.tensor([len(window) - 1], device=self.device))
        self.lengths[i] = len(window)

    def _take(self, seqs, tokens, fires=None):
        for s, t, fire in zip(seqs, tokens.tolist(), fires or [None] * len(seqs)):
            if not s.done:
                s.append(t, fire)
        self.retire()

    def retire(self):
        """Drop finished (or cancelled) sequences. A decoding row's hole takes the last decoding
        row; the rows being prefilled after a hole move down one (only the first of them has
        anything cached to move)."""
        i = 0
        while i < len(self.seqs):
            if not self.seqs[i].done:
                i += 1
                continue
            hole = i
            if i < self.decoding:
                hole = self.decoding - 1
                if i != hole:
                    self.cache.move_row(hole, i, self.lengths[hole])
                    self.seqs[i], self.lengths[i] = self.seqs[hole], self.lengths[hole]
                self.decoding -= 1
            del self.seqs[hole], self.lengths[hole]
            for r in range(hole, len(self.seqs)):
                if self.lengths[r]:
                    self.cache.move_row(r + 1, r, self.lengths[r])


def _verify(model, cache, s, n, drafts, device):
    """One forward pass of s over [last token, drafts...] at position n: the token greedy decoding
    chooses after each input (the LUT's taught token where it fires) and the fire behind each.
    The pass runs without the LUT: where an entry fires, greedy decoding takes its taught token
    whatever the logits say, and an entry changes no other position's logits (it adds to the
    final residual only). So the LUT is asked only up to the first draft that is not kept, not
    at every draft (most are not kept)."""
    inputs = [s.out_ids[-1]] + drafts
    logits, _ = model(torch.tensor([inputs], device=device), cache=cache, pos=n)
    chosen = logits[0].max(-1).indices.tolist()  # the greedy token after each input (argmax, faster)
    fires = [None] * len(inputs)
    if s.lut is not None and len(s.lut):
        s.lut_memo["stable"] = len(s.tokens)  # the drafts may still be rejected
        text, fired = s.tokens + drafts, 0
        for j in range(len(inputs)):
            e, how = s.lut.fire(text, len(s.tokens) - 1 + j, s.lut_memo)
            if e >= 0:
                chosen[j], fires[j] = int(s.lut.targets[e]), (s.lut, e, how)
                fired += 1
            if j == len(drafts) or chosen[j] != drafts[j]:
                break
        if fired and s.lut.observe is not None:
            s.lut.observe("fired", fired)
    return chosen, fires


def _lut_batch(seqs, window, last_only=False):
    """The rows' LUTs, matched against each row's text so far (prompt and output: a trigger the
    model writes itself fires too); window[i] is how many of its last tokens this pass covers.
    None where nothing fires: the pass then runs as without LUTs."""
    taught = [s for s in seqs if s.lut is not None]
    if not taught:
        return None
    for s in taught:
        s.lut_memo["stable"] = len(s.tokens)
    if max(window) == 1 and all(s.lut.fire(s.tokens, len(s.tokens) - 1, s.lut_memo)[0] < 0 for s in taught):
        return None  # a decode step where nothing fires, the usual case: decided without building a batch
    from lut import LUTBatch
    luts = LUTBatch([s.lut for s in seqs], [s.tokens for s in seqs], window, last_only, [s.lut_memo for s in seqs])
    return luts if luts.fires else None


def generate(model, tokenizer, prompts, params, luts=None, max_batch=8, on_text=None, draft_tokens=DRAFT_TOKENS,
             prefill_chunk=PREFILL_CHUNK):
    """Continue each prompt (a string or token list) with params (one SamplingParams, or one per
    prompt) and luts (one per prompt, None = base model); returns the finished Sequences in order.
    on_text(i, delta) is called as text becomes final, for streaming. draft_tokens, prefill_chunk: see Batcher."""
    luts = luts or [None] * len(prompts)
    params = params if isinstance(params, list) else [params] * len(prompts)
    seqs = [Sequence(p if isinstance(p, list) else tokenizer.encode(p), sp, tokenizer, lut, tag=i)
            for i, (p, sp, lut) in enumerate(zip(prompts, params, luts))]
    batcher = Batcher(model, max_batch=max_batch, draft_tokens=draft_tokens, prefill_chunk=prefill_chunk)
    for s in seqs:
        s.check_fits(model.config.block_size)
    waiting = list(seqs)
    while waiting or batcher.seqs:
        if waiting and batcher.free_slots:
            admitted, waiting = waiting[:batcher.free_slots], waiting[batcher.free_slots:]
            advanced = batcher.admit(admitted)
        else:
            advanced = batcher.step()
        if on_text:
            for s in advanced:
                delta = s.new_text()
                if delta:
                    on_text(s.tag, delta)
    return seqs


def stream(model, tokenizer, prompt, params, lut=None):
    """Yields text deltas of one completion as they are produced (never half a UTF-8 character)."""
    seq = Sequence(tokenizer.encode(prompt) if isinstance(prompt, str) else prompt, params, tokenizer, lut)
    batcher = Batcher(model, max_batch=1)
    batcher.admit([seq])
    while True:
        delta = seq.new_text()
        if delta:
            yield delta
        if seq.done:
            return
        batcher.step()
