"""Training callbacks whose state survives ``kits-keras fit --resume``.

Each stateful callback has ``get_state()`` / ``set_state(state)`` returning
or taking a JSON-serialisable dict; :class:`RunCheckpoint` stores them in
``checkpoints/state.json`` next to the weights-and-optimizer checkpoint.
Callback order matters (they share one ``logs`` dict per epoch):
:class:`kits_keras.training.averaging.ValidateAveraged` (patch validation
on the averaged weights, if any), ``ValidationSummary`` (adds ``val_dice``
and its moving average), then
the LR schedule, the loggers, the curves and last :class:`RunCheckpoint`.
"""

import csv
import logging
import math
import os
import time

import keras
import numpy as np

from kits_keras import files
from kits_keras import io
from kits_keras.artifact import STATE_FILE
from kits_keras.artifact import read_state
from kits_keras.training import averaging
from kits_keras.training.loss_curves import plot_loss_curves

log = logging.getLogger(__name__)


class ResumableReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """``ReduceLROnPlateau`` whose counters can be saved and restored.

    Keras resets ``wait``, ``best`` and ``cooldown_counter`` at the start of
    every ``fit``; a restored state is applied after that reset.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._restored = None

    def get_state(self):
        return {
            "wait": int(self.wait),
            "best": float(self.best),
            "cooldown_counter": int(self.cooldown_counter),
        }

    def set_state(self, state):
        self._restored = dict(state)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._restored:
            self.wait = self._restored["wait"]
            self.best = self._restored["best"]
            self.cooldown_counter = self._restored["cooldown_counter"]


class PolyLearningRate(keras.callbacks.Callback):
    """nnU-Net's schedule: ``base * (1 - epoch / epochs) ** exponent`` at
    the start of each epoch. A function of the epoch alone, so a resumed
    run continues it exactly with no saved state.

    >>> PolyLearningRate(1e-3, 10).rate(5)  # half-way: 0.5 ** 0.9
    0.0005358867312681466
    """

    def __init__(self, base, epochs, exponent=0.9):
        super().__init__()
        self.base, self.epochs, self.exponent = base, epochs, exponent

    def rate(self, epoch):
        return self.base * (1.0 - epoch / self.epochs) ** self.exponent

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate.assign(self.rate(epoch))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:  # as ReduceLROnPlateau does, for history.csv
            logs["learning_rate"] = float(self.rate(epoch))


def _find(logs, prefix, suffix):
    for key, value in logs.items():
        if key.startswith(prefix) and key.endswith(suffix):
            return float(value)
    return None


class ValidationSummary(keras.callbacks.Callback):
    """Adds the validation metric and its moving average to ``logs``.

    ``val_dice`` = mean of the validation Dice of the label set's regions
    (KiTS19: kidney and tumour; KiTS23: its three HECs, named kidney,
    masses and tumour, the challenge's Dice ranking), ``val_dice_ma`` = its
    mean over the last ``window`` validations; the best checkpoint is
    chosen by ``val_dice_ma``.

    With a ``volume_validator`` (:class:`kits_keras.training.validation.
    VolumeValidator`) those are full-volume sliding-window figures, computed
    on the first epoch, every ``volume_every`` epochs and on the last; the
    patch metrics of every epoch are kept as ``val_patch_<region>_dice``.
    Without one they are the pooled Dice of the validation patches
    (:class:`kits_keras.model.metrics.RegionDice` of the full-resolution
    output; Keras names them ``val_<output>_<region>_dice``).

    Args:
        window: int. Validations in the moving average.
        volume_validator: callable ``(model, epoch) -> dict`` with
            ``<region>_dice`` for each region, or None.
        volume_every: int. Epochs between full-volume validations (>= 1
            with a validator).
        regions: tuple of str. Region names. Defaults to KiTS19's
            ``("kidney", "tumour")``.
    """

    def __init__(self, window, volume_validator=None, volume_every=1,
                 regions=("kidney", "tumour")):
        super().__init__()
        self.window = int(window)
        self.volume_validator = volume_validator
        self.volume_every = max(int(volume_every), 1)
        self.regions = tuple(regions)
        self.dice_history = []

    def get_state(self):
        return {"dice_history": list(self.dice_history)}

    def set_state(self, state):
        self.dice_history = list(state["dice_history"])

    def _volume_due(self, epoch):
        last = (self.params or {}).get("epochs")
        return epoch % self.volume_every == 0 or epoch + 1 == last

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        dice = {r: _find(logs, "val_", f"{r}_dice") for r in self.regions}
        if self.volume_validator is not None:
            for region, value in dice.items():
                if value is not None:
                    logs[f"val_patch_{region}_dice"] = value
            if not self._volume_due(epoch):
                return
            with averaging.averaged(self.model):
                scores = self.volume_validator(self.model, epoch)
            dice = {r: scores[f"{r}_dice"] for r in self.regions}
        if any(v is None for v in dice.values()):
            return
        for region, value in dice.items():
            logs[f"val_{region}_dice"] = float(value)
        logs["val_dice"] = float(np.mean([float(v) for v in dice.values()]))
        self.dice_history.append(logs["val_dice"])
        recent = self.dice_history[-self.window:]
        logs["val_dice_ma"] = float(np.mean(recent))


class TimeBudget(keras.callbacks.Callback):
    """Stops training after the first epoch that ends past a time budget.

    The run stays resumable: the epoch that crossed the budget is
    checkpointed like any other, and ``--resume`` continues from it.
    """

    def __init__(self, seconds):
        super().__init__()
        self.seconds = float(seconds)
        self.start = None

    def on_train_begin(self, logs=None):
        self.start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.monotonic() - self.start
        if elapsed > self.seconds:
            log.info("Time budget of %.0f s used (%.0f s) after epoch %d: "
                     "stopping.", self.seconds, elapsed, epoch + 1)
            self.model.stop_training = True


def format_duration(seconds):
    """``"1 h 02 min"``, ``"4 min 05 s"`` or ``"12 s"``.

    >>> format_duration(3725), format_duration(245), format_duration(12.4)
    ('1 h 02 min', '4 min 05 s', '12 s')
    """
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


class Eta(keras.callbacks.Callback):
    """Logs, after each epoch, the steps done of the run's fixed total and
    the time left at the mean pace of the epochs of this call so far
    (validation included)."""

    def __init__(self, epochs, steps_per_epoch):
        super().__init__()
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.start = self.first_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.start is None:
            self.start, self.first_epoch = time.monotonic(), epoch

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.monotonic() - self.start
        done = epoch + 1
        per_epoch = elapsed / (done - self.first_epoch)
        log.info("epoch %d/%d (%d of %d steps): %s elapsed, ETA %s",
                 done, self.epochs, done * self.steps_per_epoch,
                 self.epochs * self.steps_per_epoch,
                 format_duration(elapsed),
                 format_duration(per_epoch * (self.epochs - done)))


class LossCurves(keras.callbacks.Callback):
    """Redraws ``loss_curves.png`` from ``history.csv`` every ``every``
    epochs and when training ends.

    Like the paper's Fig. 3: training and validation loss (left axis) and
    the moving average of the validation Dice (right axis). Must come after
    the ``CSVLogger`` that writes ``csv_path``. Not every epoch: a drawing
    costs ~1 s on 2 cores, as much as two steps of the ``tiny`` model.
    """

    def __init__(self, csv_path, png_path, every=5):
        super().__init__()
        self.csv_path = csv_path
        self.png_path = png_path
        self.every = max(int(every), 1)

    def draw(self, quiet=False):
        """Draws the figure now; ``quiet``: a failure is logged, not raised
        (training already failed and that error must come through)."""
        try:
            plot_loss_curves(self.csv_path, self.png_path)
        except Exception as err:  # noqa: BLE001 (only when quiet)
            if not quiet:
                raise
            log.warning("%s: not redrawn (%s)", self.png_path, err)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            self.draw()

    def on_train_end(self, logs=None):
        self.draw()


class RunCheckpoint(keras.callbacks.Callback):
    """Checkpoints every epoch and keeps the best model artifact.

    After each epoch: the compiled model (weights and optimizer state,
    learning rate and iteration count included) goes to
    ``checkpoints/epoch_XXXX.keras``; then, if ``val_dice_ma`` improved, the
    best model to ``model.keras`` via ``save_best``; then
    ``checkpoints/state.json`` (epochs done, the checkpoint's file name, the
    other callbacks' states) is written atomically, and only then the
    previous checkpoint deleted. A crash at any point leaves a consistent
    ``state.json`` pointing at a complete checkpoint.

    Args:
        checkpoint_dir: str.
        save_best: callable ``(model, epoch, logs)`` writing the artifact.
        stateful: dict name -> callback with ``get_state``/``set_state``.
        extra_state: dict. Stored as is (seed, config name).
    """

    def __init__(self, checkpoint_dir, save_best, stateful, extra_state):
        super().__init__()
        self.checkpoint_dir = checkpoint_dir
        self.save_best = save_best
        self.stateful = stateful
        self.extra_state = dict(extra_state)
        self.best = -math.inf
        self.best_epoch = None

    def restore(self, state):
        path = os.path.join(self.checkpoint_dir, STATE_FILE)
        try:
            for name, callback in self.stateful.items():
                callback.set_state(state[name])
            self.best = float(state["best"])
            self.best_epoch = state["best_epoch"]
        except (KeyError, TypeError, ValueError) as err:
            raise io.CaseError(
                f"{path}: not a kits-keras training state ({type(err).__name__}"
                f" {err}); start a new run") from None

    def on_train_begin(self, logs=None):
        # Training again (resumed with more --epochs): no longer finished.
        state = read_state(self.checkpoint_dir)
        if state is not None and state.get("finished"):
            state.pop("finished")
            files.write_json(
                os.path.join(self.checkpoint_dir, STATE_FILE), state)

    def on_train_end(self, logs=None):
        # Only on a normal end (Keras skips it after an exception): the run
        # is complete, `kits-keras infer` may take its model by default.
        state = read_state(self.checkpoint_dir)
        if state is not None and not state.get("finished"):
            files.write_json(os.path.join(self.checkpoint_dir, STATE_FILE),
                             {**state, "finished": True})

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        name = f"epoch_{epoch + 1:04d}.keras"
        path = os.path.join(self.checkpoint_dir, name)
        files.atomic_write(path, self.model.save)
        score = logs.get("val_dice_ma")
        if score is not None and score > self.best:
            self.best, self.best_epoch = float(score), epoch + 1
            self.save_best(self.model, epoch, logs)
            log.info("Epoch %d: best validation Dice (moving average) %.4f",
                     epoch + 1, score)
        previous = read_state(self.checkpoint_dir)
        state = {
            **self.extra_state,
            "epochs_done": epoch + 1,
            "checkpoint": name,
            "learning_rate": float(self.model.optimizer.learning_rate),
            "best": self.best,
            "best_epoch": self.best_epoch,
            **{k: c.get_state() for k, c in self.stateful.items()},
        }
        files.write_json(os.path.join(self.checkpoint_dir, STATE_FILE),
                         state)
        if previous and previous["checkpoint"] != name:
            old = os.path.join(self.checkpoint_dir, previous["checkpoint"])
            if os.path.exists(old):
                os.remove(old)


def truncate_history(csv_path, epochs_done):
    """Drops rows of epochs after the checkpoint (a crash mid-way)."""
    if not os.path.isfile(csv_path):
        return
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    kept = [r for r in rows[1:] if r and int(r[0]) < epochs_done]
    if len(kept) == len(rows) - 1:
        return

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows[:1] + kept)

    files.atomic_write(csv_path, write)


def checkpoint_path(checkpoint_dir, state):
    """The checkpoint file ``state`` (from :func:`read_state`) names.

    Raises:
        CaseError: missing, or a link leading out of ``checkpoint_dir``.
    """
    path = os.path.join(checkpoint_dir, state["checkpoint"])
    real = os.path.realpath(path)
    inside = os.path.realpath(checkpoint_dir) + os.sep
    if not real.startswith(inside):
        raise io.CaseError(f"{path}: leads outside {checkpoint_dir}")
    if not os.path.isfile(real):
        raise io.CaseError(
            f"{path}: named by {STATE_FILE} but missing; the run cannot be "
            "resumed")
    return path
