"""Command-line arguments shared by the experiment scripts: output folders that a ``--smoke``
run redirects, ``--set KEY=VALUE`` overrides, ``--runs KEY=RUN_DIR`` reuse."""
import argparse
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import yaml

from ltnet_keras.records import shown_path


class ExperimentParser(argparse.ArgumentParser):
    """An argument parser whose output folders (:meth:`add_output`) default to
    ``<smoke_root>/<name>/<dest>`` under ``--smoke``, so that a pipeline check never writes into
    real runs or committed results; a folder given on the command line is used as it is.
    ``root``: defaults under it are shown relative to it in the help (the repository)."""

    def __init__(self, name: str, smoke_root: Path, root: Optional[Path] = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)
        self.name = name
        self.smoke_root = Path(smoke_root)
        self.root = root
        self.output_defaults: Dict[str, Path] = {}

    def add_output(self, flag: str, default: Path, help: str):
        dest = flag.lstrip("-").replace("-", "_")
        self.output_defaults[dest] = Path(default)
        self.add_argument(flag, type=Path, default=None)
        self.describe_output(dest, help)

    def describe(self, dest: str, help: str) -> None:
        """Reword the help of the argument ``dest`` (one a shared builder made)."""
        next(action for action in self._actions if action.dest == dest).help = help

    def describe_output(self, dest: str, help: str) -> None:
        """:meth:`describe` for an output folder: its two defaults are appended."""
        normal = shown_path(self.output_defaults[dest], self.root)
        smoke = shown_path(self.smoke_root / self.name / dest, self.root)
        self.describe(dest, f"{help} (default {normal}; with --smoke {smoke})")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        smoke = getattr(parsed, "smoke", False)
        for dest, default in self.output_defaults.items():
            if getattr(parsed, dest) is None:
                setattr(parsed, dest, self.smoke_root / self.name / dest if smoke else default)
        return parsed


def parse_set(items: Sequence[str]) -> dict:
    """``["data.factor=4", "data.val_subjects=[S31,S32]"]`` -> dotted overrides (YAML values)."""
    overrides = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def overrides_from_args(args, smoke_overrides: Mapping[str, object]) -> dict:
    """``--smoke`` (``smoke_overrides``), then ``--set``, then ``--data`` and ``--steps``
    (later wins)."""
    overrides = dict(smoke_overrides) if getattr(args, "smoke", False) else {}
    overrides.update(parse_set(getattr(args, "set", [])))
    if getattr(args, "data", None):
        overrides["data.root"] = str(args.data)
    if getattr(args, "steps", None) is not None:
        overrides["train.steps"] = args.steps
    return overrides


def parse_runs(items: Optional[Sequence[str]], rows: Sequence[str],
               suffixes: Sequence[str] = ()) -> Dict[str, Path]:
    """``["ltnet=runs/table2/ltnet", "gan_cyc@recipe=DIR"]`` -> {key: finished run to reuse};
    a key is one of ``rows``, or a row with one of ``suffixes`` (e.g. ``@recipe``)."""
    valid = [row + suffix for row in rows for suffix in ("", *suffixes)]
    runs = {}
    for item in items or ():
        key, sep, path = item.partition("=")
        if not sep or key not in valid:
            raise SystemExit(f"--runs expects KEY=RUN_DIR with KEY in {valid}; got {item!r}")
        runs[key] = Path(path)
    return runs
