"""A traced conversion leaves no process behind: its Keras worker (and multiprocessing's helpers) are waited for
in every exit path, so nothing of its process group outlives it, not even a zombie."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _group(pgid: int) -> list[tuple[int, str, str]]:
    """(pid, state, name) of every process in process group `pgid`, zombies included."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        fields = rest.split()
        if int(fields[2]) == pgid:
            found.append((int(entry), fields[0], name))
    return found


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


CASES = {
    "success": ([], 0),
    "parity failure": (["--hf_config", "vision_config.batch_norm_eps=0.1"], 1),
    "bad input": (["--image", "no-such-image.png", "--text", "a cat"], 2),
    "ctrl-c": ([], 130),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_traced_run_leaves_no_process_behind(case, tiny_bundle, tmp_path):
    extra, code = CASES[case]
    inputs = [] if "--image" in extra else ["--inputs", str(tiny_bundle / "reference.npz")]
    cmd = [sys.executable, str(ROOT / "convert.py"), "--checkpoint_path", str(tiny_bundle / "model-weights"),
           *inputs, "--trace", "--report_dir", str(tmp_path / "report"), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if case == "ctrl-c":  # once the Keras worker runs, as a Ctrl-C in the terminal would: the whole group
        deadline = time.monotonic() + 60
        while not _children(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _children(proc.pid), "the Keras worker never started"
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-2000:]
    time.sleep(0.5)  # an orphan would be re-parented by now
    assert _group(proc.pid) == [], f"left behind: {_group(proc.pid)}"
