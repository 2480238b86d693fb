"""``smarter compare``: the argument parser of the variant study."""

from __future__ import annotations

import signal

from foundation import RunInterrupted, RunStopped
from smarter.study.runner import run_study
from smarter.study.settings import StudySettings

DESCRIPTION = """The variant study. Runs each variant config in its own process on the same held-out text
and prompts, measures load time, memory, perplexity, prefill and decode speed, kernel summaries and
quality versus a reference variant (mean KL, top-1 agreement), writes a report with plots, and names
the variant to fine-tune with the command that does it."""


def compare_main(args: list[str]) -> None:
    """``smarter compare [--variants ...] [--overrides "..."] ...``"""
    from jsonargparse import ArgumentParser

    from smarter.errors import condense_parser_error, fail

    class CompareParser(ArgumentParser):
        def error(self, message: str, ex: Exception | None = None):
            fail(f"{condense_parser_error(message)} (see `smarter compare --help`)")

    parser = CompareParser(prog="smarter compare", description=DESCRIPTION)
    parser.add_argument("-c", "--config", action="config", help="A YAML file of these settings.")
    parser.add_class_arguments(StudySettings, as_group=False)
    parsed = parser.parse_args(args)
    known = {key: value for key, value in vars(parsed).items() if key in StudySettings.__dataclass_fields__}

    def stop(signum: int, frame) -> None:  # the runner then takes the running probe down with it
        raise RunInterrupted(
            f"{signal.Signals(signum).name} received: the study stopped; variants measured so far are in "
            "results.json; continue with --resume true",
            signum,
        )

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    summary = run_study(StudySettings(**known))
    print(f"\n[compare] report: {summary.output_dir / 'report.md'}")
    if not any(result.ok for result in summary.results):
        first = summary.results[0]
        raise RunStopped(
            f"every variant failed ({len(summary.results)}; the first, {first.variant}: {first.reason}); the "
            f"report and each variant's log are in {summary.output_dir}"
        )
    if summary.chosen is not None:
        print(f"[compare] chosen: {summary.chosen.variant} ({summary.rule})")
        print(f"[compare] fine-tune it with:\n  {summary.fit_command}")
