"""A comparison grid (configs/grids/*.yaml) as typed dataclasses, and its plan of runs.

The grid file names a base config, the seeds, the budget in samples, the evaluation points, the
runs (each a list of overrides; ``kind: central`` for the baseline), the series to plot and the
claims to check. Instead of (or besides) listing runs, a ``matrix`` names axes of overrides
(e.g. partitions x methods, configs/grids/noniid.yaml) whose every combination is a run named
``<value>-<value>``; ``series`` entries may then select runs by axis value, split a figure into
one panel per value of an axis, or draw the class mix of the samples (``kind: class_mix``), and
``tables`` write one table per value of an axis with each row's difference to a baseline row.
A ``quick`` section replaces keys (its ``overrides`` are appended) for a tiny variant.

``budgets`` adds earlier sample counts at which the report compares the runs too (each an
evaluation point of the runs, which train to ``samples``). A ``tuning`` section declares the
tuning protocol (``fedrun.experiments.tuning``): per method (a value of a matrix axis, or an
explicit run), its tuning axes, every method with the same number of points; seeds disjoint from
the reporting seeds; the setting chosen by ``metric`` at each budget. ``untrained`` (and the older
``untrained_fid``) give the untrained model's scores, the anchor every table and FID plot shows.

``plan`` derives, for every run,

    rounds     = samples / (K x E x B)          (federated; central: central.samples = samples)
    eval.every = eval_every_samples / (K x E x B)
                 (without eval_every_samples: eval.at = each budget / (K x E x B))
    ema.decay  = H / (H + K x E x B)             (H = ema_horizon_samples)

so that all runs see the same number of samples, are evaluated at the same points, and average
their EMA over the same number of samples: with that decay the EMA's weights have a mean age of
H samples in the steady state; after the warm-up (H / (K x E x B) rounds, ``fedrun.engine.ema.EMA``)
the mean age approaches H geometrically from below.
"""

from __future__ import annotations

import itertools
import math
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from fedrun.errors import ConfigError
from fedrun.experiments.steps import RunSpec

FINDING_RUNS = {"close": 2, "better": 2, "increasing": None, "decreasing": None}  # None: any number
# What a tuning may select on (a metric of the final evaluation) and whether lower is better.
TUNING_METRICS = {"fid": True, "kid": True, "class_tv": True, "confident_fraction": False,
                  "class_coverage": False}
ANCHOR_METRICS = ("fid", "kid", "confident_fraction", "class_coverage", "class_tv", "tstr_accuracy",
                  "in_classes")
KEY_NAMES = {"with": "with_"}  # YAML keys that are Python keywords


@dataclass
class AxisValue:
    name: str
    overrides: List[str] = field(default_factory=list)
    title: Optional[str] = None
    baseline: Optional[str] = None
    """The value of the same axis its table rows are compared with instead of the table's
    baseline (e.g. scaffold, trained with SGD, against FedAvg with SGD)."""

    @property
    def label(self) -> str:
        return self.title or self.name


@dataclass
class Axis:
    axis: str
    values: List[AxisValue]


@dataclass
class GridRun:
    name: str
    kind: str = "train"  # or 'central'
    overrides: List[str] = field(default_factory=list)
    axes: Dict[str, str] = field(default_factory=dict)  # matrix runs: axis -> value name


@dataclass
class SetupRun:
    """A run made once before the grid's runs (e.g. a public pre-training that runs start from,
    ``model.pretrained={output_dir}/setup/public/final``): trained in
    ``<output_dir>/setup/<name>`` with the grid's base config and overrides, then its own (no
    derived budget: its overrides give rounds or central.samples), one seed for every run."""

    name: str
    kind: str = "central"  # or 'train'
    overrides: List[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class Series:
    """A figure: FID vs samples seen (``kind: fid``) or the class mix of the final samples."""

    name: str
    file: Optional[str] = None
    kind: str = "fid"
    runs: List[str] = field(default_factory=list)
    select: Dict[str, Union[str, List[str]]] = field(default_factory=dict)
    panels: Optional[str] = None  # fid: one panel per value of this axis
    lines: Optional[str] = None
    """``kind: privacy``: one line per value of this axis through its runs' epsilons (the
    privacy-utility-leakage figure: FID, TSTR accuracy and MIA AUC against epsilon); ``runs``
    are drawn as single points."""


@dataclass
class Finding:
    claim: str
    kind: str  # one of FINDING_RUNS
    runs: List[str]


@dataclass
class Table:
    """One report table per value of the axis ``by``; ``with_`` (YAML ``with``): reference rows."""

    by: str
    name: Optional[str] = None
    baseline: Dict[str, str] = field(default_factory=dict)
    with_: List[str] = field(default_factory=list)


@dataclass
class TuningAxis:
    """One tuning axis of a method: the config ``key`` its points set, and the ``values``."""

    key: str
    values: List[Any]
    extend: Optional[List[Any]] = None
    """[below, above]: the values tried when the optimum sits on the low / high edge (null: that
    side is only flagged). Without it, an axis of positive numbers extends geometrically (the
    ratio of the two values at that end); other axes are only flagged."""


@dataclass
class Tuning:
    """The tuning protocol (``fedrun.experiments.tuning``)."""

    methods: Dict[str, List[TuningAxis]]
    """Per method (a value of ``axis``, or the name of an explicit run): its tuning axes; every
    method the same number of points (the product of its axes' lengths). A sweep tuned
    ``separately`` (``<method>-<value>``) may have axes of its own here (else its method's)."""
    seeds: List[int]
    """Seeds of the tuning runs, disjoint from the reporting ``seeds``."""
    axis: Optional[str] = None
    """The matrix axis whose values are the methods (every value tuned)."""
    at: Dict[str, str] = field(default_factory=dict)
    """The value of each other matrix axis the tuning runs train at (e.g. one partition)."""
    per: List[str] = field(default_factory=list)
    """Other matrix axes tuned separately for each of their values (each its own choice)."""
    separately: Dict[str, List[str]] = field(default_factory=dict)
    """Values of an ``at`` axis tuned apart from it: each its own group, trained at that value
    and serving the runs with it (e.g. the no-DP runs of a DP study, whose best step differs);
    the ``at`` value's group serves the others."""
    metric: str = "fid"
    """What the choice minimises (maximises for confident_fraction, class_coverage): the mean
    over the tuning seeds at each budget."""
    extend_edges: bool = False
    """An optimum on the edge of an axis: false = flag it; true = also try one point beyond it
    (once) and choose again."""


@dataclass
class Grid:
    seeds: List[int]
    samples: int
    eval_every_samples: Optional[int] = None
    """Evaluate every this many samples (the points of the curves); null = only at the budgets
    and the end (the cheapest schedule a comparison at the budgets needs: on the non-IID grid
    one evaluation of 1,000 samples costs about as much as 4-8 rounds of training)."""
    base_config: Optional[str] = None
    output_dir: str = "runs/compare"
    ema_horizon_samples: int = 5120
    overrides: List[str] = field(default_factory=list)
    runs: List[GridRun] = field(default_factory=list)
    matrix: List[Axis] = field(default_factory=list)
    series: List[Series] = field(default_factory=list)
    findings: List[Finding] = field(default_factory=list)
    tables: List[Table] = field(default_factory=list)
    bytes_plot: bool = True
    """Draw bytes communicated vs FID (uninformative when every federated run sends the same)."""
    audit: Optional[Dict[str, Any]] = None
    """Audit every reporting run after it trains (``fedrun audit``: membership inference of its
    training images against the held-out ones, nearest-neighbour memorisation) with these
    options (``fedrun.eval.audit.AuditOptions``: num_samples, noise_draws, max_members, ...);
    the report adds a leakage table (and epsilon from final/privacy.json). null = no audit."""
    untrained_fid: Optional[float] = None
    """FID of an untrained model of the runs' architecture, sampler and sample count
    (``python -m scripts.untrained_anchor``): drawn and printed beside the results, a score near
    it is not informative."""
    untrained: Dict[str, Union[float, int]] = field(default_factory=dict)
    """The untrained model's scores (``python -m scripts.untrained_anchor`` prints them): fid,
    kid, confident_fraction, class_coverage, class_tv; ``untrained_fid`` fills ``fid``."""
    anchors: Dict[str, Dict[str, Union[float, int]]] = field(default_factory=dict)
    """More reference rows beside the untrained model's: name -> scores (the keys of
    ``untrained``), e.g. the public model before private fine-tuning
    (``python -m scripts.untrained_anchor ... model.pretrained=...``)."""
    budgets: List[int] = field(default_factory=list)
    """Earlier sample counts (evaluation points) the report compares at too; ``samples`` always."""
    tuning: Optional[Tuning] = None
    setup: List[SetupRun] = field(default_factory=list)
    """Runs made once, before the tuning and the grid's runs (``SetupRun``); a failed one stops
    the grid. Any override may name ``{output_dir}``: the grid's output folder."""
    source: str = ""

    @property
    def budget_list(self) -> List[int]:
        """The budgets the report compares at, ascending; the last is ``samples``."""
        return sorted(set(self.budgets) | {self.samples})

    def resolve(self, overrides: List[str]) -> List[str]:
        """``overrides`` with ``{output_dir}`` replaced by the grid's output folder."""
        return [o.replace("{output_dir}", str(self.output_dir)) for o in overrides]

    def run(self, name: str) -> GridRun:
        return next(r for r in self.runs if r.name == name)

    def axis(self, name: str) -> Axis:
        return next(a for a in self.matrix if a.axis == name)

    def select(self, select: dict) -> List[str]:
        """Names of the matrix runs whose axis values match ``select`` (axis -> value or values)."""
        def matches(run: GridRun) -> bool:
            return bool(run.axes) and all(run.axes.get(axis) in _as_list(wanted)
                                          for axis, wanted in select.items())
        return [r.name for r in self.runs if matches(r)]

    def sweep_name(self, values: Dict[str, str]) -> str:
        """A tuning sweep's name: its axis values (method, ``per`` and ``separately`` axes) in
        matrix order."""
        return "-".join(values[a.axis] for a in self.matrix if a.axis in values)

    def series_runs(self, item: Series) -> List[str]:
        """A series' runs: those it names, then the matrix runs its ``select`` (or ``panels``) picks."""
        picked = self.select(item.select) if item.select or item.panels or item.lines else []
        return list(item.runs) + [n for n in picked if n not in item.runs]

    def label(self, name: str, drop_axis: Optional[str] = None) -> str:
        """A run's name in a table or legend: its values on the axes other than ``drop_axis``."""
        axes = {k: v for k, v in self.run(name).axes.items() if k != drop_axis}
        return "-".join(axes.values()) if axes else name


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


# ---------------------------------------------------------------- loading

def load_grid(path: str, quick: bool = False, extra_overrides: Optional[List[str]] = None) -> Grid:
    """The grid of a YAML file (its ``quick`` variant with ``quick``), checked: errors name the
    file and the key."""
    raw = _read_yaml(path)
    quick_section = _convert(Dict[str, Any], raw.pop("quick", None) or {}, "quick", path)
    overrides = _convert(List[str], raw.get("overrides") or [], "overrides", path)
    if quick:
        raw.update({k: v for k, v in quick_section.items() if k != "overrides"})
        overrides += _convert(List[str], quick_section.get("overrides") or [], "quick.overrides", path)
        raw["output_dir"] = str(raw.get("output_dir", "runs/compare")) + "_quick"
    raw["overrides"] = overrides + list(extra_overrides or [])
    if "runs" not in raw and "matrix" not in raw:
        raise ConfigError(f"grid file '{path}': missing key 'runs' (or 'matrix')")
    grid = _convert(Grid, raw, "", path)
    grid.source = str(path)
    if grid.untrained_fid is not None:
        if grid.untrained.setdefault("fid", grid.untrained_fid) != grid.untrained_fid:
            raise ConfigError(f"grid file '{path}': keys 'untrained_fid' and 'untrained.fid' differ")
    grid.runs += expand_matrix(grid.matrix, path)
    check_grid(grid, path)
    return grid


def _read_yaml(path: str) -> dict:
    import yaml

    if not Path(path).is_file():
        raise ConfigError(f"grid file '{path}' does not exist")
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"grid file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"grid file '{path}' must hold a mapping of keys, got {type(raw).__name__}")
    return raw


def _convert(kind, value, where: str, path: str):
    """``value`` (from YAML) as the type ``kind``: dataclasses, lists, dicts, optionals, scalars."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if is_dataclass(kind):
        return _dataclass(kind, value, where, path)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error names the key at fault
            return _convert(options[0], value, where, path)
        for option in options:
            try:
                return _convert(option, value, where, path)
            except ConfigError:
                pass
    elif origin is list and isinstance(value, list):
        return [_convert(args[0], v, f"{where}[{i}]", path) for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return {str(k): _convert(args[1], v, f"{where}.{k}", path) for k, v in value.items()}
    elif kind is Any or (isinstance(kind, type) and isinstance(value, kind)
                         and not (kind is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"grid file '{path}': key '{where}' must be {_type_name(kind)}, got {value!r}")


def _dataclass(kind, value, where: str, path: str):
    if not isinstance(value, dict):
        raise ConfigError(f"grid file '{path}': key '{where}' must be a mapping, got {value!r}")
    hints = typing.get_type_hints(kind)
    known = {f.name: f for f in fields(kind) if f.name != "source"}
    given = {KEY_NAMES.get(str(k), str(k)): v for k, v in value.items()}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"grid file '{path}': unknown keys {[prefix + k for k in unknown]} "
                          f"(known: {sorted(k.rstrip('_') for k in known)})")
    for name, spec in known.items():
        if name not in given and spec.default is MISSING and spec.default_factory is MISSING:
            raise ConfigError(f"grid file '{path}': missing key '{prefix}{name.rstrip('_')}'")
    return kind(**{k: _convert(hints[k], v, prefix + k.rstrip("_"), path) for k, v in given.items()})


def _type_name(kind) -> str:
    if typing.get_origin(kind) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(kind))
    if typing.get_origin(kind) is not None or not hasattr(kind, "__name__"):
        return str(kind).replace("typing.", "")  # List[int]
    return kind.__name__


def expand_matrix(axes: List[Axis], path: str = "grid") -> List[GridRun]:
    """Every combination of the axes' values as a run: name ``a-b``, overrides in axis order."""
    for i, axis in enumerate(axes):
        values = [v.name for v in axis.values]
        if not values or len(set(values)) != len(values):
            raise ConfigError(f"grid file '{path}': key 'matrix[{i}].values' needs values with unique "
                              f"names, got {values}")
        wrong = [v.baseline for v in axis.values if v.baseline not in (None, *values)]
        if wrong:
            raise ConfigError(f"grid file '{path}': matrix axis '{axis.axis}': baseline {wrong} "
                              f"is not one of its values {values}")
    names = [a.axis for a in axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid file '{path}': matrix axes must have unique names, got {names}")
    return [GridRun(name="-".join(v.name for v in combination),
                    overrides=[o for v in combination for o in v.overrides],
                    axes={a.axis: v.name for a, v in zip(axes, combination)})
            for combination in itertools.product(*(a.values for a in axes))] if axes else []


# ---------------------------------------------------------------- checking

def check_grid(grid: Grid, path: str) -> None:
    """Cross-references: unique run names, known runs and axes, well-formed findings/series/tables."""
    if grid.audit is not None:
        from fedrun.experiments.leakage import check_options

        check_options(grid.audit, path)
    names = [r.name for r in grid.runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"grid file '{path}': every run needs a unique 'name', repeated: {duplicates}")
    reserved = [n for n in names if "@" in n or "/" in n]
    if reserved:  # '@' names a tuned run's point, '/' a folder
        raise ConfigError(f"grid file '{path}': run names cannot hold '@' or '/': {reserved}")
    for i, run in enumerate(grid.runs):
        if run.kind not in ("train", "central"):
            raise ConfigError(f"grid file '{path}': key 'runs[{i}].kind' must be 'train' or 'central', "
                              f"got '{run.kind}'")
    for group in ("series", "findings", "tables"):
        for i, item in enumerate(getattr(grid, group)):
            missing = [n for n in (item.with_ if group == "tables" else item.runs) if n not in names]
            if missing:
                raise ConfigError(f"grid file '{path}': key '{group}[{i}]' names unknown runs {missing}")
    for i, item in enumerate(grid.findings):
        _check_finding(item, f"findings[{i}]", path)
    for i, item in enumerate(grid.series):
        _check_series(grid, item, f"series[{i}]", path)
    for i, item in enumerate(grid.tables):
        _axis_values(grid, item.by, f"tables[{i}].by", path)
        _check_selection(grid, item.baseline, f"tables[{i}].baseline", path)
    _check_budgets(grid, path)
    names = [item.name for item in grid.setup]
    if len(set(names)) != len(names) or any(item.kind not in ("train", "central") for item in grid.setup):
        raise ConfigError(f"grid file '{path}': key 'setup' needs runs with unique names and kind "
                          f"'train' or 'central', got {[(item.name, item.kind) for item in grid.setup]}")
    unknown = sorted(set(grid.untrained) - set(ANCHOR_METRICS))
    if unknown:
        raise ConfigError(f"grid file '{path}': key 'untrained' has unknown metrics {unknown} "
                          f"(known: {list(ANCHOR_METRICS)})")
    for name, scores in grid.anchors.items():
        unknown = sorted(set(scores) - set(ANCHOR_METRICS))
        if unknown:
            raise ConfigError(f"grid file '{path}': key 'anchors.{name}' has unknown metrics {unknown} "
                              f"(known: {list(ANCHOR_METRICS)})")
    if grid.tuning is not None:
        _check_tuning(grid, grid.tuning, path)


def _check_budgets(grid: Grid, path: str) -> None:
    every = grid.eval_every_samples
    if every is not None and every <= 0:
        raise ConfigError(f"grid file '{path}': key 'eval_every_samples' must be > 0 (or null: "
                          f"evaluate at the budgets only), got {every}")
    for budget in grid.budgets:
        if not 0 < budget <= grid.samples or (every and budget % every and budget != grid.samples):
            raise ConfigError(f"grid file '{path}': key 'budgets': {budget} must be an evaluation point "
                              f"of the runs: a multiple of eval_every_samples ({grid.eval_every_samples}) "
                              f"up to samples ({grid.samples})")


def _check_tuning(grid: Grid, tuning: Tuning, path: str) -> None:
    """Seeds disjoint from the reporting seeds; methods that exist, the same number of points for
    each; every other matrix axis either fixed (``at``) or tuned per value (``per``)."""
    where = f"grid file '{path}': key 'tuning"
    shared = sorted(set(tuning.seeds) & set(grid.seeds))
    if not tuning.seeds or shared:
        raise ConfigError(f"{where}.seeds': tuning seeds must be given and disjoint from the reporting "
                          f"seeds {grid.seeds}; shared: {shared}")
    if tuning.metric not in TUNING_METRICS:
        raise ConfigError(f"{where}.metric': must be one of {sorted(TUNING_METRICS)}, got '{tuning.metric}'")
    explicit = [r.name for r in grid.runs if not r.axes]
    values = _axis_values(grid, tuning.axis, "tuning.axis", path) if tuning.axis else []
    apart = [grid.sweep_name({tuning.axis: m, axis: v})
             for m in values for axis, vs in tuning.separately.items() for v in vs]
    unknown = [m for m in tuning.methods if m not in values and m not in explicit and m not in apart]
    if unknown or not tuning.methods:
        raise ConfigError(f"{where}.methods': {unknown or 'none given'}: a method is a value of the "
                          f"axis '{tuning.axis}' {values} or an explicit run {explicit}"
                          + (f" (or a sweep tuned separately, {apart})" if apart else ""))
    untuned = [v for v in values if v not in tuning.methods]
    if untuned:
        raise ConfigError(f"{where}.methods': every value of the axis '{tuning.axis}' is tuned; "
                          f"missing {untuned}")
    for method, axes in tuning.methods.items():
        _check_tuning_axes(axes, f"{where}.methods.{method}'")
    _check_equal_points(tuning, where)
    _check_tuning_axes_cover(grid, tuning, where, path)


def _check_tuning_axes(axes: List[TuningAxis], where: str) -> None:
    keys = [a.key for a in axes]
    if not axes or len(set(keys)) != len(keys):
        raise ConfigError(f"{where}: needs tuning axes with distinct keys, got {keys}")
    for axis in axes:
        axis.values = [_number(v) for v in axis.values]  # YAML reads 1e-3 as a string
        if not axis.values or len({repr(v) for v in axis.values}) != len(axis.values):
            raise ConfigError(f"{where}: axis '{axis.key}' needs distinct values, got {axis.values}")
        if axis.extend is not None:
            if len(axis.extend) != 2:
                raise ConfigError(f"{where}: axis '{axis.key}': 'extend' is [below, above], "
                                  f"got {axis.extend}")
            axis.extend = [None if v is None else _number(v) for v in axis.extend]


def _number(value):
    """A YAML string that reads as a number (``1e-3``; YAML 1.1 wants ``1.0e-3``) as that float."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def points_of(axes: List[TuningAxis]) -> int:
    return math.prod(len(a.values) for a in axes)


def _check_equal_points(tuning: Tuning, where: str) -> None:
    counts = {m: points_of(axes) for m, axes in tuning.methods.items()}
    first, wanted = next(iter(counts.items()))
    odd = [m for m, n in counts.items() if n != wanted]
    if odd:
        shape = lambda m: " x ".join(f"{a.key} {len(a.values)}" for a in tuning.methods[m])  # noqa: E731
        raise ConfigError(f"{where}.methods': every method needs the same number of points; "
                          + "; ".join(f"'{m}' has {counts[m]} ({shape(m)})" for m in odd)
                          + f", '{first}' has {wanted} ({shape(first)})")


def _check_tuning_axes_cover(grid: Grid, tuning: Tuning, where: str, path: str) -> None:
    """Each matrix axis other than the methods' is in exactly one of ``at`` and ``per``."""
    others = [a.axis for a in grid.matrix if a.axis != tuning.axis] if tuning.axis else []
    both = sorted(set(tuning.at) & set(tuning.per))
    stray = sorted((set(tuning.at) | set(tuning.per)) - set(others))
    missing = [a for a in others if a not in tuning.at and a not in tuning.per]
    if both or stray or missing:
        raise ConfigError(f"{where}': every matrix axis but '{tuning.axis}' ({others}) goes in exactly "
                          f"one of 'at' (tune at one value) and 'per' (tune per value); "
                          + (f"in both: {both}" if both else f"unknown: {stray}" if stray
                             else f"in neither: {missing}"))
    _check_selection(grid, tuning.at, "tuning.at", path)
    for axis, values in tuning.separately.items():
        known = _axis_values(grid, axis, f"tuning.separately.{axis}", path)
        wrong = [v for v in values if v not in known or v == tuning.at.get(axis)]
        if axis not in tuning.at or wrong or len(set(values)) != len(values):
            raise ConfigError(f"{where}.separately.{axis}': needs distinct values of an 'at' axis other "
                              f"than its 'at' value {tuning.at.get(axis)!r} (values: {known}); "
                              f"got {values}")


def _check_finding(item: Finding, where: str, path: str) -> None:
    if item.kind not in FINDING_RUNS:
        raise ConfigError(f"grid file '{path}': key '{where}.kind': finding kind must be one of "
                          f"{sorted(FINDING_RUNS)}, got '{item.kind}'")
    wanted = FINDING_RUNS[item.kind]
    if wanted and len(item.runs) != wanted:
        raise ConfigError(f"grid file '{path}': key '{where}.runs': a '{item.kind}' finding compares "
                          f"{wanted} runs, got {item.runs}")


def _check_series(grid: Grid, item: Series, where: str, path: str) -> None:
    if item.kind not in ("fid", "class_mix", "privacy"):
        raise ConfigError(f"grid file '{path}': key '{where}.kind': series kind must be 'fid', "
                          f"'class_mix' or 'privacy', got '{item.kind}'")
    if (item.kind == "privacy") != bool(item.lines):
        raise ConfigError(f"grid file '{path}': key '{where}.lines': a 'privacy' series needs it "
                          f"(the axis whose values are its lines), other series take none")
    if item.lines:
        _axis_values(grid, item.lines, f"{where}.lines", path)
    _check_selection(grid, item.select, f"{where}.select", path)
    if item.panels:
        if item.kind != "fid":
            raise ConfigError(f"grid file '{path}': key '{where}.panels' is for FID series, "
                              f"not '{item.kind}'")
        _axis_values(grid, item.panels, f"{where}.panels", path)
    if not grid.series_runs(item):
        raise ConfigError(f"grid file '{path}': key '{where}': series '{item.name}' selects no runs")


def _axis_values(grid: Grid, axis: str, where: str, path: str) -> List[str]:
    for item in grid.matrix:
        if item.axis == axis:
            return [v.name for v in item.values]
    raise ConfigError(f"grid file '{path}': key '{where}': unknown matrix axis '{axis}' "
                      f"(axes: {[a.axis for a in grid.matrix]})")


def _check_selection(grid: Grid, select: dict, where: str, path: str) -> None:
    for axis, wanted in select.items():
        known = _axis_values(grid, axis, f"{where}.{axis}", path)
        unknown = [v for v in _as_list(wanted) if v not in known]
        if unknown:
            raise ConfigError(f"grid file '{path}': key '{where}.{axis}': axis '{axis}' has no values "
                              f"{unknown} (values: {known})")


# ---------------------------------------------------------------- planning

def _divide(total: int, unit: int, what: str, name: str) -> int:
    if total % unit:
        raise ConfigError(f"grid run '{name}': {what} ({total}) is not a multiple of the samples of "
                          f"one round ({unit} = K x E x B); choose budgets divisible by it")
    return total // unit


def plan(grid: Grid, tuned: Optional[Dict[str, Dict[str, tuple]]] = None) -> List[RunSpec]:
    """Every (run, seed) as a runner step with its derived overrides; checks the budgets divide
    into rounds. A step is finished when its run holds final/ and an FID at its last round.

    ``tuned`` (``fedrun.experiments.tuning``): run name -> {point label: (the point's overrides,
    the largest budget it is reported at)}. Such a run trains once per point, as
    ``<run>@<point>`` in runs/<run>/<point>/seed<k>, up to that budget; one without points (its
    tuning has no result) is left out."""
    if grid.ema_horizon_samples < 0:
        raise ConfigError(f"grid: ema_horizon_samples must be >= 0, got {grid.ema_horizon_samples}")
    tuned = tuned or {}
    specs = []
    for run in grid.runs:
        folder = Path(grid.output_dir) / "runs" / run.name
        if run.name not in tuned:
            specs += run_specs(grid, run, run.name, folder, [], grid.seeds, grid.samples)
            continue
        for label, (overrides, samples) in tuned[run.name].items():
            specs += run_specs(grid, run, f"{run.name}@{label}", folder / label, overrides,
                               grid.seeds, samples)
    return specs


def setup_specs(grid: Grid) -> List[RunSpec]:
    """The grid's setup runs as runner steps, in <output_dir>/setup/<name>."""
    return [RunSpec(f"setup/{item.name}", item.kind, Path(grid.output_dir) / "setup" / item.name,
                    seed=item.seed, config=grid.base_config,
                    overrides=grid.resolve([*grid.overrides, *item.overrides, f"seed={item.seed}"]))
            for item in grid.setup]


def run_specs(grid: Grid, run: GridRun, name: str, folder: Path, extra: List[str], seeds: List[int],
              samples: int) -> List[RunSpec]:
    """The steps of ``run`` with the ``extra`` overrides (a tuning point), one per seed in
    ``folder``/seed<k>, each trained to ``samples``."""
    overrides = grid.resolve(list(grid.overrides) + list(run.overrides) + list(extra))
    round_samples, derived = _derived(grid, run, overrides, samples)
    return [RunSpec(name, run.kind, folder / f"seed{seed}", seed=seed, config=grid.base_config,
                    overrides=overrides + derived + [f"seed={seed}"], metric="fid",
                    round_samples=round_samples)
            for seed in seeds]


def _derived(grid: Grid, run: GridRun, overrides: List[str], samples: int) -> tuple:
    """(samples of one round, the overrides that give the run its budget ``samples``, the grid's
    evaluation points and EMA horizon)."""
    from fedrun.config import load_config
    from fedrun.engine.central import federated_steps_per_round
    from fedrun.engine.central import plan as central_plan

    cfg = load_config(grid.base_config, overrides)
    if cfg.local_epochs is not None:
        raise ConfigError(f"grid run '{run.name}': use local_steps, not local_epochs, in a "
                          "comparison (the budget must divide into rounds)")
    # The runs' own arithmetic; client sizes only matter with local_epochs, refused above.
    client_sizes = [0] * cfg.num_clients
    if run.kind == "central":
        schedule = central_plan(cfg, client_sizes)
        round_samples = schedule["steps_per_round"] * schedule["batch"]
    else:
        round_samples = federated_steps_per_round(cfg, client_sizes) * cfg.optim.batch_size
    rounds = _divide(samples, round_samples, "samples", run.name)
    if grid.eval_every_samples:
        evaluation = f"eval.every={_divide(grid.eval_every_samples, round_samples, 'eval_every_samples', run.name)}"
    else:  # the budgets this run reaches
        at = [_divide(b, round_samples, "budgets", run.name) for b in grid.budget_list if b <= samples]
        evaluation = f"eval.at=[{','.join(map(str, at))}]"
    # Mean age d / (1 - d) rounds = H samples (fedrun.engine.ema.EMA).
    decay = grid.ema_horizon_samples / (grid.ema_horizon_samples + round_samples)
    derived = [f"rounds={rounds}", evaluation, f"ema.decay={decay:.6g}"]
    if run.kind == "central":
        derived += [f"central.samples={samples}",
                    f"central.steps_per_round={schedule['steps_per_round']}"]
    return round_samples, derived
