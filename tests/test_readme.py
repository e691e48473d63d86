"""The README's Python examples run as written, and its figures exist."""

import itertools
import re
from pathlib import Path

import pytest

from mfa import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::mfa.em.ConvergenceWarning")
def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks[:2]:  # the second block reuses the first one's imports
        exec(compile(block, str(README), "exec"), namespace)
    # the third loads the run that `mfa train` writes (here a small one) into runs/
    assert cli.main(["train", "--no-figures", *[arg for o in (
        "model.n_components=3", "train.em.max_iter=2", "train.em.progress=false",
        "data.limit=300", "device=cpu") for arg in ("--set", o)]]) == 0
    exec(compile(blocks[2], str(README), "exec"), namespace)
    assert namespace["model"].n_components == 3
    assert namespace["images"].shape == (16, 1, 28, 28)
    assert namespace["log_p"].shape == (500,)
    assert namespace["filled"].shape == (500, 8)
    assert namespace["posterior"].n_features == 5
    history = namespace["trainer"].history
    # EM never lowers its objective (log-likelihood + log-prior) under a fixed prior: within
    # every stint of one noise prior (the automatic prior is chosen after the warm-up, and a
    # repeated search may move to a stronger one when early stopping's patience runs out).
    stints = [[h["train_objective"] for h in group] for _, group in itertools.groupby(
        history, key=lambda h: (h["run"], h["noise_prior_variance"]))]
    assert max(len(objective) for objective in stints) >= 2
    for objective in stints:
        assert all(b >= a - 1e-6 * abs(a) for a, b in zip(objective[:-1], objective[1:],
                                                          strict=True)), objective


def test_readme_images_exist():
    for link in re.findall(r"\]\((docs/[^)]+\.png)\)", README.read_text()):
        assert (README.parent / link).is_file(), link


def test_readme_says_the_library_and_the_configs_differ_in_adams_schedule():
    """SGDConfig's schedule is "constant", every YAML config's "cosine": the README said only
    the configs' value (a user's SGDTrainer(SGDConfig()) did not train as `mfa train`)."""
    from mfa import SGDConfig
    from mfa.config import load_config

    assert SGDConfig().schedule == "constant"
    for path in (README.parent / "configs").glob("*.yaml"):
        assert load_config(path).train.sgd.schedule == "cosine", path
    text = " ".join(README.read_text().split())
    assert ("The library's `SGDConfig` keeps a constant learning rate (`schedule=\"constant\"`) "
            "while every config in `configs/` sets `schedule: cosine`") in text


def _table_after(text: str, header: str) -> str:
    lines = text[text.index(header):].splitlines()
    end = next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))
    return "\n".join(lines[:end])


def test_the_module_tables_list_every_public_module():
    """Nine public modules had no row in the README's table (mfa.exact_components, which its
    Precision paragraph describes, among them) and docs/data.md's left out sources/pools.py
    (a docs review)."""
    package = README.parent / "mfa"
    table = _table_after(README.read_text(), "| module | what it holds |")
    for path in sorted(package.glob("*.py")):
        if not path.name.startswith("_"):
            assert f"`mfa.{path.stem}`" in table, path.name
    data_table = _table_after((README.parent / "docs" / "data.md").read_text(),
                              "| module | concept |")
    rows = {re.match(r"\| `mfa/data/([\w/.]+)`", row).group(1): row
            for row in data_table.splitlines()[2:]}
    for path in sorted((package / "data").rglob("*.py")):
        relative = path.relative_to(package / "data").as_posix()
        folder = relative.rpartition("/")[0] + "/"  # a sub-package's row names its modules
        assert relative in rows or (folder in rows and (
            path.name == "__init__.py" or f"`{path.stem}`" in rows[folder])), relative
