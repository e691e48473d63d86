"""The ``mfa`` command: ``train``, ``sample``, ``inpaint``, ``outliers``, ``evaluate``,
``select``, ``visualize``. Each subcommand parses its arguments and calls :mod:`mfa.workflow`
(``train`` and ``select``, which fit models from a config, live in :mod:`mfa.cli_fit`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
import warnings

from mfa import cli_run as run_io
from mfa.cli_fit import DEFAULT_CONFIG, cmd_select, cmd_train, config_keys
from mfa.cli_types import (
    dataset_name,
    finite,
    fraction,
    non_empty,
    non_negative_int,
    one_of_several,
    positive_int,
)
from mfa.data.names import DATASET_NAMES
from mfa.masks import MASK_KINDS
from mfa.outliers import SCORE_NAMES

__all__ = ["DEFAULT_CONFIG", "build_parser", "main"]


def cmd_sample(args) -> int:
    from mfa.checkpoint import load_checkpoint
    from mfa.workflow import sample

    ckpt = load_checkpoint(run_io.run_checkpoint(args.checkpoint))
    run_io.warn_unfinished(ckpt, args.checkpoint)
    recorded = (ckpt.metrics or {}).get("image_shape")
    if args.image_shape and recorded and tuple(args.image_shape) != tuple(recorded):
        raise SystemExit(f"error: --image-shape {' '.join(map(str, args.image_shape))} "
                         f"differs from the run's image shape {' '.join(map(str, recorded))}")
    if args.per_component and args.n is not None:
        raise SystemExit("error: -n and --per-component exclude each other: --per-component "
                         "draws --nrow samples of every component")
    shape = recorded or args.image_shape
    if shape is None:
        raise SystemExit("error: the checkpoint does not record an image shape; pass "
                         "--image-shape C H W")
    model = ckpt.model.to(run_io.device(ckpt.run_config, args))
    out = (run_io.image_out(args.out) if args.out is not None
           else run_io.default_out(args.checkpoint, "samples.png"))
    out, if_exists = run_io.output(out, args, args.out and "-o")
    run = ckpt.run_config
    out = sample(model, shape, out, n=run_io.from_run(args.n, run, "n_samples", 64),
                 nrow=run_io.from_run(args.nrow, run, "grid_nrow", 8),
                 seed=run_io.from_run(args.seed, run, "seed", 0),
                 scale=run_io.scale(run, args), per_component=args.per_component,
                 with_noise=not args.no_noise, dequantized=run_io.dequantized(run),
                 if_exists=if_exists)
    print(out)  # (the name written: another command may have taken the one chosen)
    return 0


def cmd_inpaint(args) -> int:
    from mfa.workflow import inpaint

    if args.mask_image and args.mask not in (None, "image"):  # it was silently ignored
        raise SystemExit(f"error: --mask-image is a mask of kind image, not --mask {args.mask}")
    mask = args.mask or ("image" if args.mask_image else "center")
    if args.fraction is not None and mask != "random":  # it was silently ignored
        raise SystemExit(f"error: --fraction is the hidden share of --mask random, not of "
                         f"--mask {mask}")
    ckpt, config, load = run_io.load_run(args.checkpoint, args.set)
    mask_image = args.mask_image or (config.output.mask_image if mask == "image" else None)
    if mask == "image" and not mask_image:  # (the run's output.mask_image by default)
        raise SystemExit("error: --mask image needs --mask-image PNG (black = hidden); the "
                         "run has no output.mask_image")
    model = ckpt.model.to(run_io.device(config, args))
    out = (run_io.image_out(args.out) if args.out is not None
           else run_io.default_out(args.checkpoint, f"inpaint-{mask}.png"))
    out, if_exists = run_io.output(out, args, args.out and "-o")
    data = load(config)
    if mask == "image":  # (PIL's "cannot identify image file 'dup.yaml'" named no option)
        from mfa.masks import make_mask

        try:
            make_mask("image", data.image_shape, 1, mask_image=mask_image)
        except (OSError, ValueError) as error:
            given = "--mask-image" if args.mask_image else "the run's output.mask_image"
            raise SystemExit(f"error: {given}: {error}") from None
    out = inpaint(model, data, out, mask=mask, n=run_io.from_run(args.n, config, "n_inpaint", 8),
                  n_samples=run_io.from_run(args.samples, config, "inpaint_samples", 3),
                  split=args.split, seed=run_io.from_run(args.seed, config, "seed", 0),
                  scale=run_io.scale(config, args), mask_image=mask_image,
                  fraction=0.5 if args.fraction is None else args.fraction,
                  if_exists=if_exists)
    print(out)
    return 0


def cmd_outliers(args) -> int:
    from mfa.workflow import outliers

    ckpt, config, load = run_io.load_run(args.checkpoint, args.set)
    model = ckpt.model.to(run_io.device(config, args))
    out_dir = (run_io.given_path(args.out_dir, "--out-dir") if args.out_dir is not None
               else run_io.default_out(args.checkpoint, ""))
    if out_dir.exists() and not out_dir.is_dir():  # (found after the scoring: "[Errno 17]")
        raise SystemExit(f"error: --out-dir {out_dir} is a file, not a folder")
    place, if_exists = run_io.output(out_dir / "outliers.png", args,
                                     args.out_dir and "--out-dir", companions=(".csv",))
    data = load(config)
    for path in outliers(model, data, out_dir, split=args.split,
                         n=run_io.from_run(args.n, config, "n_samples", 32),
                         nrow=run_io.from_run(args.nrow, config, "grid_nrow", 8),
                         scale=run_io.scale(config, args), seed=args.seed,
                         name=place.stem, if_exists=if_exists, **_score(args.score)):
        print(path)
    return 0


def _score(name: str | None) -> dict:
    return {} if name is None else {"score": name}  # None: the library's DEFAULT_SCORE


def cmd_evaluate(args) -> int:
    from mfa._temporaries import folder_for_output, write_text_atomically
    from mfa.workflow import evaluate

    _, config, _ = run_io.load_run(args.checkpoint, args.set)
    device = run_io.device(config, args)
    if "data.name" in run_io.data_only(args.against_set, "--against-set"):  # (it replaced
        raise SystemExit("error: --against-set data.name: the dataset is --outliers-against's "
                         "(a data.name here replaced it)")  # --outliers-against silently)
    if args.against_set and not args.outliers_against:
        raise SystemExit("error: --against-set needs --outliers-against DATASET")
    if args.outlier_scores is not None and not args.outliers_against:
        raise SystemExit("error: --outlier-scores needs --outliers-against DATASET")
    out = None
    if args.out is not None:  # settled (and its folder made) before the work, not after
        out = run_io.given_path(args.out, "-o")  # a folder: one that exists, or ending in "/"
        folder = out.is_dir() or args.out.endswith(("/", os.sep))
        out, if_exists = run_io.output(out / "evaluation.json" if folder else out, args, "-o")
    with folder_for_output(out.parent) if out else contextlib.nullcontext():
        result = evaluate(args.checkpoint, splits=tuple(args.split), ndb_bins=args.ndb_bins,
                          config=config, seed=args.seed, outliers_against=args.outliers_against,
                          device=device,
                          against_overrides=args.against_set,
                          **({} if args.outlier_scores is None
                             else {"outlier_scores": tuple(args.outlier_scores)}))
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out = write_text_atomically(out, text + "\n", if_exists=if_exists)
        print(out, file=sys.stderr)
    return 0


def cmd_visualize(args) -> int:
    from mfa.checkpoint import load_checkpoint
    from mfa.workflow import visualize

    ckpt = load_checkpoint(run_io.run_checkpoint(args.checkpoint))
    run_io.warn_unfinished(ckpt, args.checkpoint)
    recorded = (ckpt.metrics or {}).get("image_shape")
    if args.image_shape and recorded and tuple(args.image_shape) != tuple(recorded):
        raise SystemExit(f"error: --image-shape {' '.join(map(str, args.image_shape))} "
                         f"differs from the run's image shape {' '.join(map(str, recorded))}")
    shape = recorded or args.image_shape
    if shape is None:
        raise SystemExit("error: pass --image-shape C H W")
    shown = run_io.from_run(None, ckpt.run_config, "n_factor_components", 4) or 4  # (as the run's)
    comps = args.components or list(range(min(shown, ckpt.model.n_components)))
    bad = [c for c in comps if not 0 <= c < ckpt.model.n_components]
    if bad:
        raise SystemExit(f"error: components {bad} out of range [0, {ckpt.model.n_components})")
    model = ckpt.model.to(run_io.device(ckpt.run_config, args))
    out = (run_io.image_out(args.out) if args.out is not None
           else run_io.default_out(args.checkpoint, "factors.png"))
    out, if_exists = run_io.output(out, args, args.out and "-o")
    out = visualize(model, shape, out, components=comps,
                    scale=run_io.scale(ckpt.run_config, args), factor_scale=args.factor_scale,
                    dequantized=run_io.dequantized(ckpt.run_config), if_exists=if_exists)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mfa import __version__

    parser = argparse.ArgumentParser(prog="mfa", description="Mixtures of Factor Analyzers on "
                                     "images: train, sample, inpaint, rank outliers, evaluate, "
                                     "select K and L, visualize the factors.")
    parser.add_argument("--version", action="version", version=f"mfa {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and a traceback with an error")
    sub = parser.add_subparsers(dest="command", required=True)
    # -v after the command too (`mfa sample RUN -v` was refused by the top-level parser)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logging, and a traceback with an error")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[verbose], help=summary)

    def overwrite_flag(p, text="replace existing output files (else a default name moves "
                       "on to name-2, …, and a path given is refused)"):
        p.add_argument("--overwrite", action="store_true", help=text)

    def device_option(p):
        p.add_argument("--device", type=non_empty("a device: cpu, cuda, cuda:N or auto"),
                       help="where to compute: cpu, cuda, cuda:1, auto (default: "
                       "the run's own device setting, where training drew its figures)")

    run_nrow = "images per row (default: the run's output.grid_nrow, else 8)"
    checkpoint_help = "a run folder (e.g. runs/001-embedded-mnist) or a checkpoint file"
    image_shape = ("channels, height and width of the images, for a checkpoint that does not "
                   "record them (default: the run's)")

    def image_output(p, name):
        p.add_argument("-o", "--out", help=f"the image file to write (.png, .jpg, …; default: "
                       f"{name} in the run folder, or beside the checkpoint file)")

    def with_run(p, needs_data=True, seeded=True, seed=None, seeds="", split=""):
        p.add_argument("checkpoint", help=checkpoint_help)
        device_option(p)
        if seeded:  # (visualize draws nothing at random: it offered --seed and ignored it)
            p.add_argument("--seed", type=non_negative_int, default=seed,
                           help=f"seeds {seeds} (default: " + (
                               "the run's seed, as its figures)" if seed is None
                               else f"{seed})"))
        p.add_argument("--scale", type=positive_int, help="upscaling of saved images "
                       "(default: the run's output.image_scale, as its own figures, else 2)")
        overwrite_flag(p)
        if needs_data:
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override the run's config, e.g. data.root=/data")
            p.add_argument("--split", default="test", choices=("train", "val", "test"),
                           help=f"the split {split} (default: test)")

    p = command("train", "train a model from a config into a new run folder")
    p.add_argument("-c", "--config", help=f"YAML config (default: {DEFAULT_CONFIG.name})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one value, e.g. train.em.max_iter=5 (repeatable)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run; a finished "
                   "one is only evaluated and its figures drawn again, under new names (--set "
                   "and --config, whose keys are laid over the run's config, may change only "
                   "its iterations, checkpoints, progress, device, figures and data location)")
    p.add_argument("--no-figures", action="store_true", help="skip the sample, inpainting, "
                   "outlier and factor figures at the end (curve.png, the training curve, "
                   "follows output.plot); of this command only: it is not saved with the run, "
                   "so a --resume draws them unless given --no-figures again")
    p.set_defaults(func=cmd_train)

    p = command("sample", "a grid of samples as PNG")
    with_run(p, needs_data=False, seeds="the samples")
    p.add_argument("-n", type=positive_int,
                   help="samples (default: the run's output.n_samples, else 64)")
    p.add_argument("--nrow", type=positive_int, help=run_nrow)
    p.add_argument("--per-component", action="store_true",
                   help="one row of --nrow samples per component, by weight")
    p.add_argument("--no-noise", action="store_true",
                   help="draw mu_k + A_k z without the per-pixel noise (smoother images)")
    p.add_argument("--image-shape", type=positive_int, nargs=3, metavar=("C", "H", "W"),
                   help=image_shape)
    image_output(p, "samples.png")
    p.set_defaults(func=cmd_sample)

    p = command("inpaint", "original | masked | conditional mean | samples")
    with_run(p, seeds="the random masks and the conditional samples",
             split="whose images are inpainted")
    p.add_argument("--mask", choices=MASK_KINDS, help="default: center (image with --mask-image)")
    p.add_argument("--mask-image", type=non_empty("a PNG file"),
                   help="PNG mask (black = hidden); implies --mask image")
    p.add_argument("--fraction", type=fraction,
                   help="hidden share for --mask random (default 0.5)")
    p.add_argument("-n", type=positive_int,
                   help="images, at most the split's (default: the run's output.n_inpaint, "
                   "else 8)")
    p.add_argument("--samples", type=non_negative_int,
                   help="conditional samples per image (0: the conditional mean only; "
                   "default: the run's output.inpaint_samples)")
    image_output(p, "inpaint-<mask>.png")
    p.set_defaults(func=cmd_inpaint)

    p = command("outliers", "rank a split by an outlier score: grid + CSV")
    with_run(p, seed=0,  # (the run's outlier figure is drawn with seed 0)
             seeds="the training images a score's background model is fitted on",
             split="to rank")
    p.add_argument("--score", choices=SCORE_NAMES, metavar="NAME",
                   help="outlier score, higher = more outlying: %(choices)s (default: "
                   "mfa.outliers.DEFAULT_SCORE, chosen on validation pairs; neg_log_prob "
                   "ranks by raw -log p)")
    p.add_argument("-n", type=positive_int, help="most outlying images to draw, at most the "
                   "split's (default: the run's output.n_samples, else 32)")
    p.add_argument("--nrow", type=positive_int, help=run_nrow)
    p.add_argument("--out-dir", help="the folder for outliers.png and outliers.csv "
                   "(default: the run folder, or the checkpoint file's folder)")
    p.set_defaults(func=cmd_outliers)

    p = command("evaluate", "held-out log-likelihood, bits/dim, NDB")
    p.add_argument("checkpoint", help=checkpoint_help + " (before --split and "
                   "--outlier-scores, whose values take every word after them)")
    splits = ("train", "val", "test")
    p.add_argument("--split", nargs="+", default=["test"], choices=splits,
                   type=one_of_several("--split", splits),
                   help="the splits to score (default: test)")
    p.add_argument("--ndb-bins", type=non_negative_int, default=0,
                   help="NDB with this many bins (default: 0, off)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds NDB's samples and "
                   "the outlier scores' background model (default: 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's data settings, e.g. data.root=/data")
    p.add_argument("--outliers-against", metavar="DATASET", type=dataset_name,
                   help="AUROC/AUPR of every outlier score: the run's test split against "
                   f"this dataset's ({', '.join(DATASET_NAMES)}; same image shape)")
    p.add_argument("--against-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the other dataset's config (it starts from the run's, "
                   "e.g. data.root=/data/pngs)")
    p.add_argument("--outlier-scores", nargs="+", choices=SCORE_NAMES, metavar="SCORE",
                   type=one_of_several("--outlier-scores", SCORE_NAMES),
                   help="scores to evaluate with --outliers-against: %(choices)s "
                   "(default: all)")
    p.add_argument("-o", "--out", help="also write the JSON here (a file, or a folder for "
                   "evaluation.json)")
    device_option(p)
    overwrite_flag(p, "replace an existing -o file (else it is refused)")
    p.set_defaults(func=cmd_evaluate)

    p = command("select", "train one model per (K, L) and compare them: "
                       "validation bits/dim, BIC, size, time; table + plot")
    p.add_argument("-c", "--config", help=f"YAML config (default: {DEFAULT_CONFIG.name})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one value of the config (repeatable)")
    p.add_argument("--components", type=positive_int, nargs="+", required=True, metavar="K",
                   help="the K values, e.g. 10 20 50")
    p.add_argument("--factors", type=non_negative_int, nargs="+", required=True, metavar="L",
                   help="the L values, e.g. 2 6 10")
    p.add_argument("--method", choices=("em", "sgd"), help="override train.method")
    p.add_argument("--out", metavar="DIR", help="folder for selection.{csv,md,json,png} "
                   "(default: <output.dir>/select-<dataset>)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="replace an earlier sweep's selection.* files in that folder")
    again.add_argument("--resume", action="store_true",
                       help="continue the sweep saved in that folder: fit only the (K, L) its "
                       "selection.json lacks or failed, read the others back (refused if it "
                       "was made with other settings or images; saved (K, L) outside the grid "
                       "stay in the JSON); with nothing saved, fit them all")
    p.set_defaults(func=cmd_select)

    p = command("visualize", "mean, noise and factor columns per component")
    with_run(p, needs_data=False, seeded=False)
    p.add_argument("--components", type=one_of_several("--components", parse=int), nargs="+",
                   metavar="INDEX", help="components to draw (give the run folder before "
                   "--components, whose values take every word after it); default: the first "
                   "output.n_factor_components of the run, the first 4 where that is 0 or "
                   "there is no run config")
    p.add_argument("--factor-scale", type=finite, default=2.0,
                   help="c in μ ± c·A_i (default: 2)")
    p.add_argument("--image-shape", type=positive_int, nargs=3, metavar=("C", "H", "W"),
                   help=image_shape)
    image_output(p, "factors.png")
    p.set_defaults(func=cmd_visualize)
    return parser


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with warnings.catch_warnings():
            if not args.verbose:  # a library's warning as one line, as the commands' own
                warnings.showwarning = _one_line  # (not a source path and a line of code)
            return args.func(args)
    except SystemExit as exit_:  # a command's own refusal ("error: ..."): 2, as argparse's
        if not isinstance(exit_.code, str):
            raise
        print(exit_.code, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.verbose:  # (the traceback too; the exit status as without -v: it was 1)
            traceback.print_exc()
        hint = (" (a run that wrote a checkpoint keeps its last one: continue with `mfa train "
                "--resume RUN`; one stopped before its first checkpoint was removed, unless "
                "it held finished hierarchical stages: `--resume` starts it over, reusing them)"
                if args.func is cmd_train else " (any finished fits are kept in selection.json: "
                "rerun the same command with --resume to fit only the rest)"
                if args.func is cmd_select else "")
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ArithmeticError, RuntimeError, MemoryError) as err:
        # A FloatingPointError (Adam or EM diverged) or a RuntimeError from torch (e.g. out
        # of memory) is the user's to act on, like a bad value: its message, no traceback
        # (--verbose shows it, and exits as without it: it was 1).
        if args.verbose:
            traceback.print_exc()
        from mfa.folder_lock import RunFolderInUse

        plain = isinstance(err, (ValueError, TypeError, OSError, RunFolderInUse))
        kind = "" if plain else f"{type(err).__name__}: "
        message = str(err) or "out of memory"
        if args.func in (cmd_train, cmd_select):
            message = config_keys(message)
        print(f"error: {kind}{message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
