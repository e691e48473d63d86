"""Run folders as a resume finds them (:mod:`mfa.run_folder`): links it would write
through, and folders that are not a run's."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mfa import workflow
from mfa.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedded-mnist.yaml"
TINY = ["model.n_components=3", "model.n_factors=2", "train.em.max_iter=3",
        "train.em.kmeans_iter=3", "train.em.checkpoint_every=1", "train.em.progress=false",
        "data.limit=300", "data.dequantize=false", "output.n_samples=0",
        "output.n_inpaint=0", "output.n_factor_components=0", "output.plot=false",
        "device=cpu"]


def make_config(out_dir: Path, name: str, *overrides: str):
    return load_config(CONFIG, [*TINY, f"output.dir={out_dir}", f"output.name={name}",
                                *overrides])


def stop_at(iteration: int):
    def callback(trainer, model, record):
        if record["iteration"] == iteration:
            raise KeyboardInterrupt
    return callback


def test_a_copy_made_of_links_is_not_resumed_through_them(tmp_path):
    """`cp -rs A B; mfa train --resume B` saved B's checkpoint into A's file and appended
    B's log to A's: A held another run's checkpoint and could not be resumed. A resume now
    refuses such links, naming each with its target and the command that copies it."""
    original = tmp_path / "a"
    with pytest.raises(KeyboardInterrupt):
        workflow.train(make_config(tmp_path, "a"), figures=False, callbacks=(stop_at(1),))
    before = {p.name: p.read_bytes() for p in original.iterdir() if p.name != ".lock"}
    copy = tmp_path / "b"
    copy.mkdir()
    for path in original.iterdir():  # (as `cp -rs` makes it; its .lock link is refused by
        if path.name != ".lock":  # the lock, which says to remove it)
            (copy / path.name).symlink_to(path)
    with pytest.raises(ValueError) as refused:
        workflow.train(None, resume=copy, figures=False,
                       overrides=["train.em.max_iter=4"])
    message = str(refused.value)
    for name in ("checkpoint.pt", "train.log"):
        assert (f"{copy / name} is a symbolic link to {original / name} (cp "
                f"--remove-destination {original / name} {copy / name})") in message
    assert {p.name: p.read_bytes() for p in original.iterdir() if p.name != ".lock"} == before
    # once they are copies, the copy resumes as its own run and the original is untouched
    for name in ("checkpoint.pt", "train.log"):
        (copy / name).unlink()
        shutil.copy(original / name, copy / name)
    resumed = workflow.train(None, resume=copy, figures=False,
                             overrides=["train.em.max_iter=4"])
    assert resumed.metrics["iterations"] == 4
    assert {p.name: p.read_bytes() for p in original.iterdir() if p.name != ".lock"} == before
    assert not any(p.is_symlink() for p in (copy / "checkpoint.pt", copy / "train.log"))


def test_links_in_a_hierarchy_folder_and_the_lock_are_refused(tmp_path):
    """The stages' files are saved with save_checkpoint, which writes through a link; the
    lock is named with the others (it was refused alone, then the next link)."""
    from mfa.run_folder import check_resume_folder

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(tmp_path / "other.lock")
    with pytest.raises(ValueError, match=r"\.lock is a symbolic link to .*other\.lock \(rm "
                                         r".*: a lock file need not be copied\)"):
        check_resume_folder(tmp_path / "run")
    (tmp_path / "run" / ".lock").unlink()
    stages = tmp_path / "run" / "hierarchy"
    stages.mkdir(parents=True)
    (tmp_path / "root.pt").write_bytes(b"x")
    (stages / "root.pt").symlink_to(tmp_path / "root.pt")
    (stages / "child-00000.pt").symlink_to(tmp_path / "gone.pt")
    with pytest.raises(ValueError, match=r"child-00000\.pt is a symbolic link to .*gone\.pt "
                                         r"\(its target does not exist: rm .*root\.pt is a "
                                         r"symbolic link to .*root\.pt \(cp --remove-dest"):
        check_resume_folder(tmp_path / "run")
    os.remove(stages / "child-00000.pt")
    os.remove(stages / "root.pt")
    (tmp_path / "run" / "hierarchy").rmdir()
    (tmp_path / "run" / "hierarchy").symlink_to(stages.parent.parent, target_is_directory=True)
    with pytest.raises(ValueError, match=r"hierarchy is a symbolic link to .* \(rm .* && "
                                         r"cp -r "):
        check_resume_folder(tmp_path / "run")
