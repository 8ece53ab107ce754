"""A run folder and its bookkeeping: settings, records, checkpoints, resume and summary.

``run_config.json``: the settings that change what the run computes (a resume must match).
``metrics.jsonl``: one row per round, each appended with a single write and flushed, so a
crash or a full disk leaves at worst a truncated last line, which :func:`read_jsonl` drops
(and can repair). ``checkpoints/``: orbax checkpoints of the whole stacked state with the
round counter and the cumulative traffic; keys need no saving, since round r's randomness is
``fold_in(key, r)``. ``summary.json``: written last.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ggans.config import OPERATIONAL, RunConfig, flat
from ggans.errors import ConfigError, GGansError
from ggans.gan import GanState


def _plain(x: Any) -> Any:
    """JSON-ready: arrays as lists, and non-finite floats as ``null`` (strict JSON; the rows
    and the summary say so once, in ``NULL_MEANS``)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray | np.generic):
        return _plain(x.tolist())
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


NULL_MEANS = "null: a non-finite value (a machine whose losses or parameters diverged)"
log = logging.getLogger("ggans")


def _line(row: dict) -> bytes:
    return (json.dumps(_plain(row), allow_nan=False) + "\n").encode()


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON row as one line, flushed to disk. Every byte is checked written: a
    failed or short write is undone (the file cut back to its rows before) and stops the run
    with one line."""
    line = _line(row)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise GGansError(f"{path}: cannot open for writing ({err.strerror})") from None
    start = os.fstat(fd).st_size
    try:
        done = 0
        while done < len(line):
            n = os.write(fd, line[done:])
            if n <= 0:
                raise OSError(28, "no space left on device")
            done += n
        os.fsync(fd)
    except OSError as err:
        os.ftruncate(fd, start)
        raise GGansError(
            f"{path}: cannot write a row ({err.strerror}); the rows before it are kept"
        ) from None
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The rows of a jsonl file. A partial last line (a write cut short) is dropped, and cut
    from the file if ``repair``; a damaged line before it is skipped, its rows after kept, and
    (if ``repair``) moved to ``<file>.corrupt`` with one warning."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    rows, good, bad = [], [], []
    for i, line in enumerate(lines):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("truncated")
            rows.append(json.loads(line))
            good.append(line)
        except ValueError:
            if i < len(lines) - 1:
                bad.append(line)
    if repair and len(good) < len(lines):
        if bad:
            with open(path.with_name(path.name + ".corrupt"), "ab") as f:
                f.writelines(bad)
            log.warning("%s: %d damaged line(s) moved to %s.corrupt", path, len(bad), path.name)
        _replace_bytes(path, b"".join(good))
    return rows


def _replace_bytes(path: Path, data: bytes) -> None:
    """Replace a file's contents atomically (a synced temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise GGansError(f"{path}: cannot rewrite ({err.strerror}); left as it was") from None


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write a JSON file atomically (write a temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(_plain(obj), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise GGansError(f"{path}: cannot write ({err.strerror})") from None


def describe(name: str, values: np.ndarray, extremes: bool = False) -> dict[str, Any]:
    """Per-machine values and their mean and std (and min, max, argmin, argmax if asked)."""
    v = np.asarray(values, np.float64)
    row: dict[str, Any] = {name: v, f"{name}_mean": v.mean(), f"{name}_std": v.std()}
    if extremes:
        row.update({f"{name}_min": v.min(), f"{name}_max": v.max()})
    return row


def checksums(state: GanState) -> list[int]:
    """One CRC-32 per leaf of the state's bytes, a leaf on the host at a time."""
    return [zlib.crc32(np.asarray(jax.device_get(x)).tobytes()) for x in jax.tree.leaves(state)]


class Checkpointer:
    """Saves every ``every`` rounds (and when asked), keeps the last two, and restores the
    newest that is whole: each checkpoint carries a CRC-32 per array, checked on restore; one
    that cannot be read or fails the check is set aside (renamed ``<round>.corrupt-<time>``,
    never deleted) with one warning, and the one before it is tried."""

    def __init__(self, directory: str | Path, every: int = 1) -> None:
        self.every = every
        self.directory = Path(directory).absolute()
        self._open()

    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_round(self) -> int | None:
        """Rounds completed by the latest checkpoint, or None."""
        return self.manager.latest_step()

    def due(self, rounds_done: int, last: bool) -> bool:
        return last or (self.every > 0 and rounds_done % self.every == 0)

    def save(self, rounds_done: int, state: GanState, meta: dict[str, Any]) -> None:
        """Save after ``rounds_done`` rounds; ``meta`` is JSON (cumulative traffic, ...)."""
        meta = dict(_plain(meta), checksums=checksums(state))
        self.manager.save(
            rounds_done,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        self.manager.wait_until_finished()

    def restore(self, like: GanState) -> tuple[int, GanState, dict[str, Any]]:
        """The newest whole checkpoint, restored with the shapes, dtypes and shardings of
        ``like``; a GGansError when none is."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        while (step := self.manager.latest_step()) is not None:
            try:
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
                meta = dict(out["meta"])
                saved = meta.pop("checksums", None)  # absent in folders written before them
                if saved is not None and saved != checksums(out["state"]):
                    raise ValueError("its arrays differ from their checksums")
                return step, out["state"], meta
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is set aside
                aside = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
                self.manager.close()
                os.replace(self.directory / str(step), aside)
                self._open()
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
                log.warning(
                    "checkpoint of round %d is damaged (%s: %s); set aside as %s",
                    step,
                    type(err).__name__,
                    reason,
                    aside.name,
                )
        raise GGansError(
            f"{self.directory}: no whole checkpoint left (damaged ones set aside as "
            "<round>.corrupt-*); resume=false starts afresh in another folder"
        )

    def close(self) -> None:
        self.manager.close()


# run_config.json keys of folders written before the config tree took the dataclasses' shape
_RENAMED = {
    "protocol": "protocol.name",
    "mix_optimizer": "protocol.mix_optimizer",
    "mixing_form": "mixing.form",
    "checkpoint_every": "checkpoint.every",
}


@dataclasses.dataclass
class Resumed:
    """Where a resumed run stands: rounds done, state, cumulative traffic, excluded machines,
    and the rows up to that round."""

    round: int
    state: GanState
    cum: dict[str, Any]
    excluded: np.ndarray
    rows: list[dict]


class FolderBusy(GGansError):
    """Another live run holds the folder's lock."""


class FolderLock:
    """An OS lock (``flock``) on ``<folder>/.lock``, held for a run's life: a second run into
    the folder stops at once, naming the holder's PID. The OS drops the lock when its process
    dies, so a dead run's lock is simply taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise GGansError(f"{self.path.parent}: cannot write there ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FolderBusy(
                f"{self.path.parent}: another run (pid {holder}) is using this folder; wait for "
                "it to end, or choose another folder (hydra.run.dir=...)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunFolder:
    """One run's folder: locked, checked before anything else is written, then records as
    the run goes."""

    def __init__(self, path: str | Path, cfg: RunConfig) -> None:
        self.path = Path(path)
        self.cfg = cfg
        self.metrics = self.path / "metrics.jsonl"
        self.settings = {k: v for k, v in flat(cfg).items() if k not in OPERATIONAL}
        self._ckpt: Checkpointer | None = None
        self._lock = FolderLock(self.path)
        self.created = False  # whether this run made the folder (a refused run removes it)

    def lock(self) -> None:
        """Take the folder's lock (making the folder if need be)."""
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise GGansError(f"{self.path}: cannot make the run folder ({err.strerror})") from None
        self._lock.acquire()

    def abandon(self) -> None:
        """After a refusal: release the lock; remove the folder if this run made it and it
        holds nothing else."""
        self.close()
        if self.created and {p.name for p in self.path.iterdir()} <= {".lock"}:
            shutil.rmtree(self.path, ignore_errors=True)

    @property
    def checkpoints(self) -> Checkpointer:
        if self._ckpt is None:
            self.path.mkdir(parents=True, exist_ok=True)
            self._ckpt = Checkpointer(self.path / "checkpoints", self.cfg.checkpoint.every)
        return self._ckpt

    def done_rounds(self) -> int | None:
        """Rounds of the latest checkpoint, or None (reads only: makes no folder)."""
        if not (self.path / "checkpoints").is_dir():
            return None
        return self.checkpoints.latest_round()

    def check(self, resume: bool | str) -> int | None:
        """Refuse a resume that cannot be (``resume`` true without a checkpoint, false with
        one, other settings than the folder's); return the rounds to resume after, or None."""
        done = self.done_rounds()
        if done is None and resume is True:
            raise GGansError(f"resume=true: no checkpoint in {self.path / 'checkpoints'}")
        if done is None and resume is not False and read_jsonl(self.metrics):
            raise GGansError(
                f"{self.metrics}: holds rows of a run with no checkpoint to resume from; "
                "resume=false starts afresh (the rows are kept aside), or use another folder"
            )
        if done is not None and resume is False:
            raise GGansError(
                f"resume=false: {self.path} already holds a run (checkpoint after round "
                f"{done}); use another folder, or resume=auto to continue it"
            )
        saved = self.path / "run_config.json"
        if saved.exists():
            old = {_RENAMED.get(k, k): v for k, v in json.loads(saved.read_text()).items()}
            # a key added since the folder was written counts as saved with its default
            old = {**flat(RunConfig()), **old}
            old = {k: v for k, v in old.items() if k not in OPERATIONAL}
            for key in sorted(set(old) | set(self.settings)):
                if old.get(key) != self.settings.get(key):
                    raise ConfigError(
                        f"{key}={self.settings.get(key)!r}: the run folder {self.path} holds a "
                        f"run with {key}={old.get(key)!r}; use another folder or the same "
                        "settings"
                    )
        return done

    def begin(self) -> None:
        """Write the settings; rows of a run that never reached a checkpoint (only with
        ``resume=false``) are moved aside to ``metrics.jsonl.<time>``, never deleted."""
        write_json(self.path / "run_config.json", self.settings)
        if self.done_rounds() is None and self.metrics.exists():
            aside = self.metrics.with_name(f"metrics.jsonl.{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.metrics, aside)
            log.warning("%s: earlier rows with no checkpoint kept in %s", self.path, aside.name)

    def restore(self, like: GanState) -> Resumed:
        """The latest checkpoint, and metrics.jsonl cut back to its round."""
        start, state, meta = self.checkpoints.restore(like)
        cum = {k: np.asarray(v) if isinstance(v, list) else v for k, v in meta["cum"].items()}
        read = read_jsonl(self.metrics, repair=True)
        rows = [r for r in read if r["round"] <= start]
        missing = sorted(set(range(1, start + 1)) - {r["round"] for r in rows})
        if missing:
            log.warning("%s: no row for round(s) %s (damaged or lost)", self.metrics, missing)
        if len(rows) < len(read):  # rows past the checkpoint: that round is trained again
            _replace_bytes(self.metrics, b"".join(_line(r) for r in rows))
        return Resumed(start, state, cum, np.asarray(meta["excluded"], bool), rows)

    def summary(self) -> dict[str, Any] | None:
        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    def record(self, row: dict[str, Any]) -> None:
        append_jsonl(self.metrics, row)

    def checkpoint(
        self, rounds_done: int, last: bool, state: GanState, meta: dict, force: bool = False
    ) -> None:
        if force or self.checkpoints.due(rounds_done, last):
            try:
                self.checkpoints.save(rounds_done, state, meta)
            except (OSError, ValueError, RuntimeError) as err:  # orbax wraps full disks so
                raise GGansError(
                    f"{self.path / 'checkpoints'}: cannot write the checkpoint of round "
                    f"{rounds_done} ({type(err).__name__}: {err}); the one before is kept"
                ) from None

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json; return it as saved (plain lists)."""
        write_json(self.path / "summary.json", summary)
        return json.loads((self.path / "summary.json").read_text())

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None
        self._lock.release()
