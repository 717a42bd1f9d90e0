"""Pre-tokenization: conversation JSON -> MDS shards with tokens and encoder features (see ``run.py``).

    config.py   PretokenizeConfig and the names of the files a run writes
    items.py    one input item: checks, image loading and preprocessing (DataLoader workers)
    writer.py   the models (VQGAN, encoders, tokenizer) and the MDS writer of one part
    run.py      the whole run: parts over processes, resume, merge, report
"""

from arra_ds.data.pretokenize.config import PretokenizeConfig, PretokenizeError
from arra_ds.data.pretokenize.run import format_summary, run_pretokenize

__all__ = ["PretokenizeConfig", "PretokenizeError", "format_summary", "run_pretokenize"]
