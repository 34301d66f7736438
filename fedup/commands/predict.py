"""``fedup-peer predict OUT_DIR --data NEW.csv [--out scores.csv]``: use a run's model.

Scores the rows of a CSV file with the model a finished run saved in OUT_DIR
(:func:`fedup.learn.predict.predict`: the model's SHA-256 is checked against
``summary.json`` first, the rows are encoded as training encoded them).  The scores
(a CSV: the id column or ``row``, then ``probability``) go to ``--out`` or to
stdout; what did not fit the federation's schema (missing values, unknown
categories, an absent column, the target column) is one warning line each on
stderr.  Any error is one line on stderr, exit code 1 (2 for a command line that
does not parse).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedup.errors import ConfigError
from fedup.files import write_atomic


def add_parser(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
) -> argparse.ArgumentParser:
    """Register the ``predict`` command."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "predict",
        help="score new rows with the model a finished run saved",
        description="Apply the model a finished run saved in OUT_DIR to the rows of a CSV "
        "file, encoded as training encoded them (the federation's schema in "
        "federation.json), and write the probability of the positive class for each row, "
        "in the file's order. The model's SHA-256 must be the one summary.json records. "
        "Missing values and categories the schema does not list are scored as training "
        "scored them and reported on stderr; a column the model needs and never saw "
        "missing is refused.",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a finished run's output folder")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="FILE.csv",
        help="the rows to score: a CSV file with a header row (the target column may be "
        "there; it is ignored)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE.csv",
        help="where to write the scores (default: stdout)",
    )
    p.add_argument(
        "--id",
        default=None,
        metavar="COLUMN",
        help="the column that identifies rows, copied into the scores (default: a column "
        "called id or ending in _id, else the row number from 1)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fedup.learn.predict import load_model, predict

    out: Path | None = args.out
    if out is not None:
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; give the name of a file to write")
        if not out.parent.is_dir():
            raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    saved = load_model(args.out_dir)
    if not saved.run_ok:
        _warn(
            f"the run did not end by its stopping rule ({saved.stop_reason or 'unknown'}); "
            "its model may be poorly trained"
        )
    result = predict(saved, args.data, id_column=args.id)
    for line in result.report.warnings():
        _warn(line)
    text = result.to_csv()
    if out is None:
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
    else:
        write_atomic(out, text)
        n = len(result.ids)
        print(
            f"fedup-peer predict: wrote {n} score{'s' * (n != 1)} of {result.target!r} to "
            f"{out} (model SHA-256 {result.model_sha256[:16]}...)",
            file=sys.stderr,
        )
    return 0


def _warn(line: str) -> None:
    print(f"fedup-peer predict: warning: {line}", file=sys.stderr)
