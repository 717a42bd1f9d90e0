"""`pip install -e .` without extras must be enough for every launcher (the README's main command)."""

import ast
import importlib.metadata
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, subprocess_env

LAUNCHERS = ["train.py", "generate.py", "eval.py", "fid_stats.py", "pretokenize.py", "export_hf.py",
             "pretokenize_imagefolder.py", "eval_c2i.py"]


def _extras_modules() -> list[str]:
    """Top-level modules of every distribution that setup.py lists only under an extra."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    extras = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "extras_require" for t in node.targets))
    installed = importlib.metadata.packages_distributions()  # module -> [distributions]
    modules = set()
    for requirement in (r for group in extras.values() for r in group):
        dist = requirement.split("=")[0].split(">")[0].split("<")[0].strip().lower().replace("_", "-")
        found = {m for m, dists in installed.items() if any(d.lower().replace("_", "-") == dist for d in dists)}
        modules |= found or {dist.replace("-", "_")}  # not installed here (flash-attn): its usual module name
    return sorted(m for m in modules if not m.startswith("_"))


def test_extras_are_known():
    modules = _extras_modules()
    assert {"torchxrayvision", "liger_kernel", "pytest", "flash_attn"} <= set(modules)


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launchers_import_without_the_extras(script):
    blocked = [m for m in _extras_modules() if m != "pytest"]
    # sys.modules[name] = None makes `import name` raise ImportError, as if it were not installed.
    code = (f"import sys, runpy; sys.modules.update(dict.fromkeys({blocked!r})); "
            f"runpy.run_path({str(REPO_ROOT / 'launch' / script)!r}, run_name='not_main')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"launch/{script} needs an optional dependency to start:\n{proc.stderr[-3000:]}"
