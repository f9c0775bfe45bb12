"""One export pipeline: a plan says what to build, its stages build it, one commit swaps it in.

Every kind of export is a :class:`Plan`: a merged filter (:mod:`filterserve.export.pipeline`), a
change to a shared-base group or a merged filter's removal (:mod:`filterserve.export.group`). A
new kind of exported model (a stage-1 embedder shared by several filters) is another subclass,
not another pipeline: it says how many steps it runs, builds its models into the staging folder,
and returns the records to write as a :class:`~filterserve.export.staging.Change`. What every
kind shares is run here once, in this order:

- the step counter is set to the plan's total before anything runs (so ``[i/n]`` never passes n);
- a staging folder beside the repository (:func:`~filterserve.export.staging.staging_folder`);
- the plan's build stages, then its write stage, then :func:`~filterserve.export.staging.commit`
  inside that last step: the repository changes only once every check passed;
- the staging folder is removed whatever happened.

The records a plan writes are :mod:`filterserve.manifest`'s typed records, built with
:mod:`filterserve.export.records`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Generic, TypeVar

from filterserve.export.staging import Change, commit, staging_folder
from filterserve.progress import Steps

Built = TypeVar("Built")


class Plan(ABC, Generic[Built]):
    """What one export builds, settled (and refused if wrong) before anything is loaded."""

    @abstractmethod
    def target(self) -> tuple[Path, str]:
        """The repository the change goes into, and the name its staging folder carries (a filter's or
        a group's: exports of different things into one repository may run at once)."""

    @abstractmethod
    def total_steps(self) -> int:
        """Every numbered step the build and the write run, counted from what the plan holds."""

    @abstractmethod
    def build(self, staging: Path, steps: Steps) -> Built:
        """Every stage before the write: load, build into ``staging``, check."""

    @abstractmethod
    def write_label(self) -> str:
        """The last step's label: writing the records and swapping them in."""

    @abstractmethod
    def write(self, staging: Path, built: Built, steps: Steps) -> Change:
        """Complete ``staging`` (configs, copies) and return the records to commit."""

    @abstractmethod
    def written(self, change: Change) -> str:
        """One line for the user once the change is in."""


def execute(plan: Plan[Built], steps: Steps) -> Change:
    """Run ``plan`` in a staging folder and commit it; returns the change as committed."""
    steps.total = plan.total_steps()
    repo, name = plan.target()
    with staging_folder(repo, name) as staging:
        built = plan.build(staging, steps)
        with steps.step(plan.write_label()):
            change = plan.write(staging, built, steps)
            commit(repo, staging, change)
            steps.say(plan.written(change))
    return change
