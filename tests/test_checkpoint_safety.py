"""Checkpoints are data (issue 8, safety), and commits are atomic. Pure: no process group.

- latest_checkpoint only returns committed `step_N` directories (a `.tmp` with a complete-looking
  `.metadata`, or a directory without the marker, is never resumed from);
- a commit over an existing step replaces it without a window where neither exists;
- a crafted `.metadata` or non-tensor entry that would run code under torch's default DCP
  loader (shown here: it does run) is refused by runtime.checkpoint's loaders, and nothing runs;
- runtime.launch's own argument checks fail before any process group, with one message.
"""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from runtime.checkpoint import (
    COMMITTED,
    SafeReader,
    _commit,
    committed_checkpoints,
    latest_checkpoint,
    load_full_state,
    read_metadata,
    state_difference,
)
from specs import SpecError
from tests.runtime_plans import make_plan

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _save(path, state) -> None:
    dcp.save(state, checkpoint_id=str(path), no_dist=True)


def _committed(path, state):
    _save(path, state)
    (path / COMMITTED).write_text("{}")
    return path


class _RunsCode:
    """Unpickling this runs os.system (what a crafted checkpoint could do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_latest_checkpoint_ignores_uncommitted(tmp_path):
    state = {"w": torch.arange(4.0)}
    _committed(tmp_path / "step_00000002", state)
    _save(tmp_path / "step_00000004.tmp", state)            # killed before the commit
    _save(tmp_path / "step_00000006", state)                # no marker (e.g. an old layout, or torn)
    (tmp_path / "step_00000008").mkdir()                    # empty
    (tmp_path / "notes.txt").write_text("x")
    assert [s for s, _ in committed_checkpoints(tmp_path)] == [2]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_commit_replaces_an_existing_step(tmp_path):
    old = _committed(tmp_path / "step_00000002", {"w": torch.zeros(3)})
    tmp = tmp_path / "step_00000002.tmp"
    _save(tmp, {"w": torch.ones(3)})
    _commit(tmp, old, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]
    assert torch.equal(load_full_state(old)["w"], torch.ones(3))


def test_round_trip_of_tensors_and_plain_values(tmp_path):
    state = {"w": torch.randn(3, 2, dtype=torch.float64), "step": torch.tensor(7),
             "lr": 0.1, "betas": (0.9, 0.99), "names": ["a", "b"], "flag": None}
    path = _committed(tmp_path / "step_00000001", state)
    back = load_full_state(path)
    diff = state_difference(state, back)
    assert diff["keys"] == 6 and diff["bytes_lost"] == 0, diff
    back["w"][0, 0] += 1
    assert state_difference(state, back)["bytes_lost"] == 48  # the whole 3x2 float64 entry


def test_crafted_metadata_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned-metadata"
    path = _committed(tmp_path / "step_00000001", {"w": torch.zeros(2)})
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(SpecError, match=r"not a DCP metadata file autoplan will load .*refused global posix.system"):
        read_metadata(path)
    with pytest.raises(SpecError, match="refused global"):
        load_full_state(path)
    assert not marker.exists()
    # The trust boundary is real: torch's own reader unpickles it and runs the code.
    with pytest.raises(AttributeError):  # after running os.system it finds an int, not metadata
        dcp.FileSystemReader(str(path)).read_metadata()
    assert marker.exists()


def test_crafted_bytes_entry_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned-bytes"
    path = _committed(tmp_path / "step_00000001", {"w": torch.zeros(2), "evil": _RunsCode(marker)})
    assert not marker.exists()
    with pytest.raises(SpecError, match="entry evil is not plain data"):
        load_full_state(path)
    assert not marker.exists()
    state = {"w": torch.zeros(2), "evil": None}
    dcp.load(state, storage_reader=SafeReader(str(path)), no_dist=True)  # torch's default planner
    assert marker.exists()


def test_metadata_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "step_00000001"
    path.mkdir()
    (path / ".metadata").write_bytes(b"not a pickle at all")
    with pytest.raises(SpecError, match="is not a DCP metadata file"):
        read_metadata(path)
    with pytest.raises(SpecError, match="no .metadata file"):
        read_metadata(tmp_path)


@pytest.mark.parametrize("extra,needle", [
    (["--resume-from", "{tmp}"], "not a committed checkpoint (no COMMITTED marker)"),
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--checkpoint-every", "2"], "--checkpoint-every needs --checkpoint-dir"),
    (["--timeout-s", "0"], "--timeout-s: must be > 0 seconds"),
    (["--steps", "-1"], "--steps: must be >= 0 (got -1)"),
])
def test_launch_argument_errors_before_any_process_group(tmp_path, monkeypatch, extra, needle):
    import torch.distributed as dist

    from runtime.launch import main

    plan = tmp_path / "plan.yaml"
    make_plan("gpt-tiny").to_file(plan)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SpecError) as err:
        main([str(plan), "--model", "gpt-tiny", *[a.replace("{tmp}", str(tmp_path)) for a in extra]])
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not dist.is_initialized()
