"""arra_ds: DeepSpeed ZeRO-3 trainer for ARRA (Autoregressive Representation Alignment).

The pins below form one set that installs together on Python 3.11: mosaicml-streaming 0.13 needs
transformers<5 and numpy<2.2, and torch 2.14.1 pulls triton 3.8.0.
"""

from setuptools import find_packages, setup

install_requires = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "triton==3.8.0",
    "deepspeed==0.19.8",
    "transformers==4.57.6",
    "accelerate==1.15.0",  # transformers needs it for HfDeepSpeedConfig (ZeRO-3 zero.Init loading)
    "tokenizers==0.22.2",
    "safetensors==0.8.0",
    # LoRA (model.trainable=lora, arra_ds/model/trainable.py); 0.21 still supports transformers 4.57
    "peft==0.21.2",
    "mosaicml-streaming==0.13.0",
    "numpy==2.1.3",
    "pillow==13.0.0",
    "pyyaml==6.0.3",
    # Feature encoders (BiomedCLIP / CLIP image towers); the built-in demo data set uses a tiny one.
    "open_clip_torch==3.3.0",
    "timm==1.0.31",
    "tqdm==4.70.1",
    "tensorboard==2.21.0",
    # Evaluation is part of training (train.eval_every) and of launch/eval.py, not an extra: FID's
    # matrix square root and MS-SSIM. The FID feature network for X-rays (torchxrayvision) is an extra.
    "scipy==1.17.1",
    "pytorch-msssim==1.0.0",
    # The study's report figures (launch/study.py: curves.png, samples.png); streaming needs it too.
    "matplotlib==3.11.2",
]

extras_require = {
    # The X-ray FID feature network (torchxrayvision's DenseNet-121), for extractors=[xrv].
    "eval": ["torchxrayvision==1.5.7"],
    # Liger-Kernel: the baseline that bench/lm_loss.py and tests/test_kernels.py compare our kernels/ with.
    "kernels": ["liger-kernel==0.8.5"],
    # GPU-only: flash attention 2 (needs a CUDA toolchain to build).
    "gpu": ["flash-attn>=2.6.3"],
    # Parquet caption tables for launch/pretokenize.py (input=captions.parquet); .jsonl / .csv need nothing.
    "parquet": ["pyarrow==26.0.1"],
    "test": ["pytest==9.2.0"],
}
extras_require["dev"] = extras_require["eval"] + extras_require["kernels"] + extras_require["parquet"] + extras_require["test"]

setup(
    name="arra_ds",
    version="0.1.0",
    description="Distributed ARRA training for autoregressive text-to-image LLMs (Chameleon, Lumina-mGPT)",
    python_requires=">=3.10",
    # arra_ds/kernels is a link to the top-level kernels/ folder (the design card keeps it there)
    packages=find_packages(include=["arra_ds", "arra_ds.*"]),
    include_package_data=True,
    install_requires=install_requires,
    extras_require=extras_require,
)
