"""Per-sequence speculation length: how many draft tokens to verify on the next step.

Pure Python, no engine state. The engine asks `next_k()` before a step and reports what
happened with `update()` after it.

Rule:

* Acceptance. `acceptance` is an EWMA (weight `alpha` on the newest step) of the per-token
  acceptance rate num_accepted / num_proposed. Treating drafted tokens as accepted
  independently with rate a, the j-th draft token adds a^j expected emitted tokens.
* Length. Speculate while that marginal gain pays for drafting and verifying one more
  token: k = floor(ln(min_gain) / ln(a)), the largest k with a^k >= min_gain, clamped to
  [1, k_max]. High acceptance -> long drafts; low acceptance -> k = 1.
* Off switch. Each verify step is one target forward pass that emits num_accepted + 1
  tokens; `tokens_per_pass` is its EWMA. If it stays below 1 + `margin` for `patience`
  consecutive verify steps, speculation is not paying for its overhead (draft work, wider
  target pass) and the controller switches off: next_k() returns 0.
* Probe. After `probe_after` steps off (steps reported as update(0, 0)) it switches back on
  with fresh tokens-per-pass bookkeeping, because the text may have become predictable
  again (e.g. the model started quoting the prompt). The acceptance EWMA is reset to the
  prior so the probe starts from a neutral k rather than the stale low estimate.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


class SpecController:
    """Adaptive draft length for one sequence. See the module docstring for the rule."""

    def __init__(
        self,
        k_max: int = 5,
        alpha: float = 0.3,
        initial_acceptance: float = 0.6,
        min_gain: float = 0.25,
        margin: float = 0.2,
        patience: int = 4,
        probe_after: int = 32,
    ) -> None:
        if k_max < 0:
            raise ValueError("k_max must be >= 0")
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        if not 0.0 <= initial_acceptance <= 1.0:
            raise ValueError("initial_acceptance must be in [0, 1]")
        if not 0.0 < min_gain < 1.0:
            raise ValueError("min_gain must be in (0, 1)")
        if margin < 0.0 or patience < 1 or probe_after < 1:
            raise ValueError("margin must be >= 0, patience and probe_after >= 1")
        self.k_max = k_max
        self.alpha = alpha
        self.initial_acceptance = initial_acceptance
        self.min_gain = min_gain
        self.margin = margin
        self.patience = patience
        self.probe_after = probe_after

        self.acceptance = initial_acceptance
        self.tokens_per_pass: float | None = None  # None until the first verify step
        self.enabled = k_max > 0
        self._low_steps = 0  # consecutive verify steps below 1 + margin
        self._off_steps = 0  # steps spent switched off

    def next_k(self) -> int:
        """Draft length for the next step, in [0, k_max]; 0 means decode without a draft."""
        if not self.enabled:
            return 0
        a = self.acceptance
        if a >= 1.0 - 1e-9:
            return self.k_max
        if a <= 0.0:
            return min(1, self.k_max)
        k = math.floor(math.log(self.min_gain) / math.log(a) + 1e-9)
        return max(1, min(self.k_max, k))

    def update(self, num_proposed: int, num_accepted: int) -> None:
        """Report one engine step of this sequence: how many draft tokens were verified and
        how many survived. Call it on every step, with (0, 0) when no draft was verified, so
        the controller can count the steps it has been switched off."""
        if num_proposed < 0 or not 0 <= num_accepted <= num_proposed:
            raise ValueError(f"bad update: proposed={num_proposed} accepted={num_accepted}")
        if num_proposed == 0:
            if not self.enabled and self.k_max > 0:
                self._off_steps += 1
                if self._off_steps >= self.probe_after:
                    self._probe()
            return

        rate = num_accepted / num_proposed
        self.acceptance += self.alpha * (rate - self.acceptance)
        measured = float(num_accepted + 1)
        if self.tokens_per_pass is None:
            self.tokens_per_pass = measured
        else:
            self.tokens_per_pass += self.alpha * (measured - self.tokens_per_pass)

        if self.tokens_per_pass < 1.0 + self.margin:
            self._low_steps += 1
            if self._low_steps >= self.patience:
                self.enabled = False
                self._off_steps = 0
        else:
            self._low_steps = 0

    def _probe(self) -> None:
        self.enabled = True
        self.acceptance = self.initial_acceptance
        self.tokens_per_pass = None
        self._low_steps = 0
        self._off_steps = 0


@dataclass(slots=True)
class _Sums:
    """Output tokens and seconds of some decode steps of one kind; their ratio is a rate
    of the steps together (a ratio of sums: one lucky step moves it by its tokens, not by
    its rate)."""

    tokens: float = 0.0
    seconds: float = 0.0
    steps: int = 0

    def add(self, tokens: float, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.steps += 1

    def merge(self, other: _Sums) -> None:
        self.tokens += other.tokens
        self.seconds += other.seconds
        self.steps += other.steps


@dataclass(slots=True)
class _Bucket:
    """The gate's state for one batch size."""

    ewma: list[list[float]] = field(default_factory=lambda: [[0.0, 0.0, 0], [0.0, 0.0, 0]])
    first: list[_Sums] = field(default_factory=lambda: [_Sums(), _Sums()])  # measuring phase
    chosen: bool | None = None  # None while measuring
    recent: deque[tuple[float, float]] = field(default_factory=deque)  # chosen kind's steps
    probe: _Sums | None = None  # the other kind's steps during and right after a probe
    probe_left: int = 0
    streak: int = 0
    interval: int = 0
    # a probe that said "switch", waiting for the next one to agree: (its steps, before)
    pending: tuple[_Sums, _Sums] | None = None


class SpecGate:
    """Batch-level switch: speculate on a step only where it measurably pays.

    Per-sequence acceptance (`SpecController`) says how many tokens a verify pass would
    emit, not what the pass costs: a wider target pass can leave a fast small-batch kernel
    (e.g. the int4 path for steps of <= 8 tokens), and drafting costs time too. So the gate
    measures output tokens per second of the two kinds of decode step (plain steps emit
    one token per sequence, speculative steps what verification accepted plus one),
    separately per batch size: exactly up to `exact_batch_sizes`, then in power-of-two
    buckets (9-16, 17-32, ...). Sizes are kept apart because a plain step of 8 sequences
    emits ~25 % more tokens/s than one of 5 here; pooled, whichever kind happened to run at
    the larger batches looked faster.

    Comparisons are paired: the two kinds are only ever compared over steps run next to
    each other. A shared CPU drifts by ±30 % over minutes and a step's cost grows with its
    sequences' context, so a rate kept from a while ago is not comparable with one
    measured now; comparing the kind in use (always fresh) with a stale one made the gate
    flip whenever the machine slowed down, and at batch 8 that ran a full-depth draft
    ~20 % slower than plain decoding for half the steps.

    * Measuring: until a batch size has `min_samples` steps of each kind, the gate
      alternates (speculative first), then chooses on those interleaved steps.
    * It speculates only if that is faster than plain decoding by `min_gain` (5 %): the
      two errors do not cost alike. Where both are level a wrong "on" pays k+1 draft passes
      per step for nothing, a wrong "off" forgoes at most that 5 %.
    * Probing: after `probe_every` steps of the chosen kind it runs `probe_len` steps of
      the other and compares them with the chosen kind's `2 * probe_len` steps just
      before: "back on when it would pay" (the text became predictable) and off again.
    * Switching takes two probes in a row that say so: a probe whose verdict differs from
      the choice is followed by a second one right after `2 * probe_len` steps, and the
      two are judged together. A probe of 3 steps is short enough to be fresh, and short
      enough for one lucky step (a whole draft accepted) to decide it.
    * A probe that leaves the choice as it was doubles that size's probe interval (up to
      `max_backoff` times `probe_every`): probing a kind that keeps losing is a cost paid
      for nothing (at batch 8 a speculative step can take four plain ones). A probe that
      flips the choice resets the interval.

    `rate()` reports an EWMA (weight `alpha`) of each kind for observability; decisions
    do not use it.
    """

    def __init__(
        self,
        alpha: float = 0.2,
        min_samples: int = 3,
        probe_every: int = 48,
        probe_len: int = 3,
        max_backoff: int = 8,
        min_gain: float = 0.05,
        exact_batch_sizes: int = 8,
    ) -> None:
        if (
            not 0.0 < alpha <= 1.0
            or min_gain < 0.0
            or exact_batch_sizes < 1
            or min_samples < 1
            or probe_every < 1
            or probe_len < 1
            or max_backoff < 1
        ):
            raise ValueError("bad SpecGate settings")
        self.alpha = alpha
        self.min_samples = min_samples
        self.probe_every = probe_every
        self.probe_len = probe_len
        self.max_backoff = max_backoff
        self.min_gain = min_gain
        self.exact_batch_sizes = exact_batch_sizes
        self._buckets: dict[int, _Bucket] = {}

    def _key(self, num_seqs: int) -> int:
        """A batch size itself up to `exact_batch_sizes`, beyond it the power of two it
        rounds up to (9-16 -> 16, 17-32 -> 32, ...)."""
        num_seqs = max(num_seqs, 1)
        if num_seqs <= self.exact_batch_sizes:
            return num_seqs
        return 1 << (num_seqs - 1).bit_length()

    def _bucket(self, num_seqs: int) -> _Bucket:
        key = self._key(num_seqs)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(
                recent=deque(maxlen=2 * self.probe_len), interval=self.probe_every
            )
        return b

    def _spec_wins(self, spec: _Sums, plain: _Sums) -> bool:
        """spec tokens/s > (1 + min_gain) * plain tokens/s, as a cross product."""
        return spec.tokens * plain.seconds > (1.0 + self.min_gain) * plain.tokens * spec.seconds

    def rate(self, num_seqs: int, speculative: bool) -> float | None:
        """EWMA output tokens/s of that kind of step at this batch size, if measured."""
        tokens, seconds, n = self._bucket(num_seqs).ewma[int(speculative)]
        return tokens / seconds if n else None

    def should_speculate(self, num_seqs: int) -> bool:
        b = self._bucket(num_seqs)
        if b.chosen is None:
            plain, spec = b.first
            if spec.steps < self.min_samples or plain.steps < self.min_samples:
                return spec.steps <= plain.steps
            b.chosen = self._spec_wins(spec, plain)
        if b.probe_left > 0:
            b.probe_left -= 1
            return not b.chosen
        if b.probe is not None:  # a probe just ended: compare it with the steps before it
            self._judge_probe(b)
        b.streak += 1
        if b.streak >= b.interval:
            b.streak = 0
            b.probe_left = self.probe_len
            b.probe = _Sums()
        return b.chosen

    def _judge_probe(self, b: _Bucket) -> None:
        probe, b.probe = b.probe, None
        assert probe is not None and b.chosen is not None
        if probe.steps == 0 or not b.recent:  # e.g. no draft matched: nothing to compare
            return
        before = _Sums()
        for tokens, seconds in b.recent:
            before.add(tokens, seconds)
        second = b.pending is not None
        if b.pending is not None:  # the second probe: judge both together
            first_probe, first_before = b.pending
            b.pending = None
            probe.merge(first_probe)
            before.merge(first_before)
        spec, plain = (probe, before) if not b.chosen else (before, probe)
        wins = self._spec_wins(spec, plain)
        if wins == b.chosen:
            b.interval = min(2 * b.interval, self.max_backoff * self.probe_every)
            return
        if not second:  # probe again soon, once the chosen kind's window has refilled
            b.pending = (probe, before)
            b.streak = max(0, b.interval - 2 * self.probe_len)
            return
        b.chosen = wins
        b.interval = self.probe_every
        b.recent.clear()  # the probe's steps are the new kind's freshest measurement
        b.recent.append((probe.tokens / probe.steps, probe.seconds / probe.steps))

    def observe(self, num_seqs: int, speculative: bool, num_tokens: int, duration_s: float) -> None:
        """One decode step happened: `num_tokens` output tokens in `duration_s`."""
        if duration_s <= 0.0:
            return
        b = self._bucket(num_seqs)
        slot = b.ewma[int(speculative)]
        if slot[2] == 0:
            slot[0], slot[1] = float(num_tokens), duration_s
        else:
            slot[0] += self.alpha * (num_tokens - slot[0])
            slot[1] += self.alpha * (duration_s - slot[1])
        slot[2] += 1
        if b.chosen is None:
            b.first[int(speculative)].add(num_tokens, duration_s)
        elif speculative == b.chosen:
            b.recent.append((num_tokens, duration_s))
        elif b.probe is not None:
            b.probe.add(num_tokens, duration_s)
