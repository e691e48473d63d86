"""What a dataset source returns: the raw pools of images (or image files) before splitting."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Pools"]


@dataclass
class Pools:
    """Raw material of a dataset before splitting.

    ``kind`` is ``"all"`` (one pool, split train/val/test by seed), ``"train-test"`` (official
    test; val carved out of train by seed) or ``"train-val-test"`` (all official). Each pool is
    either uint8 images ``[N, C, H, W]`` (``images``) or image files (``files``); ``labels``
    holds int64 ``[N]`` per pool (``-1``: unlabelled). ``missing_advice`` is the fix a
    source advises where some of its ``files`` are missing; ``origins``: the file each pool's
    ``images`` were read from, for messages.
    """

    kind: str
    labels: dict[str, Tensor]
    images: dict[str, Tensor] | None = None
    files: dict[str, list[Path]] | None = None
    classes: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)
    missing_advice: str = ""
    origins: dict[str, str] = field(default_factory=dict)

    def check(self, name: str) -> None:
        """Refuse pools that disagree with themselves, naming ``name`` and the pool: as many
        labels as images (or files), uint8 images ``[N, C, H, W]`` of one shape in every
        pool. (Without this, fewer labels than images silently dropped images and more
        failed deep inside the split.)
        """
        shapes = {}
        for pool, labels in self.labels.items():
            if self.images is not None:
                images = self.images[pool]
                if images.dtype != torch.uint8 or images.dim() != 4:
                    raise ValueError(f"{name}: the {pool} images must be uint8 [N, C, H, W], "
                                     f"got {images.dtype} of shape {tuple(images.shape)}")
                count, what = images.shape[0], "images"
                shapes[pool] = tuple(images.shape[1:])
            else:
                count, what = len(self.files[pool]), "image files"
            if labels.shape != (count,):
                raise ValueError(f"{name}: the {pool} split has {count} {what} but "
                                 f"{labels.shape[0] if labels.dim() else 0} labels")
        if len(set(shapes.values())) > 1:
            described = ", ".join(
                f"{p} {s}" + (f" ({self.origins[p]})" if p in self.origins else "")
                for p, s in shapes.items())
            raise ValueError(f"{name}: the splits' images differ in shape (C, H, W): {described}")

    def source_names(self, pool: str, indices: Tensor) -> list[str]:
        """Where each of ``pool``'s images ``indices`` comes from: its file's path below the
        folder all the files share (``cats/img001.png``), or for images read
        from the dataset's own files ``"<pool>:<row>"`` (``"test:17"``: row 17 of the
        official test set; ``"all:17"``: of the one set a seeded split divides)."""
        if self.files is None:
            return [f"{pool}:{i}" for i in indices.tolist()]
        files = self.files[pool]
        return self._below_top(files[i] for i in indices.tolist())

    def _below_top(self, paths) -> list[str]:
        """Each of ``paths`` below the folder all the files share, ``/``-separated. (A prefix
        cut: ``os.path.relpath`` per file took 2.4 s on CelebA; the same names for the paths
        sources give, which are normalised ``Path`` objects.)"""
        top = self._top()
        prefix = os.path.join(top, "")
        names = []
        for path in paths:
            name = os.fspath(path)
            name = name[len(prefix):] if name.startswith(prefix) else os.path.relpath(name, top)
            names.append(name.replace(os.sep, "/"))
        return names

    def _top(self) -> str | None:
        """The folder all the image files share (``None`` without files), computed once."""
        if self.files is None:
            return None
        if getattr(self, "_top_folder", None) is None:
            folders = {os.path.dirname(os.fspath(f))
                       for paths in self.files.values() for f in paths}
            self._top_folder = os.path.commonpath(sorted(folders)) if folders else ""
        return self._top_folder

    def fingerprint(self) -> dict[str, list]:
        """``{pool: [images, digest]}``: what the seeded split is drawn from. ``digest`` (of
        image files, else ``None``) hashes each file's path below the folder all the files
        share, in the pool's order (the split permutes positions in it), so a run's splits
        can be told apart from those of a folder that gained, lost or renamed a file — not
        from the same files under another root."""
        out = {}
        for pool, labels in self.labels.items():
            digest = None
            if self.files is not None:
                names = "\n".join(self._below_top(self.files[pool]))
                # (surrogateescape: a name that is not UTF-8 keeps the bytes it was read from)
                digest = hashlib.sha256(names.encode(errors="surrogateescape")).hexdigest()[:16]
            out[pool] = [int(labels.shape[0]), digest]
        return out
