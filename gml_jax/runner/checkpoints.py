"""A run's checkpoints (``checkpoints/latest`` and ``checkpoints/best``) and the progress
saved with them."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import jax
import orbax.checkpoint as ocp

from gml_jax.labels import path_string
from gml_jax.runner import failure, storage
from gml_jax.runner.logs import EpochSums
from gml_jax.runner.schedule import PlateauTracker
from gml_jax.steps import TrainState


@dataclasses.dataclass
class Progress:
  """Where a run stands; saved (as JSON) with every checkpoint.

  Attributes:
    step: training steps done: the one step counter of the run.
    best_val_accuracy: the best validation accuracy of ŷ at an epoch end so far.
    best_step: the step of that epoch end (-1: none yet).
    train_seconds: time spent in training steps (compilation, evaluations and checkpoint
      saves excluded).
    plateau: the reduce-on-plateau schedule's tracker.
    full_accuracy_epochs: epochs at 100% training accuracy (for the early stop).
    epoch_sums: running sums of the current epoch's step metrics (its training means).
  """

  step: int = 0
  best_val_accuracy: float = -1.0
  best_step: int = -1
  train_seconds: float = 0.0
  plateau: PlateauTracker = dataclasses.field(default_factory=PlateauTracker)
  full_accuracy_epochs: int = 0
  epoch_sums: EpochSums = dataclasses.field(default_factory=EpochSums)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, meta: dict) -> "Progress":
    return cls(**(meta | {"plateau": PlateauTracker(**meta["plateau"]),
                          "epoch_sums": EpochSums(**meta.get("epoch_sums", {}))}))


class Checkpoints:
  """``checkpoints/latest`` and ``checkpoints/best`` of a workdir: orbax checkpoints of the
  whole train state with the run's :class:`Progress` and the digest of the config that made
  them (:func:`gml_jax.runner.workdir.config_digest`), checked on restore."""

  def __init__(self, workdir: storage.Path, config_digest: str):
    self.config_digest = config_digest
    self.latest_saved: int | None = None  # the step of the newest complete latest checkpoint
    if storage.is_remote(workdir):
      _fail_fast_on_unreachable_storage()
    # Orbax writes into a temporary directory and renames it when complete: a run killed
    # mid-save leaves the previous checkpoint intact.
    self._manager = lambda name: ocp.CheckpointManager(
        workdir / "checkpoints" / name, options=ocp.CheckpointManagerOptions(max_to_keep=1))
    self.latest, self.best = self._manager("latest"), self._manager("best")

  def renewed(self, manager: ocp.CheckpointManager) -> ocp.CheckpointManager:
    """A fresh manager of the same folder in place of ``manager``, after a save of it failed
    midway: it reads the steps on the storage anew, and leaves the failed save's state (and
    the library threads still holding it) alone. (Reloading the failed manager instead
    crashed the process now and then: a segfault in 1 of 5 outage tests.)"""
    name = "latest" if manager is self.latest else "best"
    setattr(self, name, self._manager(name))
    return getattr(self, name)

  def save(self, manager: ocp.CheckpointManager, state: TrainState,
           progress: Progress) -> None:
    if manager.latest_step() == progress.step:
      return
    meta = progress.to_json() | {"config_digest": self.config_digest}
    manager.save(progress.step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()
    if manager is self.latest:
      self.latest_saved = progress.step

  def restore(self, manager: ocp.CheckpointManager,
              target: TrainState) -> tuple[TrainState, Progress]:
    step = manager.latest_step()
    path = storage.path(str(manager.directory)) / str(step)
    damaged = (f"Checkpoint {path} is damaged (%s): delete {path} to resume from an older "
               "checkpoint if there is one, or use a new --workdir.")
    layout = path / "state" / "_METADATA"  # what orbax writes last: without it, a partial read
    if not layout.is_file() or not (layout_text := layout.read_text()):
      raise ValueError(damaged % f"{layout} is missing or empty")
    try:
      metadata = ocp.StandardCheckpointer().metadata(path / "state").item_metadata
      entries = json.loads(layout_text).get("tree_metadata", {}).values()
    except Exception as e:  # noqa: BLE001 (whatever orbax raises, the files are damaged)
      _settle()
      raise ValueError(damaged % f"its layout cannot be read: {_first_line(e)}") from e
    listed = sum(not e.get("value_metadata", {}).get("skip_deserialize", False) for e in entries)
    found = len(jax.tree.leaves(metadata))
    if found < listed:  # e.g. a truncated manifest.ocdbt: a partial read
      _settle()
      raise ValueError(damaged % f"{layout} lists {listed} arrays, {found} can be read")
    saved = _tree_shapes(metadata)
    mismatch = _mismatch(saved, target)
    if mismatch:  # checked first: orbax's own report is thousands of lines of arrays
      raise ValueError(f"Checkpoint {path} does not fit this model and optimizer ({mismatch});"
                       " it was saved by another config or code version. Use a new --workdir.")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 (whatever orbax raises, the files are damaged)
      _settle()
      raise ValueError(damaged % f"it cannot be read back: {_first_line(e)}") from e
    meta = dict(restored.meta)
    digest = meta.pop("config_digest", None)
    if digest is not None and digest != self.config_digest:
      raise ValueError(
          f"Checkpoint {path} was saved by a run of another config or on other data (the "
          "config digest saved with it differs from this config's), whatever config.json "
          "says. Use a new --workdir, or the config that made it.")
    if manager is self.latest:
      self.latest_saved = step
    return restored.state, Progress.from_json(meta)

  def close(self) -> None:
    """Ends orbax's background work (a run that stops on an error leaves none behind)."""
    for manager in (self.latest, self.best):
      manager.close()


def _fail_fast_on_unreachable_storage() -> None:
  """Bounds tensorstore's retries of a bucket it cannot reach (32 over several minutes by
  default: a run hung at a save, silent) to a few seconds, so that a save fails over to the
  runner's own retries (:func:`gml_jax.runner.storage.with_retries`), which say what they
  do; also the libraries' (:func:`~gml_jax.runner.storage.quiet_library_retries`). Orbax
  copies its default tensorstore contexts for every read and write."""
  storage.quiet_library_retries()
  from orbax.checkpoint._src.serialization import tensorstore_utils

  retries = {"max_retries": 3, "initial_delay": "0.5s", "max_delay": "2s"}
  for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
    context = getattr(tensorstore_utils, name, None)
    if isinstance(context, dict):
      context.setdefault("gcs_request_retries", retries)


def _settle() -> None:
  """After a failed read of a damaged checkpoint, tensorstore's callbacks print tracebacks
  from background threads for a short while (0.2 s measured): let them finish, so that the
  run's one-line error is printed after them, not among them."""
  time.sleep(2.0)


def _first_line(error: BaseException) -> str:
  """The first line of what went wrong: the deepest cause's (tensorstore's status, e.g.
  "OUT_OF_RANGE: Error reading ... in OCDBT database at local file ...") rather than
  orbax's wrapper, which ends in the repr of a bound method; library reprs cut off."""
  chain = [error]
  while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
    chain.append(nxt)
  for e in reversed(chain):
    text = re.split(r"\s*(?:See full TensorStore details:|<bound method |<built-in method )",
                    str(e).strip())[0].strip()
    if text:
      return failure.shorten(text.splitlines()[0], 300)
  return type(error).__name__


def _tree_shapes(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_string(path): tuple(leaf.shape) for path, leaf in leaves}


def _mismatch(saved: dict[str, tuple], target: TrainState) -> str:
  """What differs between the saved arrays' shapes and ``target``'s, in a line ('' when
  they match)."""
  wanted = _tree_shapes(target)
  shapes = [k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k]]
  missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
  parts = []
  if shapes:
    k = sorted(shapes)[0]
    parts.append(f"{len(shapes)} arrays differ in shape, e.g. {k}: saved {saved[k]}, "
                 f"this model {wanted[k]}")
  if missing:
    parts.append(f"{len(missing)} arrays of this model are not in it, e.g. {missing[0]}")
  if extra:
    parts.append(f"{len(extra)} saved arrays are not in this model, e.g. {extra[0]}")
  return "; ".join(parts)
