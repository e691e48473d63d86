"""Run folders as a resume finds them (:mod:`mfa.run_folder`): links it would write
through, and folders that are not a run's."""

from __future__ import annotations

import os
import re
import shlex
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


USER_CONFIG = """\
# My experiment 1: K=3 on the bundled digits.
model:
  n_components: 3   # chosen after the sweep
"""


def test_a_users_folder_of_a_config_yaml_is_not_taken_for_a_killed_run(tmp_path):
    """`mfa train --resume exp1` on a folder holding only a hand-written config.yaml was
    taken for a run killed before its first checkpoint: it trained there, with a false
    warning, and rewrote the file (its comments lost). A run leaves its .lock (taken before
    config.yaml is written) or train.log; without either the folder is refused, untouched,
    and the message names --config."""
    folder = tmp_path / "exp1"
    folder.mkdir()
    (folder / "config.yaml").write_text(USER_CONFIG)
    with pytest.raises(ValueError, match=r"exp1 holds a config\.yaml but no checkpoint\.pt and "
                                         r"no trace of an mfa run .*: it is not a run folder.*"
                                         r"`mfa train --config .*exp1/config\.yaml`"):
        workflow.train(None, resume=folder, figures=False)
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]  # (no .lock left)
    assert (folder / "config.yaml").read_text() == USER_CONFIG


def test_a_restarted_run_keeps_its_config_yaml_unless_it_changes(tmp_path, caplog):
    """A run killed before its first checkpoint (its .lock, config.yaml and train.log) starts
    over there; its config.yaml, read as it is, was rewritten all the same. Now only a
    change (--set) rewrites it, and the log names the change."""
    from mfa.config import save_config

    folder = tmp_path / "killed"
    folder.mkdir()
    (folder / ".lock").write_text("")
    save_config(make_config(tmp_path, "killed"), folder / "config.yaml")
    text = (folder / "config.yaml").read_text() + "# notes: the first try\n"
    (folder / "config.yaml").write_text(text)
    (folder / "train.log").write_text("started\n")
    with caplog.at_level("INFO", logger="mfa"):
        workflow.train(None, resume=folder, figures=False)
    assert (folder / "config.yaml").read_text() == text
    assert "with new values" not in caplog.text
    # a change: written with the run (a restart refuses what a resume refuses)
    (folder / "checkpoint.pt").unlink()
    for name in ("metrics.json", "history.json"):
        (folder / name).unlink()
    with caplog.at_level("INFO", logger="mfa"):
        run = workflow.train(None, resume=folder, figures=False,
                             overrides=["train.em.max_iter=2"])
    assert run.metrics["iterations"] == 2
    assert load_config(folder / "config.yaml").train.em.max_iter == 2
    assert "started over with new values for train.em.max_iter" in caplog.text


def _advised(text: str) -> list[str]:
    """The words a shell reads from the `mfa train --resume ...` a message advises."""
    return shlex.split(re.search(r"`(mfa train --resume [^`]*)`", text).group(1))


def test_the_advice_to_resume_a_folder_with_a_space_is_shell_quoted(tmp_path, caplog,
                                                                    capsys):
    """The Ctrl-C, FAILED, folder-exists and unfinished-run messages said `mfa train
    --resume runs/my run`: pasted, it resumed `runs/my` (and `run` was an extra word)."""
    import logging
    from types import SimpleNamespace

    from mfa.cli_run import warn_unfinished
    from mfa.config import RunConfig
    from mfa.run_folder import clean_up_failed, make_run_dir
    from mfa.run_log import detach_log, log_ending

    run_dir = tmp_path / "my run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"")  # (only its existence is read here)
    want = ["mfa", "train", "--resume", str(run_dir)]
    with pytest.raises(FileExistsError) as exists:
        make_run_dir(make_config(tmp_path, "my run"))
    assert _advised(str(exists.value)) == want
    clean_up_failed(run_dir, ValueError("boom"), created=False)
    assert _advised((run_dir / "FAILED").read_text()) == want
    handler = logging.NullHandler()
    with caplog.at_level(logging.WARNING, logger="mfa"):
        log_ending(handler, KeyboardInterrupt(), run_dir / "checkpoint.pt")
    detach_log(handler)
    assert _advised(caplog.text) == want
    ckpt = SimpleNamespace(path=str(run_dir / "checkpoint.pt"), run_config=RunConfig(),
                           metrics={})  # (no "method": an unfinished run's checkpoint)
    warn_unfinished(ckpt, str(run_dir))
    assert _advised(capsys.readouterr().err) == want
