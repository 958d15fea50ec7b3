"""Time budgets: the plan from measured step and evaluation times, the schedule over it, exact resume."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cnnlab.engine import train
from cnnlab.engine import time_budget as tb
from cnnlab.engine.optim import lr_factor

from ._tiny import register_tiny, tiny_config


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    register_tiny(monkeypatch)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_the_plan_fits_training_validation_and_test_in_what_is_left(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(tb.time, "perf_counter", clock)
    budget = tb.TimeBudget(100.0, start=clock.t)
    for step in range(1, 30):
        clock.t += 0.5 if step <= tb.WARMUP_STEPS else 0.1  # slow first steps are not timed
        ready = budget.after_step(step)
        if ready:
            break
    assert budget.step_s == pytest.approx(0.1)
    # 100 s * 0.95 - elapsed - test 2 s - reserve 4 s, shared by 0.1 s steps and a 1 s validation per 50 steps
    elapsed = clock.t - 1000.0
    plan = budget.plan(step, steps_per_epoch=50, limit=10_000, eval_pass_s=1.0, test_pass_s=2.0)
    left = 95 - elapsed - 2 - tb.END_RESERVE_S

    def cost(steps):
        return (steps - step) * 0.1 + (-(-steps // 50)) * 1.0

    assert cost(plan.steps) <= left < cost(plan.steps + 1)
    assert plan.epochs == -(-plan.steps // 50)
    # the epochs stay an upper limit
    assert budget.plan(step, 50, 200, 1.0, 2.0).steps == 200
    # a budget already spent: no more steps than those done
    clock.t += 500
    assert budget.plan(step, 50, 10_000, 1.0, 2.0).steps == step


def test_a_budgeted_run_stops_at_its_planned_steps_with_the_schedule_laid_over_them(tmp_path, monkeypatch):
    lrs = []
    real_set_lr = __import__("cnnlab.engine.trainer", fromlist=["set_lr"]).set_lr

    def record(optimizer, factor):
        lrs.append(factor)
        return real_set_lr(optimizer, factor)

    monkeypatch.setattr("cnnlab.engine.trainer.set_lr", record)
    monkeypatch.setattr(tb.TimeBudget, "plan", lambda self, step, spe, limit, v, t: tb.Plan(0.01, v, t, 40, 7))
    monkeypatch.setattr(tb, "MIN_TIMED_S", 0.0)
    config = tiny_config(tmp_path, epochs=50)  # 6 steps per epoch, 300 at most
    config.time_budget = 60
    result = train(config)
    saved = json.loads((result.run_dir / "results.json").read_text())
    assert result.planned_steps == saved["planned_steps"] == 40 and saved["time_budget_s"] == 60
    assert len(lrs) == 40 and len(result.history) == 7  # 6 full epochs and 4 steps of the 7th
    # one-cycle over 40 steps from the plan on (the steps before it followed the 300-step layout); an epoch
    # of 6 steps is shorter than the timing, so the plan is made at its end (every checkpoint holds a plan)
    planned_at = min(tb.WARMUP_STEPS + tb.MIN_TIMED_STEPS, 6)
    assert lrs[planned_at:] == pytest.approx([lr_factor(config.optim, s, 6, 40) for s in range(planned_at, 40)])
    assert lrs[:planned_at] == pytest.approx([lr_factor(config.optim, s, 6, 300) for s in range(planned_at)])


def test_a_budgeted_run_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(tb.TimeBudget, "plan", lambda self, step, spe, limit, v, t: tb.Plan(0.01, v, t, 27, 5))
    monkeypatch.setattr(tb, "MIN_TIMED_S", 0.0)
    whole = tiny_config(tmp_path, name="whole", epochs=20)
    whole.time_budget = 60
    full = train(whole)

    class Stop(Exception):
        pass

    def stop_after_epoch_2(row):
        if row["epoch"] == 2:
            raise Stop

    part = tiny_config(tmp_path, name="part", epochs=20)
    part.time_budget = 60
    with pytest.raises(Stop):
        train(part, callbacks=[stop_after_epoch_2])
    # the resumed run keeps the saved plan: it is not timed again (a plan of other steps would show)
    monkeypatch.setattr(tb.TimeBudget, "plan", lambda *a: pytest.fail("a resumed run must keep its plan"))
    resumed = train(part, resume=True)
    assert resumed.planned_steps == 27 and len(resumed.history) == 5
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_real_budget_ends_a_long_run_early(tmp_path):
    config = tiny_config(tmp_path, epochs=10_000)  # 60,000 steps: far more than 6 s allow
    config.time_budget = 6
    result = train(config)
    assert result.planned_steps is not None and result.planned_steps < 60_000
    assert len(result.history) == -(-result.planned_steps // 6)


def _slows_down_at_step(monkeypatch, n: int) -> list[int]:
    """A 40-step plan, and a clock that jumps 1,000 s as step ``n`` starts (the machine became that much slower);
    returns the steps' counter (``[steps started]``)."""
    import time as real_time

    real = real_time.perf_counter
    offset = [0.0]
    monkeypatch.setattr(tb.time, "perf_counter", lambda: real() + offset[0])
    real_set_lr = __import__("cnnlab.engine.trainer", fromlist=["set_lr"]).set_lr
    calls = [0]

    def step_starts(optimizer, factor):
        calls[0] += 1
        if calls[0] == n:
            offset[0] += 1000.0
        return real_set_lr(optimizer, factor)

    monkeypatch.setattr("cnnlab.engine.trainer.set_lr", step_starts)
    monkeypatch.setattr(tb.TimeBudget, "plan", lambda self, step, spe, limit, v, t: tb.Plan(0.01, v, t, 40, 7))
    monkeypatch.setattr(tb, "MIN_TIMED_S", 0.0)
    return calls


def test_a_machine_that_slows_down_after_the_plan_still_ends_on_time(tmp_path, monkeypatch, capsys):
    # the plan allows 40 steps in 60 s; the clock jumps during step 15: the next step would start past the
    # deadline, so the run stops at 15 steps, mid-epoch 3, with its last checkpoint saying so, and a resume
    # neither re-plans nor trains further
    calls = _slows_down_at_step(monkeypatch, 15)
    config = tiny_config(tmp_path, epochs=50)
    config.time_budget, config.quiet = 60, False
    result = train(config)
    assert calls[0] == 15 and result.planned_steps == 15
    assert len(result.history) == 3  # two whole epochs of 6 steps and 3 steps of the third
    assert "stopping at step 15 of 40 to end on time" in capsys.readouterr().out
    saved = json.loads((result.run_dir / "last.json").read_text())
    assert saved["planned_steps"] == 15 and saved["epoch"] == 3
    monkeypatch.setattr(tb.TimeBudget, "plan", lambda *a: pytest.fail("a resumed run must keep its plan"))
    resumed = train(config, resume=True)
    assert calls[0] == 15 and len(resumed.history) == 3


def test_the_deadline_is_checked_between_epochs_too(tmp_path, monkeypatch):
    # the machine slows down during the last step of epoch 2: epoch 3 does not start, and the checkpoint of
    # epoch 2 already holds the plan as cut (a resume trains no further)
    calls = _slows_down_at_step(monkeypatch, 12)
    config = tiny_config(tmp_path, epochs=50)
    config.time_budget = 60
    result = train(config)
    assert calls[0] == 12 and result.planned_steps == 12 and len(result.history) == 2
    saved = json.loads((result.run_dir / "last.json").read_text())
    assert saved["planned_steps"] == 12 and saved["epoch"] == 2


def test_slow_steps_are_planned_after_one_timed_step(monkeypatch):
    # 4 s steps in a 100 s budget: ten timed steps would be 40 s (plus the warm-up) before any plan; once 10 %
    # of the budget is spent, one timed step is enough
    clock = Clock()
    monkeypatch.setattr(tb.time, "perf_counter", clock)
    budget = tb.TimeBudget(100.0, start=clock.t)
    ready_at = None
    for step in range(1, 20):
        clock.t += 4.0
        if budget.after_step(step):
            ready_at = step
            break
    assert ready_at == tb.WARMUP_STEPS + 1 and budget.step_s == pytest.approx(4.0)
    # fast steps still wait for the ten timed steps and the second
    clock = Clock()
    monkeypatch.setattr(tb.time, "perf_counter", clock)
    budget = tb.TimeBudget(100.0, start=clock.t)
    for step in range(1, 40):
        clock.t += 0.2
        if budget.after_step(step):
            break
    assert step == tb.WARMUP_STEPS + tb.MIN_TIMED_STEPS


def test_the_first_plan_is_re_timed_once_over_the_steps_after_it(tmp_path, monkeypatch):
    # the first 13 steps take 0.5 s (workers filling their queues on the same cores), then 0.25 s: the
    # provisional plan from the 0.5 s steps is re-timed over steps 14..23 and fixed from 0.25 s
    from cnnlab.data import datasets as D

    from ._tiny import make_tiny

    monkeypatch.setitem(D.DATASETS, "tiny", lambda root=None, download=False: make_tiny(n_train=960))  # 60 steps
    clock = Clock()
    monkeypatch.setattr(tb.time, "perf_counter", clock)
    real_set_lr = __import__("cnnlab.engine.trainer", fromlist=["set_lr"]).set_lr
    calls = [0]

    def timed_step(optimizer, factor):  # called as each step starts: the clock moves by that step's time
        calls[0] += 1
        clock.t += 0.5 if calls[0] <= 13 else 0.25
        return real_set_lr(optimizer, factor)

    monkeypatch.setattr("cnnlab.engine.trainer.set_lr", timed_step)
    config = tiny_config(tmp_path, epochs=50)
    config.time_budget, config.quiet = 100, False  # 10 % = 10 s: not an early plan
    result = train(config)
    first = 13 + int((100 * (1 - tb.SAFETY) - 6.5 - tb.END_RESERVE_S) // 0.5)  # the provisional plan
    refine = 13 + max(tb.REFINE_MIN_STEPS, math.ceil(tb.REFINE_SHARE * first))
    final = refine + int((100 * (1 - tb.SAFETY) - (6.5 + 0.25 * (refine - 13)) - tb.END_RESERVE_S) // 0.25)
    assert result.planned_steps == final == calls[0] and final > 1.8 * first
    saved = json.loads((result.run_dir / "last.json").read_text())
    assert saved["planned_steps"] == final
