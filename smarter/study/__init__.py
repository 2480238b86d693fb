"""``smarter compare``: the variant study as a package.

- ``settings``: ``StudySettings``, passed whole (as JSON) to each variant's process;
- ``records``: ``VariantResult``, the typed record every reader uses (report, chooser, plots, TensorBoard);
- ``probe``: measures one variant in its own process;
- ``runner``: runs every variant and writes the results;
- ``chooser``: the decision rule and the fit command for the chosen variant;
- ``report``: every output file (results.csv, report.md, plots, TensorBoard);
- ``command``: the ``smarter compare`` argument parser.
"""

from smarter.study.chooser import choose_best, fit_command
from smarter.study.records import KernelShare, VariantResult
from smarter.study.runner import run_study
from smarter.study.settings import StudySettings

__all__ = ["KernelShare", "StudySettings", "VariantResult", "choose_best", "fit_command", "run_study"]
