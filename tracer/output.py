"""Output folders and files: refuse early what must not or cannot be written, write atomically, tidy up after an
interrupted run.

Light on purpose (no numpy, torch or TensorFlow): the CLI runs these checks before importing anything heavy.

A folder is written into a hidden sibling `.NAME.partial-<pid>-<random>` and renamed into place only once it is
complete (and verified); an existing folder being replaced is first moved aside to `.NAME.old-<pid>`. A run killed
with SIGKILL can leave either behind; the next run writing to the same destination removes partial folders of
processes that no longer exist and, if the destination itself went missing in the middle of a replacement, puts the
old folder back.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from tracer.errors import BadInputError

logger = logging.getLogger(__name__)

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>partial|old)-(?P<pid>\d+)(?:-.*)?$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def check_writable_parent(path: Path, what: str, flag: str) -> None:
    """The folder `path` would be created in must exist and accept new entries; probed by creating one."""
    parent = path.resolve().parent
    if not parent.is_dir():
        raise BadInputError(f"{what} {path}: the parent folder {parent} does not exist; create it or choose another "
                            f"{flag}")
    try:
        probe = tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=parent)
    except OSError as err:
        raise BadInputError(f"{what} {path}: cannot write into {parent} ({err.strerror or err}); make it writable "
                            f"or choose another {flag}") from err
    os.rmdir(probe)


def check_folder(path: str | os.PathLike, overwrite: bool, what: str, flag: str) -> Path:
    """Refuse, before any heavy work, an output folder we must not (non-empty, no --overwrite) or cannot write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInputError(f"{what} {path} exists and is not a folder; remove it or choose another {flag}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise BadInputError(f"{what} {path} exists and is not empty; pass --overwrite to replace it, or choose "
                            f"another {flag}")
    check_writable_parent(path, what, flag)
    return path


def check_file(path: str | os.PathLike, overwrite: bool, what: str, flag: str) -> Path:
    """The same for a single output file."""
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"{what} {path} is a folder; give a file name for {flag}")
    if path.exists() and not overwrite:
        raise BadInputError(f"{what} {path} already exists; pass --overwrite to replace it, or choose another {flag}")
    check_writable_parent(path, what, flag)
    return path


def clean_leftovers(destination: str | os.PathLike, any_name: bool = False) -> list[Path]:
    """Remove what killed runs left beside `destination`: partial folders of dead processes; an `.old-PID` folder
    is put back when its destination is missing (the run died between the two renames), else removed.
    `any_name=True`: `destination` is a folder of outputs (`reports/`); clean what was left in it for any name."""
    destination = Path(destination)
    parent = destination.resolve() if any_name else destination.resolve().parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        m = _LEFTOVER.match(entry.name)
        if not m or (not any_name and m.group("name") != destination.name) or _pid_alive(int(m.group("pid"))):
            continue
        target = parent / m.group("name")
        if m.group("what") == "old" and not target.exists():
            entry.rename(target)
            logger.warning("restored %s from %s, left by an interrupted run", target, entry)
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as err:
            logger.warning("could not remove %s, left by an interrupted run: %s", entry, err)
            continue
        logger.info("removed %s, left by an interrupted run", entry)
        removed.append(entry)
    return removed


def write_folder_atomically(destination: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool,
                            verify: Callable[[Path], None] | None = None) -> Path:
    """`fill(tmp)` writes the content into a hidden folder beside `destination`; `verify(tmp)` may check it; only
    then is it renamed into place (replacing an existing folder when `overwrite`). On any error or interruption the
    temporary folder is removed and `destination` is left as it was."""
    destination = Path(destination)
    parent = destination.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-{os.getpid()}-", dir=parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 is for the hidden stage only; the result is an ordinary folder
        fill(tmp)
        if verify is not None:
            verify(tmp)
        if destination.exists():
            if not overwrite and (not destination.is_dir() or any(destination.iterdir())):
                raise BadInputError(f"output folder {destination} appeared during the run; not replacing it (pass "
                                    f"--overwrite, or choose another folder)")
            old = parent / f".{destination.name}.old-{os.getpid()}"
            destination.rename(old)
            tmp.rename(destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination


def write_file_atomically(destination: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp_path)` writes a file beside `destination` (same suffix); it is then renamed into place."""
    destination = Path(destination)
    fd, name = tempfile.mkstemp(prefix=f".{destination.name}.partial-{os.getpid()}-", suffix=destination.suffix,
                                dir=destination.resolve().parent)
    os.close(fd)
    try:
        os.chmod(name, 0o666 & ~_umask())
        write(Path(name))
        os.replace(name, destination)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return destination


def preflight(options) -> None:
    """Every cheap check of a run, done before any heavy work (`options`: `ConvertOptions` or the CLI's
    arguments): flags that need another (`float64` needs `trace`); the model folder (with `save_model`/`push_to_hub`), the report folder (with `trace`) and the
    mapping file (`mapping_out`) must be writable, and must not hold anything unless `overwrite`. Leftovers of
    interrupted runs beside them are cleaned first."""
    if getattr(options, "float64", False) and not getattr(options, "trace", False):
        raise BadInputError("--float64 runs both models in float64 to compare them layer by layer: add --trace")
    overwrite = bool(getattr(options, "overwrite", False))
    if getattr(options, "save_model", False) or getattr(options, "push_to_hub", False):
        dump = Path(options.pytorch_dump_folder_path)
        clean_leftovers(dump)
        check_folder(dump, overwrite, "output folder", "--pytorch_dump_folder_path")
    if getattr(options, "trace", False):
        if options.report_dir:
            clean_leftovers(options.report_dir)
            check_folder(options.report_dir, overwrite, "report folder", "--report_dir")
        else:  # reports/<checkpoint>-<timestamp>: a new name each run; `reports` is created if missing
            reports = Path("reports")
            clean_leftovers(reports, any_name=True)
            if reports.exists() and not reports.is_dir():
                raise BadInputError(f"{reports.resolve()} exists and is not a folder, so the default report folder "
                                    "cannot be created; remove it or pass --report_dir")
            check_writable_parent(reports / "run" if reports.is_dir() else reports, "report folder", "--report_dir")
    if getattr(options, "mapping_out", None):
        clean_leftovers(options.mapping_out)
        check_file(options.mapping_out, overwrite, "mapping file", "--mapping_out")
