"""Datasets: the synthetic suite, loaders for the authors' formats, writers, previews.

    from papo.data import load_samples
    result = load_samples("PAPOGalaxy/PAPO_ViRL39K_train")      # or a file, a directory, synthetic:all
    print(result.report.summary())
"""

from papo.data.formats import write_papo_eval, write_papo_train
from papo.data.loaders import ColumnMap, DataError, LoadReport, LoadResult, filter_by_prompt_length, load_samples
from papo.data.sample import PAPO_FORMAT_SUFFIX, Sample, chat_content, format_prompt
from papo.data.synthetic import FAMILIES, SyntheticDataset, dataset_from_spec

__all__ = [
    "FAMILIES", "PAPO_FORMAT_SUFFIX", "ColumnMap", "DataError", "LoadReport", "LoadResult", "Sample", "SyntheticDataset",
    "chat_content", "dataset_from_spec", "filter_by_prompt_length", "format_prompt", "load_samples",
    "write_papo_eval", "write_papo_train",
]
