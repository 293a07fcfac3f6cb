"""The training loop's parts: what is due at a step, the training clock, the metrics on
their way to the host and the running sums of an epoch's metrics."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import Iterable, Iterator, Sequence

from gml_jax.runner import names
from gml_jax.runner.logs import step_rows


@dataclasses.dataclass(frozen=True)
class Due:
  """What the loop does after the step call that ended at a step.

  Attributes:
    fetch: bring the metrics to the host (a log, or before any of the below).
    epoch_end: evaluate on validation, keep the best checkpoint, schedule, early stop.
    checkpoint: save the latest checkpoint.
    stop: ``--stop_after_steps`` is reached: checkpoint and stop.
  """

  fetch: bool
  epoch_end: bool = False
  checkpoint: bool = False
  stop: bool = False

  @property
  def sync(self) -> bool:
    """Every pending metric must reach the host now (a state is saved or judged)."""
    return self.epoch_end or self.checkpoint or self.stop


def due_at(step: int, unfetched_steps: int, *, steps_per_epoch: int, log_every: int,
           checkpoint_every: int = 0, stop_after: int | None = None) -> Due:
  """What is due once ``step`` steps are done, with ``unfetched_steps`` of them whose
  metrics are still on the devices: an epoch end every ``steps_per_epoch`` steps; a
  checkpoint there and every ``checkpoint_every`` steps (0: never else); a stop from
  ``stop_after`` on; a fetch before any of those, or once more than ``log_every`` steps wait.
  """
  epoch_end = step % steps_per_epoch == 0
  checkpoint = epoch_end or bool(checkpoint_every and step % checkpoint_every == 0)
  stop = stop_after is not None and step >= stop_after
  fetch = checkpoint or stop or unfetched_steps > log_every
  return Due(fetch=fetch, epoch_end=epoch_end, checkpoint=checkpoint, stop=stop)


class TrainClock:
  """Training time: wall time since :meth:`start` less its pauses, the named sections in
  :attr:`PAUSES` (evaluation, checkpoint saves, the transforms' epoch passes, reported
  apart; compilation happens before the start).

  Every section's seconds add up in :attr:`sections` (a benchmark passes its own clock to
  the trainer and reads where a run's time went).
  """

  PAUSES = frozenset({"evaluation", "checkpoint saves", "epoch passes"})

  def __init__(self):
    self.sections: collections.Counter = collections.Counter()
    self._before, self._started, self._paused = 0.0, time.perf_counter(), 0.0
    self._pause_started = None  # outermost pause in progress

  def start(self, seconds_before: float = 0.0) -> None:
    """Counts from now on, on top of ``seconds_before`` (a resumed run's)."""
    self._before, self._started, self._paused = seconds_before, time.perf_counter(), 0.0

  def seconds(self) -> float:
    """Training seconds so far (a pause in progress counts up to its start)."""
    now = time.perf_counter()
    ongoing = now - self._pause_started if self._pause_started is not None else 0.0
    return self._before + now - self._started - self._paused - ongoing

  @contextlib.contextmanager
  def section(self, name: str):
    outermost_pause = name in self.PAUSES and self._pause_started is None
    began = time.perf_counter()
    if outermost_pause:
      self._pause_started = began
    try:
      yield
    finally:
      spent = time.perf_counter() - began
      self.sections[name] += spent
      if outermost_pause:
        self._paused += spent
        self._pause_started = None

  def timed(self, name: str, items: Iterable) -> Iterator:
    """``items``, with the waits for each one counted in section ``name``."""
    items = iter(items)
    while True:
      with self.section(name):
        item = next(items, _END)
      if item is _END:
        return
      yield item


_END = object()


class MetricFetcher:
  """The step calls' metrics on their way to the host (one host sync a fetch).

  A plain log fetch leaves the last call's metrics on the device, so that the device runs
  that call while the host writes the rows instead of waiting for it; a sync fetch (before
  a checkpoint, an evaluation or a stop) takes them all.
  """

  def __init__(self, modalities: Sequence[int], templates: dict[str, str] | None = None):
    """``templates``: every metric a step returns -> its row key (:func:`step_rows`);
    default: the step's own and those of every registered method."""
    self.modalities = tuple(modalities)
    self.templates = (templates if templates is not None
                      else names.STEP_METRICS | names.method_templates())
    self._pending: list[tuple[dict, int]] = []  # (metrics, steps) per call

  def add(self, metrics: dict, steps: int) -> None:
    self._pending.append((metrics, steps))

  @property
  def unfetched_steps(self) -> int:
    return sum(n for _, n in self._pending)

  def fetch(self, step: int, sync: bool) -> list[dict]:
    """The rows of the fetched calls (``step``: steps done so far); [] when the one pending
    call is left for the next fetch."""
    ready, self._pending = ((self._pending, []) if sync else
                            (self._pending[:-1], self._pending[-1:]))
    if not ready:
      return []
    return step_rows(ready, step - self.unfetched_steps, self.modalities, self.templates)
