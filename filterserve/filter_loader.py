"""Where a filter description comes from: built in, a description file, a filter record, a
repository or a production filter folder.

Its own module, apart from :mod:`filterserve.filters` (what a description is) and
:mod:`filterserve.filter_folder` (how a production folder becomes one), because it dispatches to
both: the folder reader builds on the description, so the description must not import the
folder reader back.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from filterserve.errors import FilterServeError
from filterserve.filter_folder import is_filter_folder, read_filter_folder
from filterserve.filters import UPLIFTING_V4, FilterSpec
from filterserve.manifest import read_filter_record, read_json


def load_filter(path: str | Path | None, name: str | None = None, *, stream: TextIO | None = None) -> FilterSpec:
    """A filter description: ``None`` is uplifting v4; a folder is a filter folder as it ships
    (config.yaml / base_scorer.py, see :mod:`filterserve.filter_folder`; every disagreement between
    its files is written to ``stream``, stderr by default) or a model repository (its filter
    ``name``, which may be left out when it holds one); a file is a description or a filter record."""
    if path is None:
        return UPLIFTING_V4
    p = Path(path)
    if p.is_dir():
        if is_filter_folder(p):
            folder = read_filter_folder(p)
            out = sys.stderr if stream is None else stream
            for line in folder.report():
                print(line, file=out)
            return folder.spec
        return FilterSpec.from_dict(read_filter_record(p, name).filter, source=f"the record of {name or 'the filter'} in {p}")
    data = read_json(p, "filter description")
    if isinstance(data, dict) and "filter" in data and "dimensions" not in data:
        data = data["filter"]  # a filter record (<name>.filter.json) also works as a description
    if not isinstance(data, dict):
        raise FilterServeError(f"filter description {p} must be a JSON object")
    return FilterSpec.from_dict(data, source=f"filter description {p}")
