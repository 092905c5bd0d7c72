"""The direction of imports, written down once: LAYERS lists the project's packages lowest first, and a module
may import only from its own layer and the layers before it. Every import counts, also one inside a function.

    weights <- models <- settings, errors, lru, ops <- formats <- inputs <- cvat <- schemas <- services
            <- jobs <- api <- app, cli, scale

- `models/` imports nothing from `server/`: the shape vocabulary (models/shapes.py) and the models' own
  configuration (models/config.py, built by Settings.models_config()) live in the lowest package.
- settings, errors (no FastAPI), lru and ops/ are shared by every server layer.
- formats/ is the one place a shape becomes bytes; inputs/ is where bytes come from (images, URLs, object
  storage, video); cvat/ calls CVAT and reads task frames through inputs/ (a task's bucket).
- schemas holds request documents that embed inputs' ImageRef and formats' mask encodings.
- services/ has no FastAPI; its collections.py (a job's Source) lists CVAT tasks' frames, hence above cvat/.
- jobs/ runs on services' collections; api/ is HTTP only; app.py composes, cli/ commands; scale/ runs app.py's
  app in Ray Serve replicas.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS: list[tuple[str, ...]] = [
    ("weights",),
    ("models",),
    ("server.settings", "server.errors", "server.lru", "server.ops"),
    ("server.formats",),
    ("server.inputs",),
    ("server.cvat",),
    ("server.schemas",),
    ("server.services",),
    ("server.jobs",),
    ("server.api",),
    ("server.app", "server.cli", "server.scale"),
]
PACKAGES = ("weights", "models", "server")


def layer_of(module: str) -> int:
    """The layer of the longest prefix of `module` named in LAYERS."""
    best, found = -1, None
    for rank, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), rank
    assert found is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return found


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return found


def test_no_import_goes_against_the_layers() -> None:
    wrong = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for line, name in imports(path):
                if layer_of(name) > layer_of(module):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "imports against the layers (tests/test_layers.py):\n" + "\n".join(sorted(set(wrong)))


def test_the_check_catches_an_upward_import() -> None:
    assert layer_of("server.app") > layer_of("models.registry") >= layer_of("weights.store")
