"""The ``mfa`` commands that fit models from a config: ``train`` (a run folder, or a resumed
one) and ``select`` (a (K, L) sweep), with what both tell a user about its config: the
``--set`` keys of a trainer the method does not read, and the trainers' messages with the
config's key names. :mod:`mfa.cli` parses their arguments."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

from mfa import cli_run as run_io

__all__ = ["DEFAULT_CONFIG", "cmd_select", "cmd_train", "config_keys"]

# configs/embedded-mnist.yaml, shipped in the package (a link in the source tree) so that an
# installed mfa runs the same default as a checkout.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "assets" / "embedded-mnist.yaml"


def cmd_train(args) -> int:
    from mfa import distributed
    from mfa.config import load_config

    for text, option in ((args.resume, "--resume"), (args.config, "--config")):
        if text is not None:  # ("" was taken for none: --resume "$UNSET" trained a new run)
            run_io.given_path(text, option)
    if args.resume is not None:  # (`--resume runs` said "runs/checkpoint.pt does not exist")
        run_io.run_checkpoint(args.resume, resume=True)
    # A new run's config, read before the process group (whose backend follows its device).
    overrides = list(args.set or [])
    config = (load_config(args.config or DEFAULT_CONFIG, overrides=overrides)
              if args.config or not args.resume else None)  # (a file's errors name it)
    if args.resume and args.config:
        # Its keys are laid over the run's config, as --set values: the keys it leaves out
        # keep the run's values (they took the defaults, and the resume refused them).
        from mfa.config import RunConfig, config_to_dict
        from mfa.config_text import drop_empty_sections, mapping_overrides, read_yaml_mapping

        given = drop_empty_sections(read_yaml_mapping(Path(args.config)),
                                    config_to_dict(RunConfig()))  # (an empty one: no keys)
        overrides = [*mapping_overrides(given), *overrides]
        config = None
    if not args.resume:  # (a resume refuses them in the run folder)
        from mfa.config_text import override_keys

        _warn_unused_trainer_keys([k for o in args.set or [] for k in override_keys(o)],
                                  config.train.method, "run")
    # Under torchrun: join the process group (NCCL on CUDA, gloo on CPU, with a timeout);
    # rank 0 alone writes the run folder and prints the results.
    launched = distributed.init_from_env(device=_run_device(args, config, overrides))
    main = distributed.is_main_process()
    if not main:
        logging.getLogger("mfa").setLevel(logging.WARNING)
    try:
        return _train(args, config, overrides, main)
    except distributed.DistributedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if launched:
            distributed.shutdown()


def _warn_unused_trainer_keys(keys: list[str], method: str, what: str) -> None:
    """Say which ``--set`` keys (dotted) belong to a trainer section that ``method`` does
    not read (they were accepted and ignored without a word; a resume refuses them)."""
    from mfa.resume_rules import trainer_sections, unused_trainer_keys

    unused = unused_trainer_keys(method, keys)
    if unused:
        print(f"warning: --set {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not "
              f"used: this {what} trains with train.method={method}, which reads "
              f"{trainer_sections(method)} only", file=sys.stderr)


def _run_device(args, config, overrides: list[str]) -> str | None:
    """The ``device`` of the run ``mfa train`` starts or resumes, read before the process
    group (its backend follows it): a resumed run's from its ``config.yaml`` with the
    ``overrides``, its ``--config`` and ``--set`` (a CPU run resumed took NCCL and
    ``cuda:LOCAL_RANK``, which failed with more processes than GPUs); ``None`` when unknown
    (the resume reports what is wrong)."""
    if config is not None:
        return config.device
    from mfa.config import load_config
    from mfa.run_folder import resume_checkpoint

    try:
        folder = resume_checkpoint(args.resume).parent
        return load_config(folder / "config.yaml", overrides=overrides).device
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _train(args, config, overrides: list[str], main: bool) -> int:
    from mfa.workflow import train

    if args.resume:
        # The --config's keys and the --set values, laid over the saved config; only changes
        # safe on resume are accepted.
        result = train(None, resume=args.resume, overrides=overrides,
                       figures=not args.no_figures)
    else:
        result = train(config, figures=not args.no_figures)
    if main:
        print(f"run folder: {result.run_dir}")
        print(json.dumps(result.metrics, indent=2))
    return 0


def cmd_select(args) -> int:
    from mfa.config import load_config
    from mfa.config_text import override_keys
    from mfa.run_select import select_run

    config_path = DEFAULT_CONFIG if args.config is None else run_io.given_path(args.config,
                                                                               "--config")
    try:  # (a mapping, --set model={n_components: 4}, sets the keys inside it)
        keys = [key for o in args.set or [] for key in override_keys(o)]
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    ignored = [k for k in keys if k in ("model.n_components", "model.n_factors",
                                        "train.em.checkpoint_every", "train.sgd.checkpoint_every")
               or (k.startswith("output.") and k != "output.dir")]
    if ignored:  # (accepted and ignored before)
        raise SystemExit(f"error: mfa select does not use --set {', '.join(ignored)}: the grid "
                         "is --components/--factors, and it writes selection.* only (--out; "
                         "no checkpoints)")
    config = load_config(config_path, overrides=args.set or [])
    _warn_unused_trainer_keys(keys, args.method or config.train.method, "sweep")
    out = None if args.out is None else run_io.given_path(args.out, "--out")  # ("": not ".")
    sweep, paths = select_run(config, args.components, args.factors, out,
                              method=args.method, overwrite=args.overwrite,
                              resume=args.resume)
    print(sweep.table())
    best, by_bic = sweep.best_by_val, sweep.best_by_bic
    if best is None:  # (every fit failed: their rows are saved, for --resume)
        print("best by validation: none (no fit gave a finite validation score)")
    else:
        score = (f"{best['val_bits_per_dim']:.4f} bits/dim" if sweep.has_bits_per_dim
                 else f"log-likelihood {best['val_log_likelihood']:.2f}")
        print(f"best by validation: K={best['K']}, L={best['L']} ({score})")
    print("best by BIC: " + ("none (no finite BIC)" if by_bic is None else
                             f"K={by_bic['K']}, L={by_bic['L']} (BIC {by_bic['bic']:.1f})"))
    for path in paths:
        print(path)
    if sweep.failed:  # (their rows are in the table: the other fits are kept)
        print(f"error: {len(sweep.failed)} of {len(sweep.rows)} fits failed: " + "; ".join(
            f"K={r['K']}, L={r['L']}: {r['error']}" for r in sweep.failed), file=sys.stderr)
        return 1
    if best is None:
        print("error: no fit gave a finite validation score", file=sys.stderr)
        return 1
    return 0


def config_keys(message: str) -> str:
    """A trainer's message names its settings as the library's fields (``SGDConfig.lr``);
    a config's reader writes ``train.sgd.lr``: both are named (the config layer's own
    messages already name the key)."""
    return re.sub(r"\b(EM|SGD)Config\.(\w+)",
                  lambda m: f"train.{m[1].lower()}.{m[2]} ({m[0]})", message)
