"""The output folder's one owner: names, lock, temporary files, journal, manifest and overview.

- **Names.** Output paths are built from input names made safe by :func:`safe_name` (no
  separators, no leading dot, never a name the folder itself uses), so no input can write
  outside ``output.dir`` or over the manifest.
- **One run per folder.** :class:`Writer` holds an exclusive lock on ``.esegeta.lock`` for the
  whole run (``flock``: released by the kernel when the process dies, even by ``kill -9``);
  a second run on the folder is refused with the holder's pid (exit 2).
- **Done means durable.** A result's files are written atomically (:mod:`esegeta.io.outputs`),
  then its record is appended to ``.esegeta-journal.jsonl`` and fsync'd; only then is it
  logged ``ok``. ``--resume`` trusts a record of the manifest or the journal whose files exist,
  so after ``kill -9`` at any moment nothing finished is recomputed. :meth:`Writer.finish` writes
  ``manifest.json`` from the records in memory, then removes the journal.
- **Temporary files** are named ``.tmp-<pid>-<token>-...`` with the run's token;
  :meth:`Writer.clean_stale` removes those of processes no longer alive, and of runs of this
  process that ended, never those of a run still writing (e.g. one on a subfolder).
- **A failing write** makes that result ``failed`` with the cause; it never stops the run.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from esegeta.attribution.summaries import COLUMNS
from esegeta.io import outputs
from esegeta.io.outputs import JOURNAL, LOCK, SUMMARIES_CSV
from esegeta.errors import ConfigError
from esegeta.io.store import written_inputs
from esegeta.io.store import StoreWriter
from esegeta.show.figures import result_caption
from esegeta.show import figures
from esegeta.show import report

log = logging.getLogger("esegeta")
#: The key of ``extras`` under which the runner hands a result's frozen mask (drawn, never saved).
FROZEN_MASK = "_frozen_mask"
#: Results kept in memory for the overview figure, in bytes; past it the figure reads the .npy back.
OVERVIEW_MEMORY = 256 * 2**20
#: Inputs shown in the overview figure (the first ones): a dataset run has thousands.
OVERVIEW_INPUTS = 24
_TMP = re.compile(r"\.tmp-(\d+)-([0-9a-f]+)-")
_live_tokens: set[str] = set()  # the tokens of this process's runs that are writing now


def output_folder(config_dir: str, base_dir: Path | None, override: Path | None = None) -> Path:
    """The folder a run writes to: ``override`` (``--output``) as given, else the config's
    ``output.dir`` relative to ``base_dir`` (the config's folder, default the working directory)."""
    if override is not None:
        return override
    path = (base_dir or Path.cwd()) / config_dir
    return path if "\x00" in str(path) else path.resolve()  # check_dir names a NUL; resolve() cannot


def check_dir(path: Path, where: str = "output.dir", create: bool = True) -> Path:
    """``path`` created if needed; a ConfigError naming ``where`` if it cannot hold a run's output.
    With ``create=False`` (validate, check) nothing is created: the same refusals, from what is there
    (an existing file, a file in the way of a folder to create, a folder that is not writable)."""
    text = os.fspath(path)
    if "\x00" in text:
        raise ConfigError(where, f"{text!r} holds a NUL character; choose a plain folder name")
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(where, f"{path} is an existing file, not a folder; choose another output folder")
        if not create:
            return _could_create(path, where)
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(where, f"cannot create {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(where, f"{path} is not writable; choose another output folder")
    return path


def _could_create(path: Path, where: str) -> Path:
    """ConfigError unless ``path`` is a writable folder or one that ``mkdir(parents=True)`` could make:
    its nearest existing ancestor must be a writable folder."""
    there = path
    while not there.exists() and there.parent != there:
        there = there.parent
    if there is not path and not there.is_dir():
        raise ConfigError(where, f"cannot create {path}: {there} is a file, not a folder; choose another output folder")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ConfigError(where, f"{path} is not writable; choose another output folder" if there is path
                          else f"cannot create {path}: {there} is not writable; choose another output folder")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, run by someone else
        return True
    return True


def _lock(fd: int) -> bool:
    """Take an exclusive, non-blocking lock on ``fd``; False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _own_order(item: Any, array: np.ndarray, kind: str, channels: bool = True) -> np.ndarray:
    """``array`` (C, *spatial) in the input file's own axis order (see ``InputItem.own_order``);
    a feature visualisation (kind ``image``) is not aligned with the input and stays as it is."""
    own_order = getattr(item, "own_order", None)
    return array if kind == "image" or own_order is None else own_order(array, channels)


def save_result(out_dir: Path, item: Any, label: str, attr: np.ndarray, output_cfg: Any,
                kind: str = "attribution", token: str | None = None, *, mask: Any = None, caption: str = "") -> dict:
    """Write one (input, method) result in the configured formats; returns format → relative path.

    ``item`` is the :class:`esegeta.io.loading.InputItem` explained, ``attr`` the upstream
    result without the batch axis, ``output_cfg`` the config's ``output`` section. The
    ``.nii.gz`` (3D inputs only) carries the input's affine, scaled for layer-resolution maps.
    ``.npy`` and ``.nii.gz`` are in the input file's own axis order (``item.own_order``); the
    figure shows ``attr`` as the model saw it, with the outline of ``mask`` (a wrapper's frozen mask)
    and ``caption`` (score and target).
    """
    rel = Path(item.name)
    files: dict[str, str] = {}
    image = item.tensor[0].detach().cpu().numpy()
    own_image = kind == "image"  # a feature visualisation: not aligned with the input
    if "npy" in output_cfg.formats:
        outputs.save_npy(out_dir / rel / f"{label}.npy", _own_order(item, attr, kind), token)
        files["npy"] = str(rel / f"{label}.npy")
    if "nii" in output_cfg.formats and image.ndim == 4 and attr.ndim == 4 and not own_image:
        volume = _own_order(item, attr, kind, channels=False)
        in_shape, at_shape = _own_order(item, image, kind, channels=False).shape[1:], volume.shape[1:]
        affine = item.affine if in_shape == at_shape else outputs.layer_affine(item.affine, in_shape, at_shape)
        outputs.save_nifti(out_dir / rel / f"{label}.nii.gz", volume, affine, token)
        files["nii"] = str(rel / f"{label}.nii.gz")
    if "png" in output_cfg.formats:
        fig_cfg = output_cfg.figure
        fig = figures.attribution_figure(attr, None if own_image else image, method=fig_cfg.method,
                                         sign=fig_cfg.sign, title=f"{label} - {item.name}",
                                         projection=fig_cfg.projection, kind="image" if own_image else None,
                                         mask=mask, clip=fig_cfg.clip, caption=caption,
                                         outline=fig_cfg.mask_outline)
        outputs.save_figure(fig, out_dir / rel / f"{label}.png", token=token)
        files["png"] = str(rel / f"{label}.png")
    return files



def summaries_csv(runs) -> str:
    """The region and channel totals of ``runs`` (manifest records) as CSV text: one line per (method,
    input, kind, key); ``labels`` names the label map (a file, or ``prediction``)."""
    text = io.StringIO()
    _write_summaries(text, runs)
    return text.getvalue()


def _write_summaries(f: Any, runs) -> int:
    """:func:`summaries_csv` written to ``f`` record by record; the number of records with totals."""
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(("method", "label", "input", "labels", *COLUMNS))
    count = 0
    for r in runs:
        if r.get("status") != "ok" or not r.get("summaries"):
            continue
        count += 1
        for row in r["summaries"].get("rows", []):
            writer.writerow((r["method"], r["label"], r["input"], r["summaries"].get("labels") or "",
                             *("" if row.get(c) is None else row[c] for c in COLUMNS)))
    return count


class Writer:
    """Owns ``out`` for one run: ``with Writer(out, config.output, resume=...) as w``."""

    def __init__(self, out: Path, output: Any, *, resume: bool = False, token: str | None = None):
        self.out = Path(out)
        self.output = output
        self.resume = resume
        self.token = token or uuid.uuid4().hex[:8]
        self._fd: int | None = None
        self._journal = None
        self._torn = False
        self._write_lock = threading.Lock()
        self._previous: dict[tuple[str, str], dict] = {}
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self._masks: dict[tuple[str, str], np.ndarray] = {}
        self._held = 0
        self._stores = None  # the attribution stores (esegeta.io.store), from begin()

    # -- the folder ---------------------------------------------------------------
    def __enter__(self) -> Writer:
        check_dir(self.out)
        fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if not _lock(fd):
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError("output.dir", f"{self.out} is in use by another esegeta run (pid {holder}); "
                                            "wait for it to end or choose another output folder")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        _live_tokens.add(self.token)
        try:
            self._previous = self._read_previous() if self.resume else {}
            self.clean_stale()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        _live_tokens.discard(self.token)
        if exc and exc[0] is not None:  # interrupted or failed: no temporary file of this run stays
            try:
                self.clean_stale()
            except OSError as error:
                log.debug("temporary files: %s", error)
        if self._journal is not None:
            try:
                self._journal.close()
            except OSError as error:  # its buffer's last flush, on a full disk: every record was fsync'd
                log.debug("journal: %s", error)
            self._journal = None
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def clean_stale(self) -> list[Path]:
        """Remove temporary files of processes no longer alive, and of this process's ended runs."""
        removed = []
        for path in self.out.rglob(".tmp-*"):
            match = _TMP.match(path.name)
            if match is None or not path.is_file():
                continue
            pid, token = int(match[1]), match[2]
            if (token not in _live_tokens) if pid == os.getpid() else not _alive(pid):
                path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            log.info("removed %d temporary file(s) of ended runs", len(removed))
        return removed

    # -- what an earlier run finished -----------------------------------------------
    def previous(self) -> dict[tuple[str, str], dict]:
        """Records of earlier runs (``--resume``) by (label, input): ok, keyed, every file present."""
        return dict(self._previous)

    def _read_previous(self) -> dict[tuple[str, str], dict]:
        records: dict[tuple[str, str], dict] = {}
        manifest = self.out / "manifest.json"
        if manifest.is_file():
            try:
                runs = json.loads(manifest.read_text(encoding="utf-8")).get("runs", [])
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("resume: %s cannot be read (%s): its results are recomputed", manifest, exc)
                runs = []
            records = {(r.get("label"), r.get("input")): r for r in runs if isinstance(r, dict)}
        journal = self.out / JOURNAL
        for line in journal.read_text(encoding="utf-8").splitlines() if journal.is_file() else []:
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by a kill: its result was not done
                continue
            if record.get("reset"):
                records = {}
            elif "label" in record:
                records[(record["label"], record.get("input"))] = record

        stores: dict[str, set[str]] = {}

        def present(record: dict, fmt: str, rel: str) -> bool:
            if fmt != "zarr":
                return (self.out / rel).is_file()
            if rel not in stores:  # a row counts once its chunk is written
                stores[rel] = written_inputs(self.out / rel)
            # a row still buffered when the run was killed is read back from the result's .npy
            # (the store's writer fills resumed rows it lacks): the result is kept
            npy = record.get("files", {}).get("npy")
            return record.get("input") in stores[rel] or (npy is not None and (self.out / npy).is_file())

        return {k: r for k, r in records.items() if r.get("status") == "ok" and r.get("key")
                and all(present(r, fmt, rel) for fmt, rel in r.get("files", {}).items())}

    # -- writing --------------------------------------------------------------------
    def begin(self, kept: list[dict], inputs: list | None = None) -> None:
        """Start the journal: earlier records are void but ``kept``, those ``--resume`` reuses.
        With the run's ``inputs`` and the ``zarr`` format, every ok result also goes to its method's
        attribution store (:mod:`esegeta.io.store`)."""
        if inputs is not None and "zarr" in self.output.formats:
            self._stores = StoreWriter(self.out, inputs, self.resume)
        self._previous = {}  # read once by the plan: ``kept`` are the ones that stay
        self._journal = open(self.out / JOURNAL, "a" if self.resume else "w", encoding="utf-8")
        lines = [outputs.json_line({"reset": True, "token": self.token})] + [outputs.json_line(r) for r in kept]
        try:
            self._append("\n" + "\n".join(lines))
        except OSError as exc:  # the results will fail to commit, each with the cause
            log.error("journal %s: %s", self.out / JOURNAL, exc)

    def save(self, record: dict, item: Any, result: np.ndarray | None, extras: dict, kind: str) -> dict:
        """Write an ok record's result files, then commit the record; the record, ``failed``
        with the cause if a write failed (never raises)."""
        return self.save_all([(record, item, result, extras, kind)])[0]

    def save_all(self, results: list[tuple[dict, Any, np.ndarray | None, dict, str]]) -> list[dict]:
        """:meth:`save` for the results of one job (``(record, item, result, extras, kind)`` each):
        every file first, then the records in one journal write (one fsync, not one per input)."""
        records = []

        for record, item, result, extras, kind in results:
            extras = dict(extras)
            mask = extras.pop(FROZEN_MASK, None)
            mask = None if mask is None else np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask) > 0.5
            try:
                if record["status"] == "ok":
                    label = record["label"]
                    files = save_result(self.out, item, label, result, self.output, kind, self.token,
                                                mask=mask, caption=result_caption(record.get("score"),
                                                                                  record.get("target")))
                    files.update(outputs.save_extras(self.out, item, label, extras, self.token))
                    record["files"] = files
                    self._keep_for_overview(record, item, result, kind, mask)
                    self._store(record, result, kind, getattr(item, "index", None))
            except Exception as exc:  # noqa: BLE001 (a failing write fails this result, never the run)
                self._failed(record, exc)
            records.append(record)
        try:
            self._append("\n".join(outputs.json_line(r) for r in records))
        except Exception as exc:  # noqa: BLE001 (not durable: not done)
            for record in records:
                self._failed(record, exc)
            try:
                self._append("\n".join(outputs.json_line(r) for r in records))
            except Exception as again:  # noqa: BLE001 (the manifest still gets them)
                log.debug("journal: %s", again)
        return records

    @staticmethod
    def _failed(record: dict, exc: BaseException) -> None:
        record.update(status="failed", files={}, error=f"writing results: {type(exc).__name__}: {exc}")
        log.error("%s on %s failed: %s", record["label"], record["input"], record["error"])

    def _store(self, record: dict, result: np.ndarray, kind: str, index: int | None = None) -> None:
        if self._stores is not None:
            try:
                if self._stores.add(record, result, kind, index):
                    record["files"]["zarr"] = self._stores.relative(record["label"])
            except Exception as exc:  # noqa: BLE001 (the result's own files are written: it stays ok)
                record["warnings"] = [*record.get("warnings", []), f"attribution store: {type(exc).__name__}: {exc}"]
                log.error("%s on %s: the attribution store failed: %s", record["label"], record["input"], exc)

    def commit(self, record: dict) -> None:
        """Append ``record`` to the journal and fsync: from then on it counts as done."""
        self._append(outputs.json_line(record))

    def _append(self, line: str) -> None:
        with self._write_lock:
            start = self._journal.tell()
            try:
                self._journal.write(("\n" if self._torn else "") + line + "\n")
                self._journal.flush()
                os.fsync(self._journal.fileno())
                self._torn = False
            except BaseException:
                try:  # undo the line: the result is not done
                    self._journal.truncate(start)
                    self._journal.seek(start)
                except OSError:
                    self._torn = True
                raise

    def _keep_for_overview(self, record: dict, item: Any, result: np.ndarray, kind: str,
                           mask: np.ndarray | None = None) -> None:
        """Keep a result (and its frozen mask) in memory for the overview and the report: the first
        inputs only (:data:`OVERVIEW_INPUTS`), within :data:`OVERVIEW_MEMORY`."""
        shown = {name for _, name in self._arrays}
        if len(shown) >= OVERVIEW_INPUTS and record["input"] not in shown:
            return
        key = (record["label"], record["input"])
        if mask is not None and self._held + mask.nbytes <= OVERVIEW_MEMORY:
            self._masks[key] = mask
            self._held += mask.nbytes
        if self._held + result.nbytes <= OVERVIEW_MEMORY:
            self._arrays[key] = result
            self._held += result.nbytes

    # -- the end ----------------------------------------------------------------------
    def finish(self, manifest: dict, inputs: list, kinds: dict[str, str]) -> None:
        """The overview figure and ``report.html`` (a failure is logged, no result is lost), then
        ``manifest.json``; the journal is removed once the manifest is written (an error propagates)."""
        if "png" in self.output.formats:
            self._overview(manifest, inputs, kinds)
        if self._stores is not None:
            try:
                manifest["stores"] = self._stores.close(manifest["runs"], kinds)
            except Exception as exc:  # noqa: BLE001 (every result has its own files)
                log.error("attribution stores failed: %s: %s", type(exc).__name__, exc)
        self._summaries(manifest)
        self._report(manifest, inputs, kinds)
        outputs.save_json(self.out / "manifest.json", manifest, self.token)
        if self._journal is not None:
            try:
                self._journal.close()
            except OSError as error:
                log.debug("journal: %s", error)
            self._journal = None
        (self.out / JOURNAL).unlink(missing_ok=True)

    def _summaries(self, manifest: dict) -> None:
        """``summaries.csv``: every ok result's region and channel totals, one row each (long format),
        written record by record (a run's records are read from disk: :mod:`esegeta.run.records`)."""
        if not any(r.get("status") == "ok" and r.get("summaries") for r in manifest["runs"]):
            return
        try:
            with outputs.atomic_path(self.out / SUMMARIES_CSV, self.token) as tmp:
                with open(tmp, "w", encoding="utf-8", newline="") as f:
                    _write_summaries(f, manifest["runs"])
                    f.flush()
                    os.fsync(f.fileno())
            manifest["summaries"] = SUMMARIES_CSV
        except Exception as exc:  # noqa: BLE001 (every record holds its own totals)
            log.error("%s failed: %s: %s", SUMMARIES_CSV, type(exc).__name__, exc)

    def _overview(self, manifest: dict, inputs: list, kinds: dict[str, str]) -> None:
        rows = []
        if len(inputs) > OVERVIEW_INPUTS:
            log.info("overview: the first %d of %d inputs", OVERVIEW_INPUTS, len(inputs))
        shown = {item.name: [] for item in inputs[:OVERVIEW_INPUTS]}
        for r in manifest["runs"]:  # one pass (the records are read from disk), keeping the shown inputs' only
            if r["input"] in shown:
                shown[r["input"]].append(r)
        for item in inputs[:OVERVIEW_INPUTS]:
            cells, mask, predicted = [], None, None
            for r in shown[item.name]:
                kind = kinds[r["method"]]
                attr = self._result(r, item, kind) if r["status"] == "ok" else None
                note = "" if attr is not None else f"{r['status']}: {(r['error'] or '')[:60]}"
                cell_mask = self._masks.get((r["label"], r["input"]))
                mask = mask if mask is not None else cell_mask
                predicted = predicted if predicted is not None else r.get("predicted")
                cells.append({"label": r["label"], "array": attr, "note": note, "score": r.get("score"),
                              "target": r.get("target"), "mask": cell_mask,
                              "kind": "image" if kind == "image" else "attribution"})
            info = {"mask": mask, "caption": "" if predicted is None else f"predicted {predicted}"}
            rows.append((item.name, item.tensor[0].detach().cpu().numpy(), cells, info))
        fig_cfg = self.output.figure
        try:
            fig = figures.overview_figure(rows, method=fig_cfg.method, sign=fig_cfg.sign,
                                          projection=fig_cfg.projection, clip=fig_cfg.clip)
            outputs.save_figure(fig, self.out / "overview.png", token=self.token)
            manifest["overview"] = "overview.png"
        except Exception as exc:  # noqa: BLE001 (a failed overview figure loses no result)
            log.error("overview figure failed: %s: %s", type(exc).__name__, exc)

    def _report(self, manifest: dict, inputs: list, kinds: dict[str, str]) -> None:
        try:
            results = report.Results(lambda r, item: self._result(r, item, kinds.get(r["method"], "attribution"))
                                     if r["status"] == "ok" else None,
                                     lambda r: self._masks.get((r["label"], r["input"])), kinds)
            html = report.build_report(manifest, inputs, results, self.output.figure, self.out)
            outputs.atomic_write_bytes(self.out / "report.html", html.encode("utf-8"), self.token)
            manifest["report"] = "report.html"
        except Exception as exc:  # noqa: BLE001 (a failed report loses no result)
            log.error("report.html failed: %s: %s", type(exc).__name__, exc)

    def _result(self, record: dict, item: Any, kind: str) -> np.ndarray | None:
        """A result as the model saw it: from memory, else (resumed, or past the budget) its .npy."""
        held = self._arrays.get((record["label"], record["input"]))
        if held is not None or "npy" not in record["files"]:
            return held
        saved = np.load(self.out / record["files"]["npy"])
        return saved if kind == "image" else item.model_order(saved)


__all__ = ["FROZEN_MASK", "Writer", "check_dir", "save_result"]
