"""Reading a grid's results back from its run directories: one dict of numbers per finished run
(``collect``), the failed or missing runs with their errors and logs (``collect_all``), and the
results as the report compares them at one budget (``at_budget``, ``budget_view``)."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from fedrun.errors import FedrunError
from fedrun.experiments.leakage import leakage
from fedrun.experiments.steps import FAILED, Outcome, RunSpec, read_record


def collect(spec: RunSpec) -> dict:
    """The numbers of one finished run: final FID/KID and their floors, class mix, loss, budget,
    bytes, wall time and the commit it trained with (from its runner record, when it has one)."""
    from fedrun.engine.metrics import read_metrics

    if not spec.run_dir.is_dir():
        raise FedrunError(f"run directory '{spec.run_dir}' does not exist (run the grid without --collect)")
    records = read_metrics(spec.run_dir)
    evals = [r for r in records if "fid" in r]
    if not records or not evals:
        raise FedrunError(f"run '{spec.run_dir}' has no evaluation records in metrics.jsonl")
    last, final = records[-1], evals[-1]
    # The budget a record stands for: its round x the nominal samples of a round (K x E x B).
    # Under Poisson cohorts (DP) the samples actually seen vary around it ("samples_seen").
    nominal = ((lambda r: r["round"] * spec.round_samples) if spec.round_samples
               else (lambda r: r["samples"]))
    until = rounds_until(records)
    record = read_record(spec)
    if record is None:  # a run trained outside the runner: its rounds' times, its last write
        record = {"wall_s": sum(r.get("round_time_s", 0.0) for r in records),
                  "ended": (spec.run_dir / "metrics.jsonl").stat().st_mtime}
    return {
        "name": spec.name, "seed": spec.seed, "kind": spec.kind, "commit": record.get("commit"),
        **evaluation(final), "final_loss": last["train_loss"], **class_mix(final),
        "reference_class_fractions": final.get("reference_class_fractions"),
        "samples": nominal(last), **spent(last),
        "wall_s": record["wall_s"], "ended": record["ended"], "eval_samples": final["eval_samples"],
        # the run's own time, its rounds (evaluations included): unlike wall_s it leaves out
        # the start-up and the time the run was paused (paused_s)
        **dict(zip(("rounds_s", "paused_s"), round_times(records))),
        "eval_reference": final["eval_reference"], "eval_feature": final["eval_feature"],
        "curve": [(nominal(r), r["fid"]) for r in evals],
        # every evaluation's scores, by samples seen: the report's earlier budgets read them
        "at": {str(nominal(r)): {**evaluation(r), "final_loss": r["train_loss"], **class_mix(r),
                                 "rounds_s": until[r["round"]], **spent(r)}
               for r in evals},
        "bytes_curve": [(r.get("bytes_total", 0), r["fid"]) for r in evals],
        "params_bytes": last.get("bytes_sent_per_client"),
        **leakage(spec.run_dir),  # its audit (grid key audit) and epsilon, when it has them
    }


def spent(record: dict) -> dict:
    """What a run had spent by a record: samples seen, bytes (in all and each way: half each
    way in runs from before the directions were counted apart) and optimizer steps (central)."""
    total = record["bytes_total"]
    return {"samples_seen": record["samples"], "bytes_total": total,
            "bytes_up_total": record.get("bytes_up_total", total // 2),
            "bytes_down_total": record.get("bytes_down_total", total - total // 2),
            "steps": record.get("steps")}


PAUSED = 10  # a round that took over 10 x its run's median round of its kind was paused


def round_times(records: List[dict]) -> Tuple[float, float]:
    """A run's rounds' time (evaluations included) without its pauses, and the pauses: a round
    that took over PAUSED times the run's median round of its kind (evaluated or not) was
    stopped (kill -STOP while other work ran) and counts at that median. Records written
    without round_time_s count 0."""
    counted = counted_times(records)
    return (sum(c for c, _ in counted), sum(p for _, p in counted))


def counted_times(records: List[dict]) -> List[Tuple[float, float]]:
    """Each record's round time as ``round_times`` counts it, and the pause taken out of it."""
    import numpy as np

    times = {True: [], False: []}
    for r in records:
        times["fid" in r].append(r.get("round_time_s", 0.0))
    median = {kind: float(np.median(t)) if t else 0.0 for kind, t in times.items()}
    out = []
    for r in records:
        t, m = r.get("round_time_s", 0.0), median["fid" in r]
        out.append((m, t - m) if m > 0 and t > PAUSED * m else (t, 0.0))
    return out


def rounds_until(records: List[dict]) -> Dict[int, float]:
    """The rounds' time (pauses left out, as ``round_times``) from the start of the run to the
    end of each evaluated round: round -> seconds."""
    total, out = 0.0, {}
    for r, (t, _) in zip(records, counted_times(records)):
        total += t
        if "fid" in r:
            out[r["round"]] = total
    return out


def class_mix(record: dict) -> dict:
    """An evaluation record's class mix and what the report reads of it: the rarest class and
    its share, the share in the held-out images' classes (each budget's own, not the final's)."""
    min_class, min_fraction = rarest(record)
    return {"class_fractions": record.get("class_fractions"), "min_class": min_class,
            "min_class_fraction": min_fraction, "in_classes": in_classes(record)}


def rarest(record: dict) -> tuple:
    """The rarest class of an evaluation record's samples and its share, among the classes its
    held-out images hold (recomputed from the class mix: records written before min_class
    existed, or before it left out the classes data.classes leaves out); (None, None) without
    a class mix."""
    from fedrun.eval.features import rarest_class

    fractions = record.get("class_fractions")
    if not fractions:
        return record.get("min_class"), record.get("min_class_fraction")
    c = rarest_class(fractions, record.get("reference_class_fractions"))
    return c, fractions[c]


def in_classes(record: dict) -> Optional[float]:
    """The share of the samples classified into a class the held-out images hold; None without
    a class mix or where the held-out images hold every class (it is then 1)."""
    fractions, reference = record.get("class_fractions"), record.get("reference_class_fractions")
    if not fractions or not reference or all(r > 0 for r in reference):
        return None
    return float(sum(f for f, r in zip(fractions, reference) if r > 0))


EVALUATED = ("fid", "kid", "kid_std", "floor_fid", "floor_kid", "class_tv", "confident_fraction",
             "class_coverage", "floor_confident_fraction", "floor_class_coverage", "tstr_accuracy",
             "trtr_accuracy")


def evaluation(record: dict) -> dict:
    """The scores of one evaluation record (None where a record predates a score)."""
    return {key: record.get(key) for key in EVALUATED}


def at_budget(result: dict, budget: int) -> dict:
    """``result`` as if its run had stopped at ``budget`` samples: the scores of its evaluation
    there (a result collected before evaluations were kept by budget: only its final one)."""
    if result["samples"] == budget:
        return result
    found = (result.get("at") or {}).get(str(budget))
    if found is None:
        raise FedrunError(f"run '{result['name']}' seed {result['seed']} has no evaluation at "
                          f"{budget:,} samples seen")
    return {**result, **found, "samples": budget}


def budget_view(results: List[dict], budget: int,
                chosen: Optional[Dict[str, Dict[int, str]]] = None) -> List[dict]:
    """The results the report compares at ``budget``, named by their grid run: every untuned
    run's, and a tuned run's (named '<run>@<point>') only at the point ``chosen`` for it at
    this budget (run -> budget -> point label)."""
    out = []
    for result in results:
        run, _, point = result["name"].partition("@")
        if point and (chosen or {}).get(run, {}).get(budget) != point:
            continue
        if result["samples"] >= budget:
            out.append({**at_budget(result, budget), "name": run, "point": point or None})
    return out


def budget_failures(failures: List[dict], budget: int,
                    chosen: Optional[Dict[str, Dict[int, str]]] = None) -> List[dict]:
    """The runs without results that the report's rows miss at ``budget``, named by their grid
    run as ``budget_view`` names results: an untuned run's, and a tuned run's only at the point
    chosen for it at this budget."""
    out = []
    for failure in failures:
        run, _, point = failure["name"].partition("@")
        if point and (chosen or {}).get(run, {}).get(budget) != point:
            continue
        out.append({**failure, "name": run})
    return out


def collect_all(outcomes: Dict[str, Outcome]) -> Tuple[List[dict], List[dict]]:
    """(results of the runs that have them, failures: the others with their status, error and log)."""
    results, failures = [], []
    for outcome in outcomes.values():
        spec = outcome.spec
        if outcome.ok:
            try:
                results.append(collect(spec))
                continue
            except FedrunError as exc:
                error = str(exc)
        else:
            error = outcome.error or outcome.status
        failures.append({"name": spec.name, "seed": spec.seed, "kind": spec.kind,
                         "status": outcome.status if not outcome.ok else FAILED,
                         "error": error, "log": str(outcome.log) if outcome.log else None})
    return results, failures
