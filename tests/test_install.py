"""`pip install -e .` without extras must be enough for every launcher (the README's main command)."""

import ast
import importlib.metadata
import subprocess
import sys

from conftest import REPO_ROOT, subprocess_env

LAUNCHERS = sorted((REPO_ROOT / "launch").glob("*.py"))  # every entry point, new ones included


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


def test_launchers_import_without_the_extras():
    """Every launcher's module runs (as an import, not as __main__) with the extras made unimportable;
    one interpreter for all of them (an interpreter start costs more than the imports it checks)."""
    assert len(LAUNCHERS) >= 8, LAUNCHERS
    blocked = [m for m in _extras_modules() if m != "pytest"]
    # sys.modules[name] = None makes `import name` raise ImportError, as if it were not installed.
    code = (
        "import runpy, sys, traceback\n"
        f"sys.modules.update(dict.fromkeys({blocked!r}))\n"
        "failed = []\n"
        f"for script in {[str(p) for p in LAUNCHERS]!r}:\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='not_main')\n"
        "    except Exception:\n"
        "        failed.append(script)\n"
        "        traceback.print_exc()\n"
        "print('FAILED', *failed)\n"
        "sys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"launchers that need an optional dependency to start:\n{proc.stdout[-500:]}\n{proc.stderr[-4000:]}"
