"""Checkpoints are data (issue 8, safety), and commits are atomic. Pure: no process group.

- latest_checkpoint only returns committed `step_N` directories (a `.tmp` with a complete-looking
  `.metadata`, or a directory without the marker, is never resumed from);
- a commit over an existing step replaces it without a window where neither exists;
- a crafted `.metadata` or non-tensor entry that would run code under torch's default DCP
  loader (shown here: it does run) is refused by runtime.checkpoint's loaders, and nothing runs;
- every file carries a sha256 in MANIFEST.json (its own digest in the COMMITTED marker): flipped
  bytes (same size), truncation, an edited `.metadata` or manifest, a damaged marker, a missing or
  unreadable (FIFO) shard are each detected and the file named, and a damaged checkpoint is refused
  with one line (a manifest naming a path outside the checkpoint is refused, never read);
- runtime.launch's own argument checks (including --resume without a checkpoint, an unwritable
  --checkpoint-dir, a --log-file in a missing folder) fail before any process group, with one message.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from runtime.checkpoint import (
    COMMITTED,
    MANIFEST,
    SafeReader,
    _commit,
    committed_checkpoints,
    file_digest,
    latest_checkpoint,
    load_full_state,
    owned_files,
    read_metadata,
    state_difference,
    verify_checkpoint,
    write_manifest,
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


def _sealed(path, state):
    """A committed checkpoint with a manifest, as save_checkpoint writes it (one rank)."""
    _save(path, state)
    digest = write_manifest(path, {p.name: file_digest(p) for p in owned_files(path, 0, 1)})
    (path / COMMITTED).write_text(json.dumps({"step": 1, "manifest_sha256": digest}))
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


_STATE = {"w": torch.arange(64, dtype=torch.float64).reshape(8, 8), "b": torch.ones(5), "lr": 0.1}


def _shard(path):
    return next(p for p in sorted(path.iterdir()) if p.name.endswith(".distcp"))


def _flip(p, at=None):
    data = bytearray(p.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _fifo(p):
    p.unlink()
    os.mkfifo(p)


def _edit_manifest(path):
    doc = json.loads((path / MANIFEST).read_text())
    name = next(iter(doc["files"]))
    doc["files"][name]["sha256"] = "0" * 64
    (path / MANIFEST).write_text(json.dumps(doc))


_CORRUPTIONS = {
    "flipped shard bytes": (lambda path: _flip(_shard(path)), lambda path: _shard(path).name,
                            "sha256 differs from the manifest (same size"),
    "truncated shard": (lambda path: _truncate(_shard(path)), lambda path: _shard(path).name, "truncated or extended"),
    "extended shard": (lambda path: _shard(path).open("ab").write(b"x"), lambda path: _shard(path).name,
                       "truncated or extended"),
    "flipped metadata": (lambda path: _flip(path / ".metadata"), lambda path: ".metadata", "sha256 differs"),
    "truncated metadata": (lambda path: _truncate(path / ".metadata"), lambda path: ".metadata", "truncated"),
    "missing shard": (lambda path: _shard(path).unlink(), lambda path: "__0_0.distcp", "missing"),
    "shard replaced by a FIFO": (lambda path: _fifo(_shard(path)), lambda path: _shard(path).name, "unreadable"),
    "edited manifest": (_edit_manifest, lambda path: MANIFEST, "differs from the one its COMMITTED marker records"),
    "damaged marker": (lambda path: (path / COMMITTED).write_text("{not json"), lambda path: COMMITTED, "damaged"),
}


def test_intact_checkpoint_verifies(tmp_path):
    path = _sealed(tmp_path / "step_00000001", _STATE)
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert ".metadata" in files and any(n.endswith(".distcp") for n in files)
    v = verify_checkpoint(path)
    assert v.intact and v.checksummed and v.files_checked == len(files), v
    parts = [verify_checkpoint(path, part=(i, 2)) for i in range(2)]
    assert sum(p.files_checked for p in parts) == len(files)
    assert torch.equal(load_full_state(path)["w"], _STATE["w"])


@pytest.mark.parametrize("kind", sorted(_CORRUPTIONS))
def test_every_corruption_is_detected_and_named(tmp_path, kind):
    damage, name, needle = _CORRUPTIONS[kind]
    path = _sealed(tmp_path / "step_00000001", _STATE)
    damaged = name(path)
    damage(path)
    v = verify_checkpoint(path)
    assert not v.intact, kind
    assert any(str(path / damaged) in p and needle in p for p in v.problems), v.problems
    with pytest.raises(SpecError) as err:
        load_full_state(path)
    msg = str(err.value)
    assert f"{path} is damaged" in msg and damaged in msg and "\n" not in msg


def test_parts_split_the_files_and_find_the_same_damage(tmp_path):
    path = _sealed(tmp_path / "step_00000001", _STATE)
    _flip(_shard(path))
    _flip(path / ".metadata", at=3)
    parts = [verify_checkpoint(path, part=(i, 2)) for i in range(2)]
    assert sorted(p for v in parts for p in v.problems) == sorted(verify_checkpoint(path).problems)
    assert len(verify_checkpoint(path).problems) == 2


def test_manifest_naming_a_path_outside_is_refused_unread(tmp_path):
    path = _sealed(tmp_path / "step_00000001", _STATE)
    outside = tmp_path / "elsewhere"
    outside.write_bytes(b"secret")
    data = json.dumps({"format": 1, "files": {"../elsewhere": file_digest(outside)}}).encode()
    (path / MANIFEST).write_bytes(data)
    (path / COMMITTED).write_text(json.dumps({"manifest_sha256": hashlib.sha256(data).hexdigest()}))
    v = verify_checkpoint(path)
    assert v.problems == [f"{path / MANIFEST}: not a checkpoint manifest (file name '../elsewhere' is not a "
                          f"plain file name)"]


def test_checkpoint_without_manifest_loads_unverified_and_truncation_is_one_line(tmp_path):
    path = _committed(tmp_path / "step_00000001", _STATE)  # written before manifests existed
    v = verify_checkpoint(path)
    assert v.intact and not v.checksummed
    _truncate(_shard(path))
    with pytest.raises(SpecError) as err:  # was: PytorchStreamReader's raw traceback
        load_full_state(path)
    assert "cannot be read" in str(err.value) and "truncated or damaged" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("extra,needle", [
    (["--resume", "--checkpoint-dir", "{tmp}/mistyped"],
     "--checkpoint-dir {tmp}/mistyped does not exist; nothing to resume from"),
    (["--resume", "--checkpoint-dir", "{tmp}/empty"], "holds no committed checkpoint"),
    (["--checkpoint-dir", "{tmp}/afile/ck"], "--checkpoint-dir {tmp}/afile/ck: cannot write checkpoints there"),
    (["--checkpoint-dir", "{tmp}/afile"], "exists and is not a directory"),
    (["--log-file", "{tmp}/missing/log.jsonl"], "--log-file {tmp}/missing/log.jsonl: cannot open it for appending "
                                                "(FileNotFoundError"),
])
def test_launch_faults_fail_before_training(tmp_path, monkeypatch, extra, needle):
    import torch.distributed as dist

    from runtime.launch import main

    plan = tmp_path / "plan.yaml"
    make_plan("gpt-tiny").to_file(plan)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "step_00000002.tmp").mkdir()  # uncommitted: not a checkpoint
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SpecError) as err:
        main([str(plan), "--model", "gpt-tiny", *[a.replace("{tmp}", str(tmp_path)) for a in extra]])
    assert needle.replace("{tmp}", str(tmp_path)) in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not dist.is_initialized()
    assert not (tmp_path / "mistyped").exists()


def test_a_deeply_nested_commit_marker_is_damage_not_a_recursion_error(tmp_path):
    """The marker and manifest are parsed within specs.io's bounds (depth, size, values)."""
    from runtime.checkpoint import COMMITTED, verify_checkpoint

    (tmp_path / COMMITTED).write_text("[" * 100_000 + "]" * 100_000)
    v = verify_checkpoint(tmp_path)
    assert v.problems and "nested more than" in v.problems[0]
