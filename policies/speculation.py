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


class SpecGate:
    """Batch-level switch: speculate on a step only where it measurably pays.

    Per-sequence acceptance (`SpecController`) says how many tokens a verify pass would
    emit, not what the pass costs: a wider target pass can leave a fast small-batch kernel
    (e.g. the int4 path for steps of <= 8 tokens), and drafting costs time too. So the gate
    measures output tokens per second of the two kinds of decode step, separately per batch
    size (exactly up to `exact_batch_sizes`, then in power-of-two buckets 9-16, 17-32, ...):
    plain steps emit one token per sequence, speculative steps what verification accepted
    plus one. Sizes are kept apart because a plain step of 8 sequences emits ~25 % more
    tokens/s than one of 5 here; pooled, whichever kind happened to run at the larger
    batches looked faster. A rate is the EWMA of tokens per step over the EWMA of seconds
    per step (weight `alpha` on the newest step).

    * Until a batch size has `min_samples` measurements of each kind, the gate alternates
      to collect them (speculative first).
    * Then it speculates only if that is faster than plain decoding by `min_gain` (5 %):
      the two errors do not cost alike. Where both are level (a full-depth draft at batch
      8) a wrong "on" pays k+1 draft passes per step for nothing, while a wrong "off" only
      forgoes a gain that small; and two rates measured at different moments differ by a
      few percent on a shared CPU anyway.
    * After `probe_every` steps of one kind it runs `probe_len` steps of the other, so a
      change (the text became predictable, the batch composition moved) is noticed: that is
      "back on when it would pay".
    * A probe that leaves the choice as it was doubles that size's probe interval (up to
      `max_backoff` times `probe_every`): probing a kind that keeps losing is a cost paid
      for nothing (at batch 8 a speculative step can take four plain ones). A probe that
      flips the choice resets the interval.
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
        # per batch key, for plain (index 0) and speculative (1) steps: [EWMA of output
        # tokens per step, EWMA of seconds per step, samples]. Their ratio is the rate: a
        # ratio of means, so one lucky step (a whole draft accepted) moves it by its tokens,
        # not by its rate, and the choice does not flip on a single outlier.
        self._rates: dict[int, list[list[float]]] = {}
        self._streak: dict[int, int] = {}  # steps in a row of the preferred kind
        self._probing: dict[int, int] = {}  # probe steps left
        self._probed_choice: dict[int, bool] = {}  # the choice a running probe questions
        self._interval: dict[int, int] = {}  # steps between probes, with backoff

    def _key(self, num_seqs: int) -> int:
        """A batch size itself up to `exact_batch_sizes`, beyond it the power of two it
        rounds up to (9-16 -> 16, 17-32 -> 32, ...)."""
        num_seqs = max(num_seqs, 1)
        if num_seqs <= self.exact_batch_sizes:
            return num_seqs
        return 1 << (num_seqs - 1).bit_length()

    def _entry(self, key: int) -> list[list[float]]:
        return self._rates.setdefault(key, [[0.0, 0.0, 0], [0.0, 0.0, 0]])

    def rate(self, num_seqs: int, speculative: bool) -> float | None:
        """Measured output tokens/s of that kind of step at this batch size, if any."""
        tokens, seconds, n = self._entry(self._key(num_seqs))[int(speculative)]
        return tokens / seconds if n else None

    def should_speculate(self, num_seqs: int) -> bool:
        key = self._key(num_seqs)
        plain, spec = self._entry(key)
        if spec[2] < self.min_samples or plain[2] < self.min_samples:
            return spec[2] <= plain[2]
        # spec tokens/s > (1 + min_gain) * plain tokens/s, as a cross product
        best = spec[0] * plain[1] > (1.0 + self.min_gain) * plain[0] * spec[1]
        if self._probing.get(key, 0) > 0:
            self._probing[key] -= 1
            return not best
        if key in self._probed_choice:  # a probe just ended: did it change the choice?
            interval = self._interval.get(key, self.probe_every)
            kept = self._probed_choice.pop(key) == best
            self._interval[key] = (
                min(2 * interval, self.max_backoff * self.probe_every) if kept else self.probe_every
            )
        self._streak[key] = self._streak.get(key, 0) + 1
        if self._streak[key] >= self._interval.get(key, self.probe_every):
            self._streak[key] = 0
            self._probing[key] = self.probe_len
            self._probed_choice[key] = best
        return best

    def observe(self, num_seqs: int, speculative: bool, num_tokens: int, duration_s: float) -> None:
        """One decode step happened: `num_tokens` output tokens in `duration_s`."""
        if duration_s <= 0.0:
            return
        slot = self._entry(self._key(num_seqs))[int(speculative)]
        if slot[2] == 0:
            slot[0], slot[1] = float(num_tokens), duration_s
        else:
            slot[0] += self.alpha * (num_tokens - slot[0])
            slot[1] += self.alpha * (duration_s - slot[1])
        slot[2] += 1
