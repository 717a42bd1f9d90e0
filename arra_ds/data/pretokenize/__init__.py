"""Pre-tokenization: an input -> MDS shards with VQ codes and encoder features (see ``run.py``).

    config.py        PretokenizeRunConfig (every run), PretokenizeConfig, TableConfig, the names of the files a run writes
    sources.py       the text-to-image inputs (conversation JSON, caption table, image + .txt pairs, WebDataset
                     shards) and how input_format=auto picks one
    task.py          PretokenizeTask: what an input kind supplies (items, records, batched encoding)
    conversation.py  any text-to-image input -> text-to-image samples (Chameleon VQGAN)
    imagefolder.py   ImageFolder tree -> class-to-image samples (LlamaGen VQ-16), ImageFolderConfig
    janus.py         conversation JSON -> text-to-image samples in Janus-Pro's layout (its VQ), JanusPretokenizeConfig
    items.py         one text-to-image item: checks, image loading and preprocessing (DataLoader workers)
    writer.py        the MDS writer of one part
    run.py           the whole run: parts over processes, resume, merge, report
    dryrun.py        validate=true: every item read and checked, counts and estimates, nothing written
"""

from arra_ds.data.pretokenize.config import PretokenizeConfig, PretokenizeError, TableConfig
from arra_ds.data.pretokenize.dryrun import format_dry_run, validate_pretokenize
from arra_ds.data.pretokenize.imagefolder import ImageFolderConfig
from arra_ds.data.pretokenize.janus import JanusPretokenizeConfig
from arra_ds.data.pretokenize.run import (
    format_summary,
    run_pretokenize,
    run_pretokenize_imagefolder,
    run_pretokenize_janus,
)

__all__ = [
    "ImageFolderConfig", "JanusPretokenizeConfig", "PretokenizeConfig", "PretokenizeError", "TableConfig",
    "format_dry_run", "format_summary", "run_pretokenize", "run_pretokenize_imagefolder", "run_pretokenize_janus",
    "validate_pretokenize",
]
