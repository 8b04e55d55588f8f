"""A study's records without its weights (``fedrun compare --records DIR``): what carries a
study from one machine to another, or lets a reader make its report again.

A study of hundreds of runs outlives the machine it started on (a cluster's scratch purged, a
laptop exchanged). The weights are large and the report does not read them; what it reads is
small: each run's metrics (every round's record, the evaluations with them), its runner record
(status, inputs, commit, times) and a few files beside them. ``save`` (called by ``compare`` as
each step ends, and for the whole plan after each batch) copies those of every *settled* step
(finished or diverged) into DIR, under the step's path inside the grid's output folder: the
run directory's top-level files (``metrics.jsonl`` gzipped, ``runner_<kind>.json``,
``config.yaml``, ``partition.json``, ``stopped.json``, ...), the step's own outputs that are
files (an audit's ``audit/audit.json``) and ``final/privacy.json``; never the model
(``final/``), checkpoints, samples or client state. A step kept already with the same runner
record is left as it is, so DIR changes only where a run did.

``restore`` is the way back: a step that is not settled here and whose kept record has the
step's inputs now (config, overrides, params) gets its files back, and ``restored.json`` says
what was not kept. The runner counts such a step finished (``RunSpec.has_outputs``), so the
study goes on with the runs still to do, and ``--collect`` reports from the kept records alone.
A restored run has no weights: ``fedrun sample`` or ``evaluate`` of it needs the run trained
again. A kept record of other inputs (the grid changed since) is not restored: that run trains.

Writes go through a temporary folder renamed into place; a kept file that does not read back
(truncated gzip, bad JSON) is an error naming it.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from fedrun.errors import FedrunError
from fedrun.experiments.steps import DIVERGED, RAN, RESTORED_FILE, RunSpec

#: files kept from below the run directory's top level, besides the step's own outputs
EXTRA_FILES = ("final/privacy.json",)
#: a top-level file above this size is not kept (weights and sample arrays, not records)
MAX_FILE_BYTES = 4 << 20
SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt", ".npz", ".npy", ".png", ".tmp")
GZIPPED = ".jsonl"  # kept as <name>.jsonl.gz


def relative(spec: RunSpec, output_dir: Path) -> Optional[Path]:
    """The step's run directory inside the grid's output folder (None: outside it)."""
    try:
        return Path(os.path.abspath(spec.run_dir)).relative_to(os.path.abspath(output_dir))
    except ValueError:
        return None


def kept_files(spec: RunSpec) -> List[Path]:
    """The files of the step's run directory that ``save`` keeps (paths inside it)."""
    run_dir = spec.run_dir
    files = [Path(p.name) for p in sorted(run_dir.iterdir())
             if p.is_file() and not p.name.endswith(SKIPPED_SUFFIXES) and p.name != RESTORED_FILE
             and p.stat().st_size <= MAX_FILE_BYTES]
    extra = [Path(o) for o in spec.outputs] + [Path(e) for e in EXTRA_FILES]
    files += [p for p in extra if len(p.parts) > 1 and (run_dir / p).is_file()]
    return files


def _stored_name(path: Path) -> Path:
    return path.with_name(path.name + ".gz") if path.name.endswith(GZIPPED) else path


def save(specs: List[RunSpec], output_dir: Path, records: Path) -> Tuple[int, int]:
    """Keep the records of every settled step of ``specs`` in ``records``. Returns (steps kept
    there now, of them written by this call)."""
    kept = written = 0
    for spec in specs:
        rel = relative(spec, output_dir)
        if rel is None or not spec.settled or not spec.record_path.is_file():
            continue
        entry = records / rel
        kept += 1
        stored = entry / spec.record_path.name
        if stored.is_file() and stored.read_bytes() == spec.record_path.read_bytes():
            continue  # kept already, the same run
        _write_entry(spec, entry)
        written += 1
    return kept, written


def _write_entry(spec: RunSpec, entry: Path) -> None:
    """The step's kept files into ``entry`` (replaced whole: a temporary folder renamed)."""
    tmp = entry.with_name(f".{entry.name}.saving")
    shutil.rmtree(tmp, ignore_errors=True)
    for path in kept_files(spec):
        target = tmp / _stored_name(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = (spec.run_dir / path).read_bytes()
        if target.name.endswith(".gz"):  # mtime 0: the same file gives the same bytes
            data = gzip.compress(data, compresslevel=9, mtime=0)
        target.write_bytes(data)
    entry.parent.mkdir(parents=True, exist_ok=True)
    if entry.exists():
        old = entry.with_name(f".{entry.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(entry, old)
        os.replace(tmp, entry)
        shutil.rmtree(old)
    else:
        os.replace(tmp, entry)


def read_kept(entry: Path) -> Dict[Path, bytes]:
    """A kept step's files as they go back into a run directory (gunzipped), checked: a
    runner record and any JSON must parse, a gzip must read to its end."""
    files = {}
    for path in sorted(p for p in entry.rglob("*") if p.is_file()):
        rel = path.relative_to(entry)
        try:
            data = path.read_bytes()
            if path.name.endswith(".gz"):
                data, rel = gzip.decompress(data), rel.with_name(rel.name[:-3])
            if rel.suffix == ".json":
                json.loads(data)
            elif rel.suffix == ".jsonl":
                [json.loads(line) for line in data.splitlines() if line.strip()]
        except (OSError, EOFError, ValueError, gzip.BadGzipFile) as exc:
            raise FedrunError(f"kept record '{path}' does not read back ({type(exc).__name__}: "
                              f"{exc}); take it from the study's repository again or delete "
                              f"'{entry}' to train that run again") from None
        files[rel] = data
    return files


def restore(specs: List[RunSpec], output_dir: Path, records: Path,
            say: Callable[[str], None] = print) -> List[RunSpec]:
    """Give back the kept files of every step of ``specs`` that is not settled and whose kept
    record has its inputs now. Returns the steps restored."""
    restored = []
    stale = 0
    for spec in specs:
        rel = relative(spec, output_dir)
        if rel is None or spec.settled:
            continue
        entry = records / rel
        stored = entry / spec.record_path.name
        if not stored.is_file():
            continue
        files = read_kept(entry)
        record = json.loads(files[Path(spec.record_path.name)])
        inputs = spec.inputs()
        if record.get("status") not in (RAN, DIVERGED) or \
                {key: record.get(key) for key in inputs} != inputs:
            stale += 1
            continue
        _restore_entry(spec, entry, files)
        if not spec.settled:  # what was kept does not make a settled run
            raise FedrunError(f"kept record '{entry}' restored to '{spec.run_dir}' is not a "
                              f"{record['status']} run (outputs {list(spec.outputs)}): delete "
                              f"'{entry}' to train that run again")
        restored.append(spec)
    if restored or stale:
        say(f"records: {len(restored)} runs restored from {records}"
            + (f"; {stale} kept with other inputs than the grid's now (they train)" if stale else ""))
    return restored


def ignored_by_git(specs: List[RunSpec], output_dir: Path, records: Path) -> List[Path]:
    """The folders of ``records`` the steps of ``specs`` are kept in (its top-level ones:
    ``runs``, ``tuning``, ...) that git ignores where ``records`` sits in a work tree: their
    records would be left out of ``git add`` without a word. Empty outside a work tree or
    without git."""
    import subprocess

    rels = (relative(spec, output_dir) for spec in specs)
    tops = sorted({rel.parts[0] for rel in rels if rel and rel.parts})
    if not tops:
        return []
    cwd = next((p for p in [records, *records.parents] if p.is_dir()), None)
    if cwd is None:
        return []
    paths = [os.path.abspath(records / top / "record") for top in tops]
    try:  # exit 0: some are ignored (listed), 1: none, 128: not a work tree
        done = subprocess.run(["git", "check-ignore", "--no-index", "--", *paths], cwd=cwd,
                              capture_output=True, text=True)
    except OSError:
        return []
    listed = set(done.stdout.split("\n")) if done.returncode == 0 else set()
    return [records / top for top, path in zip(tops, paths) if path in listed]


def _restore_entry(spec: RunSpec, entry: Path, files: Dict[Path, bytes]) -> None:
    """The kept ``files`` (``read_kept`` of ``entry``) into the run directory (an unfinished one
    there is replaced: the runner would start it afresh anyway), with ``restored.json`` naming
    what was not kept."""
    run_dir = spec.run_dir
    tmp = run_dir.with_name(f".{run_dir.name}.restoring")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    missing = [o for o in spec.outputs if not (tmp / o).exists()]
    (tmp / RESTORED_FILE).write_text(json.dumps(
        {"from": str(entry), "not_kept": missing,
         "note": "records restored without weights (fedrun compare --records): train the run "
                 "again for its model"}, indent=1) + "\n")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    os.replace(tmp, run_dir)
