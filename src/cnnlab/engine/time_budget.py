"""Time budgets: time the first steps, then fix the number of steps so the whole run fits.

The first plan is provisional; the steps after it are timed again and the plan fixed then (REFINE_SHARE).

A budget makes a run end on time on any machine; the steps it allows differ between machines,
so two runs with the same budget repeat exactly only on the same kind of machine. Once fixed,
the step count is saved with every checkpoint: a resumed run keeps it (and stays exact).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

# steps before timing starts (the first ones pay for allocations, oneDNN primitive creation, compilation)
WARMUP_STEPS = 3
# time at least this many steps and this long, for a stable per-step figure
MIN_TIMED_STEPS, MIN_TIMED_S = 10, 1.0
# ... unless the run has already spent this share of its budget (steps of many seconds, as R-CNN's): then one
# timed step is enough, or the timing itself would eat the budget
EARLY_PLAN_SHARE = 0.1
# the first plan is provisional: the first seconds of a run are often unrepresentative (data-loader workers
# filling their queues on the same cores: 596 ms per step timed where 226 ms followed, for SSD at two threads);
# it is re-timed once over the steps that follow it, this share of the planned steps (at least REFINE_MIN_STEPS),
# and the step count fixed then, before the first checkpoint
REFINE_SHARE, REFINE_MIN_STEPS = 0.05, 10
# what the end of a run costs besides evaluation: results.json, plots, report.html (measured ~1-3 s
# on 2 CPU cores); a fraction of the budget is kept back for the noise in the estimates
END_RESERVE_S, SAFETY = 4.0, 0.05


@dataclass
class Plan:
    """What the timing found and what it allows."""

    step_s: float
    eval_pass_s: float  # one validation pass (0 without a split)
    test_pass_s: float
    steps: int
    epochs: int

    def describe(self, steps_per_epoch: int, limit: int, budget: float) -> str:
        cut = f" (instead of {limit:,})" if self.steps < limit else " (all that the epochs ask for)"
        return (f"time budget {budget:.0f} s: {1000 * self.step_s:.1f} ms per step, evaluation ~{self.test_pass_s:.1f} s; "
                f"training for {self.steps:,} steps = {self.steps / steps_per_epoch:.2f} epochs of {steps_per_epoch}{cut}")


class TimeBudget:
    """Times training steps from ``WARMUP_STEPS`` on and plans how many fit in ``budget_s``.

    Args:
        budget_s: seconds for the whole run, counted from ``start`` (``time.perf_counter()``).
        steps_done: the step the timing starts counting from (a fresh run: 0).
    """

    def __init__(self, budget_s: float, start: float, steps_done: int = 0) -> None:
        self.budget_s, self.start = budget_s, start
        self.first = steps_done + WARMUP_STEPS
        self._t0: float | None = None
        self._seen: list[tuple[int, float]] = []  # (steps done, time) after each step
        self._provisional: tuple[int, float] | None = None  # (step, time) of the provisional plan
        self.timed = 0

    def mark_provisional(self, step: int) -> None:
        """The provisional plan was made after ``step`` steps: ``step_s`` is timed from here on."""
        self._provisional = (step, time.perf_counter())

    def refine_at(self, planned_steps: int, step: int) -> int:
        """The step after which the provisional plan of ``planned_steps`` is re-timed (at its end at the latest)."""
        return min(planned_steps, step + max(REFINE_MIN_STEPS, math.ceil(REFINE_SHARE * planned_steps)))

    def after_step(self, step: int) -> bool:
        """Call after each step (``step`` = steps done); True once enough steps are timed to plan."""
        now = time.perf_counter()
        self._seen.append((step, now))
        if self._provisional is not None:
            return False
        if step == self.first:
            self._t0 = now
            return False
        if self._t0 is None:
            return False
        self.timed = step - self.first
        if now - self.start >= EARLY_PLAN_SHARE * self.budget_s:
            return True
        return self.timed >= MIN_TIMED_STEPS and now - self._t0 >= MIN_TIMED_S

    @property
    def step_s(self) -> float:
        """Seconds per step over the timed steps; before any (an epoch shorter than the warm-up), over the
        steps seen, or, after one step, since the budget started (set-up included: an over-estimate). After a
        provisional plan: over the steps since it, once there are any."""
        if self._provisional is not None and self._seen[-1][0] > self._provisional[0]:
            (s0, t0), (s1, t1) = self._provisional, self._seen[-1]
            return (t1 - t0) / (s1 - s0)
        if self._t0 is not None and self.timed:
            return (self._seen[-1][1] - self._t0) / self.timed
        if len(self._seen) >= 2:
            (s0, t0), (s1, t1) = self._seen[0], self._seen[-1]
            return (t1 - t0) / (s1 - s0)
        if self._seen:
            return self._seen[0][1] - self.start
        return math.inf

    def plan(self, step: int, steps_per_epoch: int, limit: int, eval_pass_s: float, test_pass_s: float) -> Plan:
        """The most steps (<= ``limit``) such that training, a validation pass per epoch, the test and the
        end of the run fit in what is left of the budget; at least the steps already done."""
        step_s = self.step_s
        left = self.budget_s * (1 - SAFETY) - (time.perf_counter() - self.start) - test_pass_s - END_RESERVE_S
        best = step
        lo, hi = step, limit
        while lo <= hi:  # the cost grows with the steps: bisect
            mid = (lo + hi) // 2
            epoch_ends = -(-mid // steps_per_epoch) - step // steps_per_epoch  # each ends with a validation pass
            cost = (mid - step) * step_s + epoch_ends * eval_pass_s
            if cost <= left:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        best = max(best, step, 1)
        return Plan(step_s, eval_pass_s, test_pass_s, best, -(-best // steps_per_epoch))

