"""No code execution from files: a scan of the library's source for loaders that can run code.

Every ``.py`` under hbc/ ir/ frontend/ passes/ backend/ runtime/ models/ is parsed (``ast``)
and must not:

- import pickle, cPickle, dill, cloudpickle, joblib, shelve or marshal;
- call ``np.load`` / ``numpy.load`` / ``np.lib.format.read_array`` without a literal
  ``allow_pickle=False``;
- call ``torch.load`` without a literal ``weights_only=True``, or ``torch.jit.load``;
- call ``yaml.load`` / ``yaml.unsafe_load`` / ``yaml.full_load`` (``yaml.safe_load`` is fine);
- call the builtins ``eval`` or ``exec``, or ``compile(..., "exec"/"eval")``;
- call ``os.system`` / ``os.popen`` or run subprocesses;
- import code dynamically (``importlib``, ``__import__``, or native code with ``ctypes``),
  except in the files listed in DYNAMIC_IMPORTS: lazy imports of fixed internal module names,
  hbc's own compiled kernels, and the ``module:function`` MODEL form, whose whole point is to
  run the user's Python (docs/guarantees.md).

The scanner is tested on snippets that must be flagged, so it cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hbc", "ir", "frontend", "passes", "backend", "runtime", "models")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                  "marshal", "subprocess"}
#: file -> why it may import code dynamically
DYNAMIC_IMPORTS = {
    "hbc/__init__.py": "lazy attributes: import_module(f'hbc.{name}') of fixed internal names",
    "hbc/quant/__init__.py": "lazy attributes of its own submodules",
    "models/__init__.py": "the zoo table names its own submodules",
    "frontend/torch_import.py": "MODEL 'module:function' runs the user's Python by design",
    "ir/native.py": "ctypes loads hbc's own compiled kernels (hbc.ir._qkernels), a fixed name",
    "ir/atomic.py": "ctypes calls the C library's linkat for O_TMPFILE (no code from files)",
}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kwarg_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
               for k in call.keywords)


def problems_in(source: str, relpath: str) -> list[str]:
    """Every unsafe loader in ``source`` as ``relpath:line: what``."""
    out = []
    dynamic_ok = relpath in DYNAMIC_IMPORTS
    numpy_names = {"np", "numpy"}
    for node in ast.walk(ast.parse(source)):
        where = f"{relpath}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""]
            for mod in mods:
                top = mod.split(".")[0]
                if top in UNSAFE_MODULES:
                    out.append(f"{where}: imports {mod}")
                if top in ("importlib", "ctypes") and not dynamic_ok:
                    out.append(f"{where}: imports {mod} (dynamic code loading)")
            if isinstance(node, ast.ImportFrom) and node.module in ("numpy", "numpy.lib.format"):
                if any(a.name in ("load", "read_array") for a in node.names):
                    out.append(f"{where}: imports numpy's loader by name (call it as np.load "
                               "with allow_pickle=False)")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, last = name.rpartition(".")
        if name in ("eval", "exec"):
            out.append(f"{where}: calls {name}()")
        elif name == "compile" and len(node.args) >= 3 and isinstance(node.args[2], ast.Constant) \
                and node.args[2].value in ("exec", "eval", "single"):
            out.append(f"{where}: compiles code")
        elif name == "__import__" and not dynamic_ok:
            out.append(f"{where}: calls __import__")
        elif head.split(".")[0] in numpy_names and last in ("load", "read_array") \
                and not _kwarg_is(node, "allow_pickle", False):
            out.append(f"{where}: {name} without allow_pickle=False")
        elif name == "torch.load" and not _kwarg_is(node, "weights_only", True):
            out.append(f"{where}: torch.load without weights_only=True")
        elif name == "torch.jit.load":
            out.append(f"{where}: torch.jit.load runs TorchScript from a file")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            out.append(f"{where}: {name} (use yaml.safe_load)")
        elif name in ("os.system", "os.popen") or name.startswith("os.exec") \
                or name.startswith("os.spawn"):
            out.append(f"{where}: {name} runs a command")
    return out


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 100, "the scan found too few files: wrong root?"
    return files


def test_no_unsafe_loaders_in_the_library():
    problems = []
    for path in _sources():
        problems += problems_in(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not problems, "unsafe loaders:\n  " + "\n  ".join(problems)


def test_dynamic_import_exceptions_exist():
    """Every allowed file exists (a stale entry would hide a moved loader)."""
    for rel in DYNAMIC_IMPORTS:
        assert (ROOT / rel).exists(), rel


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.loads(b'')",
    "from pickle import load",
    "import marshal",
    "import dill",
    "import numpy as np\nnp.load('x.npy')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import numpy\nnumpy.load(f, mmap_mode='r')",
    "import numpy as np\nnp.lib.format.read_array(f)",
    "from numpy import load",
    "import torch\ntorch.load('m.pt')",
    "import torch\ntorch.load('m.pt', weights_only=False)",
    "import torch\ntorch.jit.load('m.pt')",
    "import yaml\nyaml.load(text)",
    "eval(text)",
    "exec(code)",
    "compile(text, 'f', 'exec')",
    "import os\nos.system('ls')",
    "import subprocess",
    "import importlib\nimportlib.import_module(name)",
    "import ctypes\nctypes.CDLL(path)",
    "__import__(name)",
])
def test_the_scanner_flags_unsafe_code(snippet):
    assert problems_in(snippet, "ir/example.py"), snippet


@pytest.mark.parametrize("snippet", [
    "import numpy as np\nnp.load(p, allow_pickle=False)",
    "import torch\ntorch.load(p, weights_only=True)",
    "import yaml\nyaml.safe_load(text)",
    "model.eval()",
    "import json\njson.loads(text)",
    "import ast\nast.literal_eval(text)",
])
def test_the_scanner_accepts_safe_code(snippet):
    assert not problems_in(snippet, "ir/example.py"), snippet
