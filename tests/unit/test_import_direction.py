"""Imports go one way: the HTTP front and the stages share a vocabulary, and neither imports the other.

`serve/` holds two things. The vocabulary (config, API schema, errors, the
messages between stages, checkpoint files, chat template, the byte-bounded LRU,
the quota ledger's state) is what every side uses, and imports neither side.
The HTTP front (ingress, responses, grammar, sampling) and the stages
(`deployments/`) each import the vocabulary and not each other; only the app
builder and the CLI, which assemble the application, import `deployments/`.
Autoscaling policies import neither side.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PACKAGES = ("serve", "deployments", "autoscaling")
VOCABULARY = (
    "serve.config",
    "serve.layouts",
    "serve.errors",
    "serve.protocol",
    "serve.messages",
    "serve.metrics",
    "serve.checkpoint",
    "serve.chat_template",
    "serve.demo_checkpoint",
    "serve.byte_budget_lru",
    "serve.quotas",
)
ASSEMBLERS = ("serve.app", "serve.cli")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions, `from x import y` as x.y too."""
    package = module_name(path, root).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = (package or module_name(path, root)).split(".")
                base = ".".join([*anchor[: len(anchor) - node.level + 1], *filter(None, [base])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def violations(root: Path) -> list[str]:
    """`importer imports imported: why` for every import against the direction."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            importer = module_name(path, root)
            reported: list[str] = []
            for imported in sorted(imported_modules(path, root)):
                why = _forbidden(importer, imported)
                # `from deployments.decoder import Decoder` is one finding, not two.
                if why and not within(imported, tuple(reported)):
                    reported.append(imported)
                    found.append(f"{importer} imports {imported}: {why}")
    return found


def _forbidden(importer: str, imported: str) -> str | None:
    if within(importer, VOCABULARY):
        if within(imported, ("deployments",)) or (
            within(imported, ("serve",)) and imported != "serve" and not within(imported, VOCABULARY)
        ):
            return "the shared vocabulary imports neither the HTTP front nor the stages"
        return None
    to_stages = within(imported, ("deployments",))
    to_front = within(imported, ("serve",)) and imported != "serve" and not within(imported, VOCABULARY)
    if within(importer, ("deployments",)) and to_front:
        return "a stage imports only the shared vocabulary of serve/"
    if within(importer, ("serve",)) and to_stages and not within(importer, ASSEMBLERS):
        return "inside serve/ only the app builder and the CLI import deployments/"
    if within(importer, ("autoscaling",)) and (to_stages or to_front):
        return "autoscaling policies import neither the HTTP front nor the stages"
    return None


def test_the_source_imports_one_way():
    assert violations(ROOT) == []


def test_the_vocabulary_exists_as_named():
    for module in (*VOCABULARY, *ASSEMBLERS):
        path = ROOT / Path(*module.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), module


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for package in PACKAGES:
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").touch()
    for name, source in files.items():
        (root / name).write_text(source)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"deployments/decoder.py": "def f():\n    from serve.ingress import Ingress\n"},
            "deployments.decoder imports serve.ingress: a stage imports only the shared vocabulary",
        ),
        (
            {"deployments/encoder.py": "from serve import chat\n"},
            "deployments.encoder imports serve.chat: a stage",
        ),
        (
            {"serve/messages.py": "from deployments.decoder import Decoder\n"},
            "serve.messages imports deployments.decoder: the shared vocabulary",
        ),
        (
            {"serve/checkpoint.py": "import serve.sampling\n"},
            "serve.checkpoint imports serve.sampling: the shared vocabulary",
        ),
        (
            {"serve/chat.py": "from deployments.messages import DecodeChunk\n"},
            "serve.chat imports deployments.messages: inside serve/ only the app builder",
        ),
        (
            {"autoscaling/policy.py": "from deployments.decoder import Decoder\n"},
            "autoscaling.policy imports deployments.decoder: autoscaling policies",
        ),
        (
            {"deployments/sub.py": "from .decoder import x\nfrom ..serve import ingress\n"},
            "deployments.sub imports serve.ingress: a stage",
        ),
    ],
)
def test_an_import_against_the_direction_is_named(tmp_path, files, expected):
    found = violations(write_tree(tmp_path, files))
    assert any(line.startswith(expected) for line in found), found


def test_imports_along_the_direction_pass(tmp_path):
    tree = write_tree(
        tmp_path,
        {
            "deployments/decoder.py": "from serve.messages import DecodeChunk\nimport serve.protocol.chat\n",
            "serve/app.py": "from deployments.decoder import Decoder\n",
            "serve/ingress.py": "from serve.chat_template import ChatTemplate\n",
            "serve/chat_template.py": "from serve.checkpoint import Checkpoint\nfrom serve import config\n",
            "autoscaling/policy.py": "from serve.config import AppConfig\n",
        },
    )
    assert violations(tree) == []
