"""The tree is the architecture: which part may import which (docs/ARCHITECTURE.md, "Packages"), read from the
source itself, and the client's promise to stay light, checked in a fresh interpreter."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
ROOTS = {"engine": "omni2.engine", "stages": "omni2.stages", "kernels": "omni2.kernels"}

# Module prefix -> part. The longest matching prefix wins.
PARTS = {
    "omni2.kernels": "kernels",
    "omni2.stages": "stages",
    "omni2.engine.config": "config",
    "omni2.engine.audio": "audio",
    "omni2.engine.reference": "reference",
    "omni2.engine.checkpoints": "checkpoint readers",
    "omni2.engine.checkpoints.model_writer": "checkpoint writers",
    "omni2.engine.checkpoints.vocoder_writer": "checkpoint writers",
    "omni2.engine.checkpoints.demo": "checkpoint writers",
    "omni2.engine.wire": "wire",
    "omni2.engine.runtime": "runtime",
    "omni2.engine.serve": "serve",
    "omni2.engine.client": "client",
    "omni2.engine.cli": "cli",
}
# Part -> the other parts it may import (its own is always allowed). "cli" may import anything.
ALLOWED = {
    "kernels": set(),
    "config": set(),
    "audio": {"config"},
    "wire": {"config"},
    "checkpoint readers": {"config", "audio"},
    "checkpoint writers": {"config", "audio", "checkpoint readers", "stages"},
    "stages": {"kernels", "config", "audio", "checkpoint readers"},
    "reference": {"stages", "kernels", "config", "audio", "checkpoint readers", "wire"},
    "runtime": {"wire", "stages", "kernels", "config", "audio", "checkpoint readers", "reference"},
    "serve": {"runtime", "wire", "config", "client"},  # the Realtime endpoint is a client of the front door
    "client": {"wire"},
}
# Third-party packages a part must never import, anywhere in its code.
HEAVY = {"torch", "transformers", "triton", "safetensors", "tokenizers"}
FORBIDDEN_PACKAGES = {"client": HEAVY, "wire": HEAVY - {"torch"}, "config": HEAVY, "kernels": {"transformers"}}


def part_of(module: str) -> str | None:
    best = max((p for p in PARTS if module == p or module.startswith(p + ".")), key=len, default=None)
    return PARTS.get(best)


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = [ROOTS[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str, list[str], bool]]:
    """(line, imported module, imported names, under `if TYPE_CHECKING`) for every import in the tree, nested
    ones (inside functions) included; relative imports resolved against `module`."""
    out = []
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((node.lineno, a.name, [], id(node) in typing_only))
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, target] if target else base)
            out.append((node.lineno, target, [a.name for a in node.names], id(node) in typing_only))
    return out


def sources() -> list[Path]:
    return sorted(p for root in ROOTS for p in (REPO / root).rglob("*.py"))


def violations() -> list[str]:
    return [v for path in sources() for v in check_source(path.read_text(), path)]


def check_source(text: str, path: Path) -> list[str]:
    """What is wrong with the imports of `text`, the source of the module at `path` (in the repository)."""
    found = []
    module = module_name(path)
    src = part_of(module)
    for line, target, names, typing_only in imports(ast.parse(text, str(path)), module, path.name == "__init__.py"):
        where = f"{path.relative_to(REPO)}:{line}"
        top = target.split(".")[0]
        if top in FORBIDDEN_PACKAGES.get(src, ()) and not typing_only:
            found.append(f"{where}: {src} imports {target}")
        if not target.startswith("omni2."):
            continue
        private = [n for n in names if n.startswith("_")]
        if private and target != module:
            found.append(f"{where}: imports private names {private} of {target}")
        # `from omni2.engine import cli` names a part through its parent package: judge the part named.
        dsts = {part_of(f"{target}.{n}") for n in names} if target == "omni2.engine" else {part_of(target)}
        for d in dsts:
            if src in ALLOWED and d is not None and d != src and d not in ALLOWED[src]:
                found.append(f"{where}: {src} may not import {d} ({target})")
    return found


def test_every_module_belongs_to_a_part():
    assert [str(p) for p in sources() if part_of(module_name(p)) is None] == [
        str(REPO / "engine/__init__.py")]


def test_parts_import_only_what_the_architecture_allows():
    assert violations() == []


@pytest.mark.parametrize("part,line", [
    ("stages/llm.py", "from omni2.engine.runtime import Engine"),
    ("stages/tts.py", "from omni2.engine.wire import protocol"),
    ("stages/asr.py", "from omni2.engine.serve import front_door"),
    ("kernels/gate_fusion.py", "from omni2.stages.sampling import sample"),
    ("engine/runtime/turns.py", "from omni2.engine.serve.sessions import RequestError"),
    ("engine/client/core.py", "import torch"),
    ("engine/client/sync.py", "from omni2.stages import sampling"),
    ("engine/client/aio.py", "from omni2.kernels.sampling import token_noise"),
    ("engine/checkpoints/model_dir.py", "from omni2.stages.hift import HiFT"),
    ("engine/serve/daemon.py", "from omni2.engine.runtime.engine import _CANCELLED"),
])
def test_a_forbidden_import_is_caught(part, line):
    """The check is not vacuous: each kind of forbidden import, added to a real module, is reported."""
    path = REPO / part
    text = path.read_text()
    assert check_source(text, path) == []
    found = check_source(text + f"\n\ndef _added():\n    {line}\n", path)
    assert len(found) == 1 and line.split()[1] in found[0], found


def test_the_clients_import_without_torch():
    code = ("import sys\n"
            "import omni2.engine.client, omni2.engine.client.aio, omni2.engine.client.sync\n"
            "from omni2.engine.client import AsyncClient, Client\n"
            "from omni2.engine.wire import protocol\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'triton', 'safetensors', 'omni2.stages',\n"
            "                           'omni2.kernels', 'omni2.engine.runtime') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing the client loaded {r.stdout.strip()}"


def test_a_client_can_decode_what_it_receives_without_torch():
    """The wire decodes numpy fields without torch; a torch field arriving at a client is a ProtocolError once
    torch is missing, never an ImportError."""
    code = ("import sys, numpy as np\n"
            "sys.modules['torch'] = None  # as if torch were not installed\n"
            "from omni2.engine.wire import protocol as P\n"
            "from omni2.engine.wire.codec import ProtocolError\n"
            "m = P.decode(P.encode(P.ResponseAudioDelta('s', 0, np.arange(4, dtype=np.int16), 24000, True, 1.0)))\n"
            "assert m.audio.tolist() == [0, 1, 2, 3]\n"
            "frames = [bytes((P.KINDS[P.LlmToTts],)), *P.encode(P.Pong(1, 0.0))[1:]]\n"
            "import msgpack\n"
            "body = msgpack.packb([['s'], [0], [5], ['float32', [1, 2], 0], [False], 0.0])\n"
            "try:\n"
            "    P.decode([frames[0], body, np.zeros(2, np.float32).tobytes()])\n"
            "except ProtocolError as e:\n"
            "    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "torch is not installed" in r.stdout, r.stdout
