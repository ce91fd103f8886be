"""Results of a study as tables (pandas): the trials, the Pareto front, and which trial to export
and why. No model, no torch: `report` and `chat` read these."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import optuna
import pandas as pd

from .config import Settings
from .errors import HereticError
from .records import StudyRecord


def trials_table(study: optuna.Study) -> pd.DataFrame:
    rows = []
    record = StudyRecord(study)
    for t in record.completed():
        edit = t.edit_dict
        row = {"trial": t.number, "refusals": t.refusals, "kl_divergence": t.kl_divergence}
        # counted again with long responses on the final front (studies before that: on entering it)
        long = t.refusals_long if t.refusals_long is not None else record.front_recount(t.number)
        if long is not None:
            row["refusals_long"] = long
        if t.refusal_margin is not None:  # refusal_margin_weight > 0 (margin.py)
            row["refusal_margin"] = round(t.refusal_margin, 4)
        index = edit.get("direction_index")
        row["direction_index"] = "per layer" if index is None else round(index, 2)
        if edit.get("global_direction") is not None:  # search.global_direction
            row["global_direction.index"] = round(edit["global_direction"]["index"], 2)
            row["global_direction.weight"] = round(edit["global_direction"]["weight"], 3)
        if edit.get("entangled_strength", 1.0) != 1.0:
            row["entangled_strength"] = round(edit["entangled_strength"], 3)
        for component, kernel in (t.edit.named_kernels() if edit else {}).items():
            for key, value in vars(kernel).items():
                if key != "shape":
                    row[f"{component}.{key}"] = round(value, 2)
                elif value != "tent":  # a column only when some trial's kernel is not a tent
                    row[f"{component}.shape"] = value
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in [c for c in table.columns if c.endswith(".shape")]:
        table[column] = table[column].fillna("tent")
    if "refusals_long" in table:
        table["refusals_long"] = table["refusals_long"].astype("Int64")  # absent off the front
    return table


def pareto_front(table: pd.DataFrame) -> pd.DataFrame:
    """Trials not beaten on both refusals and KL, fewest refusals first."""
    if table.empty:
        return table
    ordered = table.sort_values(["refusals", "kl_divergence", "trial"])
    keep, best_kl = [], float("inf")
    for index, row in ordered.iterrows():
        if row["kl_divergence"] < best_kl:
            keep.append(index)
            best_kl = row["kl_divergence"]
    return ordered.loc[keep]


@dataclass(frozen=True)
class ExportRule:
    """How `export_trial = "best"` picks a trial: config keys `export_rule`, `export_kl_limit`,
    `export_kl_exchange`, and the unedited model's refusal count that refusals are scaled by."""

    rule: str
    kl_limit: float
    kl_exchange: float
    base_refusals: int

    def score(self, refusals, kl):
        """What the rule minimises among trials with KL <= kl_limit (scalars or pandas Series);
        it never falls as refusals rise, so a trial's short count bounds its long-count score."""
        if self.rule == "fewest_refusals":
            return refusals + kl * 1e-6  # fewest refusals; the KL only breaks ties (KL < 1e6)
        return refusals / max(self.base_refusals, 1) + kl / self.kl_exchange

    @classmethod
    def of(cls, settings: Settings, study: optuna.Study) -> ExportRule:
        base = StudyRecord(study).base_refusals
        return cls(settings.export_rule, settings.export_kl_limit, settings.export_kl_exchange, int(base or 0))


@dataclass(frozen=True)
class Choice:
    trial: int
    reason: str


def choose_trial(table: pd.DataFrame, rule: ExportRule) -> Choice | None:
    """The trial the rule picks among completed trials, and why (one line).

    "balanced" minimises refusals / base_refusals + KL / kl_exchange: both axes on scales a user
    reads (share of the unedited model's refusals left; KL in units of what removing all of them
    is worth), so it takes the knee of the front and does not pay four times the drift for the
    last two prompts. "fewest_refusals" takes the fewest refusals (ties: lower KL). Either way,
    only trials with KL <= kl_limit; if there is none, the lowest-KL trial."""
    if table.empty:
        return None
    table, counted = long_counted(table)
    within = table[table["kl_divergence"] <= rule.kl_limit]
    if within.empty:
        row = table.sort_values(["kl_divergence", "refusals", "trial"]).iloc[0]
        return Choice(int(row["trial"]), f"no trial has KL <= {rule.kl_limit} (export_kl_limit): the lowest-KL trial")
    if rule.rule == "fewest_refusals":
        fewest = within.sort_values(["refusals", "kl_divergence", "trial"]).iloc[0]
        return Choice(int(fewest["trial"]), f"fewest refusals among the {len(within)} trials with KL <= "
                                            f"{rule.kl_limit} (export_rule = fewest_refusals){counted}")  # fmt: skip
    base = max(rule.base_refusals, 1)
    scored = within.assign(_score=rule.score(within["refusals"], within["kl_divergence"]))
    row = scored.sort_values(["_score", "refusals", "kl_divergence", "trial"]).iloc[0]
    reason = (f"lowest refusals/{base} + KL/{rule.kl_exchange} = {row['_score']:.3f} among the {len(within)} "
              f"trials with KL <= {rule.kl_limit} (export_rule = balanced){counted}")  # fmt: skip
    # Compare with the fewest *counted alike*: an uncounted front trial's short count is only a
    # lower bound, and "2 fewer refusals" read off one would flatter the trial not chosen.
    alike = within[within["counted_long"] == row["counted_long"]]
    fewest = alike.sort_values(["refusals", "kl_divergence", "trial"]).iloc[0]
    if int(fewest["trial"]) != int(row["trial"]):
        reason += (f"; trial {int(fewest['trial'])} has {int(row['refusals'] - fewest['refusals'])} fewer refusals "
                   f"but {fewest['kl_divergence'] / max(row['kl_divergence'], 1e-12):.1f}x the KL "
                   f"({fewest['kl_divergence']:.4f})")  # fmt: skip
    return Choice(int(row["trial"]), reason)


def long_counted(table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The trials a choice is made among, and a note for its reason. When the front's trials were
    counted again with long responses, the choice is among the front's trials by those counts:
    the short count of a trial misses refusals that follow a compliant opening, and the rule must
    not reward that. A front trial left uncounted (`recount_order` proved that the rule could not
    choose it even at its short count, a lower bound) keeps its short count."""
    front = pareto_front(table)
    if "refusals_long" not in table or front.empty or front["refusals_long"].isna().all():
        return table.assign(counted_long=False), ""
    counted = front["refusals_long"].notna()
    note = "; refusals counted with long responses"
    if not counted.all():
        note += f" ({int(counted.sum())} of the front's {len(front)}: the rule could not pick the others)"
    return front.assign(refusals=front["refusals_long"].fillna(front["refusals"]).astype(int),
                        counted_long=counted), note


def recount_order(front: pd.DataFrame, rule: ExportRule) -> list[tuple[int, float]]:
    """The front's trials the rule may pick (KL <= kl_limit), with the lowest score each could
    have with long responses (its short-count score: a longer response only adds refusals), best
    first. Recount them in this order and stop at the first whose bound is above the best exact
    score found: no trial after it can be chosen. (Without a trial within the limit the rule
    takes the lowest-KL one, whatever its count: nothing needs recounting.)"""
    within = front[front["kl_divergence"] <= rule.kl_limit]
    bounds = rule.score(within["refusals"], within["kl_divergence"])
    return sorted(((int(t), float(b)) for t, b in zip(within["trial"], bounds, strict=True)), key=lambda x: x[1])


def choose_best(table: pd.DataFrame, rule: ExportRule) -> int | None:
    choice = choose_trial(table, rule)
    return None if choice is None else choice.trial


def print_front(study: optuna.Study) -> pd.DataFrame:
    table = trials_table(study)
    front = pareto_front(table)
    record = StudyRecord(study)
    base, total = record.base_refusals, record.n_harmful_eval
    print(f"\nPareto front ({len(front)} of {len(table)} trials; unedited model refuses {base}/{total}):")
    if not front.empty:
        print(front.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table


def pick_trial(settings: Settings, study: optuna.Study, table: pd.DataFrame, interactive: bool) -> Choice | None:
    """The trial to export and why: the config's choice, the user's pick, or the export rule's."""
    if settings.export_trial == "none" or table.empty:
        return None
    if isinstance(settings.export_trial, int):
        if settings.export_trial not in set(table["trial"]):
            raise HereticError(f"export_trial: trial {settings.export_trial} is not a completed trial of this study")
        return Choice(settings.export_trial, f"export_trial = {settings.export_trial}")
    choice = choose_trial(table, ExportRule.of(settings, study))
    print(f"Export rule picks trial {choice.trial}: {choice.reason}")
    if not interactive:
        return choice
    while True:
        answer = input(f"Trial to export [{choice.trial}; 'none' to skip]: ").strip() or str(choice.trial)
        if answer == "none":
            return None
        if answer == str(choice.trial):
            return choice
        if answer.isdigit() and int(answer) in set(table["trial"]):
            return Choice(int(answer), "picked at the prompt")
        print(f"'{answer}' is not a completed trial number", file=sys.stderr)
