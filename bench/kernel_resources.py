"""Static resource use of the Triton kernels, compiled ahead of time for a GPU architecture. Needs no GPU.

    python bench/kernel_resources.py                      # sm_90 (H100), bf16, D = 512 and the 7B LM head
    python bench/kernel_resources.py --arch 80 --dims 256,512,768,1024

Compiles each kernel with the launch configuration the library would use (kernels/align_loss.py's
``_launch_config``, kernels/lm_loss.py's tile) and reports the shared memory, registers and spills
(``ptxas -v`` on the generated PTX) and whether the matmuls became Hopper wgmma (``mma v3``) or
mma.sync (``v2``). This is what picked the tile table in kernels/align_loss.py; timings still need
a GPU (bench/align_kernel.py, bench/lm_loss.py).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from arra_ds.kernels import align_loss, lm_loss  # noqa: E402

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int]:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run(
            [str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def _compile(fn, signature: dict, constexprs: dict, num_warps: int, arch: int) -> dict:
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    kernel = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps},
    )
    registers, spills = _ptxas_stats(kernel.asm["ptx"], arch)
    mma = "v3" if "warp_group_dot" in kernel.asm["ttgir"] else ("v2" if "tt.dot" in kernel.asm["ttir"] else "-")
    return dict(shared_kib=kernel.metadata.shared / 1024, registers=registers, spill_bytes=spills, mma=mma)


def align_kernels(dim: int, dtype: torch.dtype, arch: int):
    ptr = _PTR[dtype]
    common = {"sample_idx_ptr": "*i64", "target_ptr": "*fp32", "target_norm_ptr": "*fp32"}
    fwd_sig = {"hidden_ptr": ptr, **common, "fc1_w_ptr": ptr, "fc1_b_ptr": ptr, "fc2_w_ptr": ptr, "fc2_b_ptr": ptr,
               "pre_act_ptr": "*fp32", "cos_ptr": "*fp32", "proj_norm_ptr": "*fp32", "sq_err_ptr": "*fp32",
               "N": "i32", "H": "i32", "D": "i32"}  # fmt: skip
    bwd_sig = {"pre_act_ptr": "*fp32", **common, "fc2_w_ptr": ptr, "fc2_b_ptr": ptr, "cos_ptr": "*fp32",
               "proj_norm_ptr": "*fp32", "row_grad_ptr": "*fp32", "act_ptr": ptr, "grad_proj_ptr": ptr,
               "grad_pre_ptr": ptr, "N": "i32", "D": "i32"}  # fmt: skip
    for name, fn, sig, backward in (
        ("align forward", align_loss._projection_loss_forward_kernel, fwd_sig, False),
        ("align backward", align_loss._projection_loss_backward_kernel, bwd_sig, True),
    ):
        cfg = align_loss._launch_config(dtype, dim, backward=backward)
        num_warps = cfg.pop("num_warps")
        consts = dict(cfg, EPS=align_loss.NORM_EPS, IS_MSE=False)
        if not backward:
            consts["BLOCK_H"] = align_loss.FC1_BLOCK_H
        yield f"{name} D={dim}", cfg["BLOCK_N"], num_warps, _compile(fn, sig, consts, num_warps, arch)


def lm_kernel(vocab: int, dtype: torch.dtype, arch: int):
    sig = {"logits_ptr": _PTR[dtype], "row_stride": "i32", "targets_ptr": "*i64", "lse_ptr": "*fp32", "ce_ptr": "*fp32",
           "num_rows": "i32", "V": "i32", "inv_total_rows": "fp32", "z_loss_weight": "fp32"}  # fmt: skip
    block_v = min(lm_loss.TILE_ELEMENTS, triton.next_power_of_2(vocab))
    consts = dict(WRITE_GRAD=True, BLOCK_ROWS=lm_loss.TILE_ELEMENTS // block_v, BLOCK_V=block_v)
    stats = _compile(lm_loss._row_lse_ce_grad_kernel, sig, consts, lm_loss.NUM_WARPS, arch)
    yield f"lm row kernel V={vocab}", consts["BLOCK_ROWS"], lm_loss.NUM_WARPS, stats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100, 80 = A100)")
    p.add_argument("--dims", default="512", help="comma list of projector widths D")
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = p.parse_args(argv)
    if align_loss.INTERPRETED:
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernels for a GPU")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    print(f"sm_{args.arch}, {args.dtype}, Triton {triton.__version__}\n")
    print("| kernel | rows/program | warps | matmul | shared KiB | registers | spill bytes |")
    print("|---|---:|---:|---|---:|---:|---:|")
    results = [r for d in args.dims.split(",") for r in align_kernels(int(d), dtype, args.arch)]
    results += list(lm_kernel(args.vocab, dtype, args.arch))
    for name, rows, warps, s in results:
        stats = f"{s['mma']} | {s['shared_kib']:.0f} | {s['registers']} | {s['spill_bytes']}"
        print(f"| {name} | {rows} | {warps} | {stats} |")


if __name__ == "__main__":
    main()
