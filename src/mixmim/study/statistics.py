"""The study's arithmetic: each arm's mean and sample standard deviation per metric, and whether the
orderings the papers report (MixMIM Tables 6, 7, 10; pretraining over random initialisation) hold,
measured against the spread of the seeds."""

from __future__ import annotations

import math
from typing import Any

from mixmim.study.spec import METRICS


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """arm -> metric -> {mean, std (sample, ddof 1; 0 for one seed), n, seconds}."""
    table: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        table.setdefault(r["arm"], {}).setdefault(r["metric"], []).append(r)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arm, metrics in table.items():
        for metric, items in metrics.items():
            values = [float(i["value"]) for i in items]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            out.setdefault(arm, {})[metric] = {"mean": mean, "std": std, "n": len(values),
                                               "pretrain_seconds": sum(i.get("pretrain_seconds", 0.0) for i in items)
                                               / len(items)}
    return out


# Orderings the papers report, as (table, tiers from better to worse); a tuple is a tier of arms the
# paper ties (MixMIM Table 6: zero and learnable both 84.1).
PAPER_ORDERINGS: list[tuple[str, list[str | tuple[str, ...]]]] = [
    ("MixMIM Table 6 (filling)", ["mixmim", ("mixmim_zero", "mixmim_learnable"), "mixmim_zoomin", "mixmim_shuffle"]),
    ("MixMIM Table 7 (dual reconstruction)", ["mixmim", "mixmim_single"]),
    ("MixMIM Table 10 (how the encoder tells images apart)", ["mixmim", "mixmim_mix_embedding",
                                                               "mixmim_no_unmixing"]),
    ("pretraining pays", ["mixmim", "random"]),
    ("pretraining pays (MAE)", ["mae", "random"]),
]


def _verdict(better: dict[str, float], worse: dict[str, float], yardstick: float) -> str:
    spread = max(better["std"], worse["std"])
    if min(better["n"], worse["n"]) < 2:  # a one-seed arm's spread is unknown, not zero
        spread = max(spread, yardstick)
    gap = better["mean"] - worse["mean"]
    return "holds" if gap > spread else "reversed" if -gap > spread else "within spread"


def orderings(summary: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """For each paper ordering and metric, over the arms that ran (at least two tiers): does each pair
    of arms in neighbouring tiers keep the paper's order by more than the larger of the two spreads
    (``holds``), reverse it by more (``reversed``), or neither (``within spread``)? An arm with one
    seed has no spread of its own: it is given the largest spread of the arms with several seeds on
    that metric (the yardstick). Arms of one tier are not compared with each other."""
    out = []
    for table, order in PAPER_ORDERINGS:
        for metric in METRICS:
            yardstick = max((cells[metric]["std"] for cells in summary.values()
                             if metric in cells and cells[metric]["n"] > 1), default=0.0)
            tiers = [[a for a in ((t,) if isinstance(t, str) else t) if metric in summary.get(a, {})]
                     for t in order]
            tiers = [t for t in tiers if t]
            if len(tiers) < 2:
                continue
            pairs = [(b, w) for upper, lower in zip(tiers, tiers[1:]) for b in upper for w in lower]
            verdicts = [_verdict(summary[b][metric], summary[w][metric], yardstick) for b, w in pairs]
            out.append({"table": table, "metric": metric, "order": " > ".join(" = ".join(t) for t in tiers),
                        "pairs": [f"{b} > {w}" for b, w in pairs], "verdicts": verdicts,
                        "yardstick": yardstick})
    return out
