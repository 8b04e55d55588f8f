"""The tuning protocol of a grid's ``tuning`` section: every method gets the same number of
points, tried on seeds disjoint from the reporting seeds; its setting is chosen by the study's
metric at each of the study's budgets, before any reporting run trains.

    groups      per method (and per value of the ``per`` axes, and per value tuned
                ``separately``): the grid run its tuning runs train (the method at the ``at``
                values) and the points of its tuning axes
    specs       every (group, point, tuning seed) as an ordinary runner step (trained to the
                largest budget and evaluated at every budget), in <output_dir>/tuning/
    choose      per group and budget: the point of best mean over the tuning seeds (points
                missing a seed are left out; ties: the first); an optimum on the edge of a
                numeric axis is flagged, and with ``extend_edges`` the point one step beyond
                it is tried once (``extension_points``) before choosing again
    tuned       what ``grid.plan`` needs: per reporting run, its chosen points' overrides

``tune`` runs it with the experiment's runner (the same ``--jobs`` and Slurm machinery) and
writes the sweep to tuning.json (in the report folder); a later run or ``--collect`` whose
tuning runs are the same reuses a complete tuning.json instead of training them again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from fedrun.experiments.collect import at_budget, collect_all
from fedrun.experiments.grid import TUNING_METRICS, Grid, run_specs
from fedrun.experiments.steps import DIVERGED, Outcome, RunSpec

TUNING_FILE = "tuning.json"


@dataclass
class Point:
    """One setting of a group's tuning axes (config key -> value); ``extension``: tried beyond
    an edge."""

    label: str
    values: Dict[str, Any]
    extension: bool = False

    @property
    def overrides(self) -> List[str]:
        return [f"{key}={override_text(value)}" for key, value in self.values.items()]


def override_text(value) -> str:
    """A value as a ``key=value`` override reads it back (YAML: null, true, numbers, text)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


@dataclass
class Group:
    """One sweep: a method (and its ``per`` axes' values), the grid run its tuning runs train,
    the grid runs that take its choice, its points, their scores and the choice per budget."""

    name: str
    method: str
    run: str
    serves: List[str]
    axes: List[dict]  # {key, values, extend}
    points: List[Point]
    scores: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)
    """point label -> budget -> tuning seed -> metric (JSON keys: text)."""
    choice: Dict[str, Optional[dict]] = field(default_factory=dict)
    """budget -> {point, mean, edges: [[key, 'low'|'high']], extended: [[key, side]]} or None."""

    def point(self, label: str) -> Point:
        return next(p for p in self.points if p.label == label)


@dataclass
class Sweep:
    """The tuning of a grid: its groups, what it cost, and whether every tuning run has results."""

    signature: str
    metric: str
    lower_is_better: bool
    seeds: List[int]
    budgets: List[int]
    groups: List[Group]
    cost: Dict[str, Optional[float]] = field(default_factory=dict)  # runs, wall_s, rounds_s, paused_s, started, ended
    failures: List[dict] = field(default_factory=list)
    complete: bool = False
    reused: bool = False  # read from tuning.json rather than from the tuning runs

    def group_of(self, run: str) -> Optional[Group]:
        return next((g for g in self.groups if run in g.serves), None)

    def tuned(self) -> Dict[str, Dict[str, tuple]]:
        """For ``grid.plan``: each served run -> {chosen point: (its overrides, the largest
        budget it is chosen at)}; empty when no point of its group has results."""
        out = {}
        for group in self.groups:
            points: Dict[str, tuple] = {}
            for budget in self.budgets:
                chosen = group.choice.get(str(budget))
                if chosen:
                    points[chosen["point"]] = (group.point(chosen["point"]).overrides, budget)
            for run in group.serves:
                out[run] = points
        return out

    def chosen(self) -> Dict[str, Dict[int, str]]:
        """Each served run -> budget -> the label of the point it is reported with."""
        return {run: {b: g.choice[str(b)]["point"] for b in self.budgets if g.choice.get(str(b))}
                for g in self.groups for run in g.serves}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Sweep":
        groups = [Group(**{**g, "points": [Point(**p) for p in g["points"]]}) for g in data["groups"]]
        return cls(**{**data, "groups": groups})


# ---------------------------------------------------------------- groups and their runs

def build_groups(grid: Grid) -> List[Group]:
    """A group per method and per combination of the ``per`` axes' values (axis order)."""
    tuning = grid.tuning
    methods = [v.name for v in grid.axis(tuning.axis).values] if tuning.axis else []
    groups = []

    def sweep(axes) -> tuple:
        points = [Point(f"p{i:02d}", {a.key: v for a, v in zip(axes, values)})
                  for i, values in enumerate(itertools.product(*(a.values for a in axes)))]
        return [{"key": a.key, "values": a.values, "extend": a.extend} for a in axes], points

    for method, axes in tuning.methods.items():
        if method not in methods and not any(r.name == method and not r.axes for r in grid.runs):
            continue  # the axes of a sweep tuned separately, used below
        described, points = sweep(axes)
        if method not in methods:
            groups.append(Group(method, method, method, [method], described, points))
            continue
        for combination in itertools.product(*(grid.axis(a).values for a in tuning.per)):
            per = {a: v.name for a, v in zip(tuning.per, combination)}
            wanted = {tuning.axis: method, **per}
            serves = grid.select(wanted)
            apart = []  # (its values, the runs it serves, separate) of each value tuned apart
            for axis, values in tuning.separately.items():
                for value in values:
                    own = grid.select({**wanted, axis: value})
                    apart.append(({**wanted, axis: value}, own, True))
                    serves = [r for r in serves if r not in own]
            for values, runs, separate in [(wanted, serves, False), *apart]:
                name = grid.sweep_name(values)
                trains = grid.select({**tuning.at, **values})[0]
                own_axes, own_points = sweep(tuning.methods[name]) if separate \
                    and name in tuning.methods else (described, points)
                groups.append(Group(name, method, trains, runs, own_axes,
                                    [Point(p.label, dict(p.values)) for p in own_points]))
    return groups


def group_specs(grid: Grid, group: Group, points: List[Point]) -> List[RunSpec]:
    """The tuning runs of ``points`` of ``group``: named tuning/<group>@<point>, trained to the
    grid's largest budget on the tuning seeds, in <output_dir>/tuning/<group>/<point>/seed<k>."""
    run = grid.run(group.run)
    folder = Path(grid.output_dir) / "tuning" / group.name
    return [spec for point in points
            for spec in run_specs(grid, run, f"tuning/{group.name}@{point.label}", folder / point.label,
                                  point.overrides, grid.tuning.seeds, grid.samples)]


def signature(specs: List[RunSpec]) -> str:
    """What the tuning runs are made from (ids, configs, overrides): a saved sweep is reused only
    for the same."""
    text = json.dumps([[s.id, s.inputs()] for s in specs], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- choosing

def record_scores(groups: List[Group], results: List[dict], metric: str, budgets: List[int]) -> None:
    """Each tuning result's metric at every budget into its group's scores."""
    by_name = {g.name: g for g in groups}
    for result in results:
        name, _, label = result["name"].removeprefix("tuning/").partition("@")
        scores = by_name[name].scores.setdefault(label, {})
        for budget in budgets:
            value = at_budget(result, budget).get(metric)
            if value is not None:
                scores.setdefault(str(budget), {})[str(result["seed"])] = value


def choose(group: Group, budgets: List[int], seeds: List[int], lower_is_better: bool) -> None:
    """Per budget: the point with the best mean over all tuning seeds (a point missing one is
    not a candidate; ties: the first point), and the edges it sits on."""
    for budget in budgets:
        means = {}
        for point in group.points:
            values = group.scores.get(point.label, {}).get(str(budget), {})
            if all(str(s) in values and math.isfinite(values[str(s)]) for s in seeds):
                means[point.label] = sum(values[str(s)] for s in seeds) / len(seeds)
        if not means:
            group.choice[str(budget)] = None
            continue
        sign = 1 if lower_is_better else -1
        best = min(means, key=lambda label: sign * means[label])  # min keeps the first of ties
        previous = group.choice.get(str(budget)) or {}
        group.choice[str(budget)] = {"point": best, "mean": means[best],
                                     "edges": edges(group, group.point(best)),
                                     "extended": previous.get("extended", [])}


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def axis_values(group: Group, key: str) -> list:
    """The values of ``key`` tried in the group (its axis and any extension), ascending."""
    return sorted({p.values[key] for p in group.points})


def edges(group: Group, point: Point) -> List[List[str]]:
    """[key, 'low' | 'high'] for each numeric axis (of >= 2 tried values) on whose lowest or
    highest tried value ``point`` sits."""
    out = []
    for axis in group.axes:
        tried = axis_values(group, axis["key"])
        if len(tried) < 2 or not _numeric(tried):
            continue
        value = point.values[axis["key"]]
        if value == tried[0]:
            out.append([axis["key"], "low"])
        elif value == tried[-1]:
            out.append([axis["key"], "high"])
    return out


def beyond(axis: dict, side: str):
    """The value one step beyond an axis' edge: its ``extend`` value for that side, else the
    geometric step of an axis of positive numbers (the ratio of its two values at that end),
    else None (only flagged)."""
    if axis.get("extend") is not None:
        return axis["extend"][0 if side == "low" else 1]
    values = sorted(axis["values"])
    if len(values) < 2 or not _numeric(values) or values[0] <= 0:
        return None
    return values[0] ** 2 / values[1] if side == "low" else values[-1] ** 2 / values[-2]


def extension_points(group: Group, budgets: List[int]) -> List[Point]:
    """Once per group: for every budget's choice on an edge, the chosen point with that axis
    one step beyond it (recorded in the choice's ``extended``); new points only."""
    new: List[Point] = []
    for budget in budgets:
        chosen = group.choice.get(str(budget))
        if not chosen:
            continue
        for key, side in chosen["edges"]:
            value = beyond(next(a for a in group.axes if a["key"] == key), side)
            if value is None:
                continue
            values = {**group.point(chosen["point"]).values, key: value}
            existing = next((p for p in group.points + new if p.values == values), None)
            if existing is None:
                existing = Point(f"x{len(new):02d}", values, extension=True)
                new.append(existing)
            chosen["extended"].append([key, side, existing.label])
    group.points += new
    return new


# ---------------------------------------------------------------- running it

def tune(grid: Grid, run: Callable[[List[RunSpec]], Dict[str, Outcome]], tuning_file: Path,
         say=print, collect_only: bool = False) -> Sweep:
    """The grid's tuning: reuse ``tuning_file`` when it holds a complete sweep of the same
    tuning runs (with ``collect_only``, also an incomplete one), else ``run`` the tuning runs
    (an ``execute`` or, collecting, their state as found), choose, extend once if asked, and
    save the sweep there."""
    tuning = grid.tuning
    groups = build_groups(grid)
    specs = [s for g in groups for s in group_specs(grid, g, g.points)]
    sig = signature(specs)
    saved = load_sweep(tuning_file, sig)
    if saved is not None and (saved.complete or collect_only):
        say(f"tuning: reusing {tuning_file} ({saved.cost.get('runs', 0):.0f} tuning runs)")
        saved.reused = True
        return saved
    sweep = Sweep(sig, tuning.metric, TUNING_METRICS[tuning.metric], list(tuning.seeds),
                  grid.budget_list, groups)
    say(f"tuning: {len(groups)} sweeps of {len(groups[0].points)} points x {len(tuning.seeds)} seeds "
        f"= {len(specs)} runs")
    outcomes = dict(run(specs))
    _score(sweep, outcomes)
    if tuning.extend_edges:
        extra = {g.name: extension_points(g, sweep.budgets) for g in groups}
        more = [s for g in groups for s in group_specs(grid, g, extra[g.name])]
        if more:
            say(f"tuning: {len(more)} runs beyond optima on an edge")
            outcomes.update(run(more))
            _score(sweep, outcomes)
    # a diverged point is a result (the run stopped itself, unable to learn): not run again
    sweep.complete = all(f["status"] == DIVERGED for f in sweep.failures)
    save_sweep(sweep, tuning_file)
    return sweep


def _score(sweep: Sweep, outcomes: Dict[str, Outcome]) -> None:
    results, failures = collect_all(outcomes)
    for group in sweep.groups:
        group.scores = {}
    record_scores(sweep.groups, results, sweep.metric, sweep.budgets)
    for group in sweep.groups:
        choose(group, sweep.budgets, sweep.seeds, sweep.lower_is_better)
    sweep.cost = {"runs": len(outcomes),
                  "wall_s": sum(r["wall_s"] for r in results) + sum(o.wall_s for o in outcomes.values()
                                                                    if not o.ok),
                  "rounds_s": sum(r.get("rounds_s") or 0.0 for r in results),
                  "paused_s": sum(r.get("paused_s") or 0.0 for r in results),
                  "started": min((r["ended"] - r["wall_s"] for r in results), default=None),
                  "ended": max((r["ended"] for r in results), default=None)}
    sweep.failures = failures


def load_sweep(path: Path, sig: str) -> Optional[Sweep]:
    """The sweep saved in ``path`` if it is of the tuning runs with signature ``sig``."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Sweep.from_json(data) if data.get("signature") == sig else None


def save_sweep(sweep: Sweep, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in sweep.to_json().items() if k != "reused"}
    path.write_text(json.dumps(data, indent=1) + "\n")
