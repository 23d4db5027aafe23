"""Saves are atomic: an adapter GGUF (`lora.save`), a PEFT directory (`lora.save_peft`) and a
merged model (`lugh.merge`) that cannot be written raise, leave a previous file untouched and
leave no temporary file behind. A full disk is simulated with RLIMIT_FSIZE (writes then fail
with EFBIG) and a read-only folder with permissions, in a child process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import lugh
from conftest import FIXTURES

LLAMA = FIXTURES / "tiny-llama"
BASE = LLAMA / "base-q4_0.gguf"
ADAPTER = LLAMA / "lora-qv.gguf"
SAVERS = ["save", "save_peft", "merge"]
NOBODY = 65534

CHILD = r"""
import json, os, resource, signal, sys
import lugh

saver, target, base, adapter, fsize, drop = sys.argv[1:7]
model = lugh.Model(base)
lora = lugh.LoRA(adapter, model)
save = {
    "save": lambda: lora.save(target),
    "save_peft": lambda: lora.save_peft(target),
    "merge": lambda: lugh.merge(model, lora, target),
}[saver]
try:
    if int(fsize):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(fsize), int(fsize)))
    if int(drop):
        os.setgid(int(drop))
        os.setuid(int(drop))
except OSError as e:
    print(json.dumps({"setup": str(e)}))
    sys.exit(0)
try:
    save()
    print(json.dumps({"error": None}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def save_in_child(saver: str, target: Path, *, fsize: int = 0, drop_to: int = 0) -> dict:
    args = [saver, str(target), str(BASE), str(ADAPTER), str(fsize), str(drop_to)]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def target_of(saver: str, folder: Path) -> Path:
    return folder / ("adapter" if saver == "save_peft" else "out.gguf")


def previous(saver: str, folder: Path) -> dict:
    """Writes a previous save into `folder`; returns every file in it with its bytes."""
    target = target_of(saver, folder)
    if saver == "save_peft":
        target.mkdir()
        (target / "adapter_model.safetensors").write_bytes(b"previous weights")
        (target / "adapter_config.json").write_bytes(b'{"previous": true}')
    else:
        target.write_bytes(b"previous model or adapter")
    return snapshot(folder)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("saver", SAVERS)
def test_a_full_disk_raises_and_keeps_the_previous_save(tmp_path, saver):
    before = previous(saver, tmp_path)
    # 4 KiB: below every file written here (the adapter is 58 KiB, the merged model 1 MiB)
    # but the PEFT config, so that a half-written save would show.
    got = save_in_child(saver, target_of(saver, tmp_path), fsize=4096)
    assert got["error"] == "OSError", got
    assert "File too large" in got["message"] and str(tmp_path) in got["message"], got
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("saver", ["save", "merge"])
def test_a_missing_folder_raises_file_not_found(tmp_path, saver):
    target = tmp_path / "missing" / "out.gguf"
    got = save_in_child(saver, target)
    assert got["error"] == "FileNotFoundError", got
    assert str(target) in got["message"] and "No such file or directory" in got["message"]
    assert list(tmp_path.iterdir()) == []


def test_save_peft_creates_missing_folders_and_removes_one_it_could_not_fill(tmp_path):
    target = tmp_path / "a" / "b"
    assert save_in_child("save_peft", target) == {"error": None}
    assert sorted(p.name for p in target.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    fresh = tmp_path / "fresh"
    assert save_in_child("save_peft", fresh, fsize=4096)["error"] == "OSError"
    assert not fresh.exists()


@pytest.mark.parametrize("saver", SAVERS)
def test_a_directory_in_the_way_raises_and_changes_nothing(tmp_path, saver):
    model = lugh.Model(BASE)
    lora = lugh.LoRA(ADAPTER, model)
    if saver == "save_peft":
        # The config cannot be written: the weights, written first, must not replace theirs.
        before = previous(saver, tmp_path)
        config = target_of(saver, tmp_path) / "adapter_config.json"
        config.unlink()
        config.mkdir()
        before = snapshot(tmp_path)
        with pytest.raises(IsADirectoryError, match="adapter_config.json: is a directory"):
            lora.save_peft(target_of(saver, tmp_path))
    else:
        target_of(saver, tmp_path).mkdir()
        (target_of(saver, tmp_path) / "inside").write_bytes(b"kept")
        before = snapshot(tmp_path)
        with pytest.raises(IsADirectoryError, match=r"out\.gguf: is a directory"):
            if saver == "save":
                lora.save(target_of(saver, tmp_path))
            else:
                lugh.merge(model, lora, target_of(saver, tmp_path))
    assert snapshot(tmp_path) == before


@pytest.fixture
def read_only_folder():
    """A folder others may enter but nobody may write to, with a previous save in it. As
    root, whom permissions do not stop, the child gives up root for `nobody` first."""
    base = Path(tempfile.mkdtemp(prefix="lugh-read-only-"))
    os.chmod(base, 0o755)
    folder = base / "folder"
    folder.mkdir()
    yield folder
    for p in [folder, *folder.rglob("*")]:
        if p.is_dir():
            os.chmod(p, 0o755)
    shutil.rmtree(base)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
@pytest.mark.parametrize("saver", SAVERS)
def test_a_read_only_folder_raises_permission_error(read_only_folder, saver):
    before = previous(saver, read_only_folder)
    for p in [read_only_folder, *read_only_folder.rglob("*")]:
        if p.is_dir():
            os.chmod(p, 0o555)
    got = save_in_child(
        saver,
        target_of(saver, read_only_folder),
        drop_to=NOBODY if os.geteuid() == 0 else 0,
    )
    if "setup" in got:
        pytest.skip(f"cannot give up root here: {got['setup']}")
    assert got["error"] == "PermissionError", got
    assert "Permission denied" in got["message"], got
    assert str(read_only_folder) in got["message"], got
    assert snapshot(read_only_folder) == before


@pytest.mark.parametrize("saver", SAVERS)
def test_a_save_replaces_the_previous_one_whole(tmp_path, saver):
    previous(saver, tmp_path)
    assert save_in_child(saver, target_of(saver, tmp_path)) == {"error": None}
    files = snapshot(tmp_path)
    assert not any(".tmp" in name for name in files), sorted(files)
    model = lugh.Model(BASE)
    if saver == "merge":
        merged = lugh.Model(target_of(saver, tmp_path))
        assert merged.n_tensors == model.n_tensors
    else:
        again = lugh.LoRA(target_of(saver, tmp_path), model)
        assert again.weight_names() == lugh.LoRA(ADAPTER, model).weight_names()
