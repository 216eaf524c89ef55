"""``mixmim study``: pretrain every arm of a study under the same budget, evaluate them the same way,
write the report (see :mod:`mixmim.study`).

    mixmim study                          # the CPU profile (about four hours on two cores)
    mixmim study --profile quick          # minutes; what the test suite runs
    mixmim study --arms random mixmim     # a part of the study; the rest later, into the same folder
    mixmim study --reuse docs/study/results.json   # continue a committed study: its rows are not run again
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="cpu",
                        help="configs/study/profiles/<name>.yaml (quick, cpu, gpu) or a path to a profile YAML")
    parser.add_argument("--arms", nargs="*", help="run only these arms (configs/study/arms/<arm>.yaml)")
    parser.add_argument("--output", help="where runs and cached results go (default runs/study-<profile>)")
    parser.add_argument("--report", help="folder for the report (default <output>/report; docs/study for the "
                                         "committed one)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--progress", action="store_true", help="progress bars for every run")
    parser.add_argument("--reuse", nargs="*", default=[], metavar="RESULTS_JSON",
                        help="rows of earlier reports' results.json to take instead of running them again "
                             "(each keeps its commit)")
    parser.add_argument("--report-only", action="store_true", help="write the report from cached results, run nothing")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mixmim.study import Study, load_profile, write_report
    from mixmim.training.logs import setup_logging

    profile = load_profile(args.profile)
    output = Path(args.output or f"runs/study-{profile.name}")
    setup_logging(None, True)
    study = Study(profile, output, args.arms, args.device, progress=args.progress)
    for report in args.reuse:
        print(f"study: {study.reuse(report)} result(s) taken from {report}")
    rows = study.collect() if args.report_only else study.run()
    if getattr(study, "stopped", None):
        print(f"study: stopped by {study.stopped}; {len(rows)} result(s) so far in {output / 'results'}. Resume with "
              f"the same command: {study.command}")
        return 0
    folder = write_report(study, rows, args.report or output / "report")
    print(f"study: {len(rows)} result(s); report in {folder}")
    print((folder / "results.md").read_text())
    return 0
