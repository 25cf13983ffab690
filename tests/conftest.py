import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"


def shared_fixture(*parts: str) -> Path:
    """A file under ../shared/fixtures, or a skip that says why."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared fixtures come with the project's workspace, not with a plain clone")
    return path


def variable_shapes(json_path: Path, weights_only: bool = True) -> dict[str, tuple[int, ...]]:
    """{name without ':0': shape} from a fixture variables list; metric variables dropped when weights_only."""
    data = json.loads(json_path.read_text())
    rows = data["variables"] if isinstance(data, dict) else data
    shapes = {name.removesuffix(":0"): tuple(shape) for name, shape in rows}
    if weights_only:
        shapes = {n: s for n, s in shapes.items() if n not in ("total", "count")}
    return shapes


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny original-style demo checkpoint (+ reference.npz), written once per test session."""
    from tracer.families.align.demo import write_demo_bundle

    folder = tmp_path_factory.mktemp("tiny_demo")
    write_demo_bundle(folder, "tiny")
    return folder
