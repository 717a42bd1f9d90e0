"""Pre-tokenization: an input -> MDS shards with VQ codes and encoder features (see ``run.py``).

    config.py        PretokenizeRunConfig (every run), PretokenizeConfig, the names of the files a run writes
    task.py          PretokenizeTask: what an input kind supplies (items, records, batched encoding)
    conversation.py  conversation JSON -> text-to-image samples (Chameleon VQGAN)
    imagefolder.py   ImageFolder tree -> class-to-image samples (LlamaGen VQ-16), ImageFolderConfig
    items.py         one conversation item: checks, image loading and preprocessing (DataLoader workers)
    writer.py        the MDS writer of one part
    run.py           the whole run: parts over processes, resume, merge, report
"""

from arra_ds.data.pretokenize.config import PretokenizeConfig, PretokenizeError
from arra_ds.data.pretokenize.imagefolder import ImageFolderConfig
from arra_ds.data.pretokenize.run import format_summary, run_pretokenize, run_pretokenize_imagefolder

__all__ = [
    "ImageFolderConfig", "PretokenizeConfig", "PretokenizeError", "format_summary", "run_pretokenize",
    "run_pretokenize_imagefolder",
]
