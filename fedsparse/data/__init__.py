"""The data layer: every dataset, read or generated, becomes one ``Interactions`` (CSR, rows = users).

``load_dataset(config, seed)`` is the entry point (``load_run_data(run_config)`` when a run may name a
candidate file, ``eval.candidates``); ``DATASETS`` lists what it can load and
``resolve_dataset_dir`` where it looks. Nothing is read or downloaded at import time. May import
only the base modules (``config``, ``rng``, ``run_files``).
"""

from fedsparse.data.errors import DataFormatError, DatasetNotFoundError
from fedsparse.data.interactions import Interactions
from fedsparse.data.load import load_dataset, load_run_data
from fedsparse.data.registry import DATASETS, resolve_dataset_dir

__all__ = ["load_dataset", "load_run_data", "DATASETS", "DataFormatError", "DatasetNotFoundError", "Interactions",
           "resolve_dataset_dir"]
