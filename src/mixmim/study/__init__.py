"""``mixmim study``: pretrain every arm of a study under one budget, evaluate every arm the same way, report
what pretraining buys and which design choices matter: :mod:`~mixmim.study.spec` (profiles and arms),
:mod:`~mixmim.study.runner` (running and caching), :mod:`~mixmim.study.statistics` (means, spreads, the
papers' orderings), :mod:`~mixmim.study.report` (the report)."""

from mixmim.study.report import curve_runs, keep_curves, write_report
from mixmim.study.runner import Study
from mixmim.study.spec import METRICS, STUDY_CONFIGS, Arm, Profile, load_arm, load_profile, seeds_of
from mixmim.study.statistics import orderings, summarise

__all__ = ["METRICS", "STUDY_CONFIGS", "Arm", "Profile", "Study", "curve_runs", "keep_curves", "load_arm",
           "load_profile", "orderings", "seeds_of", "summarise", "write_report"]
