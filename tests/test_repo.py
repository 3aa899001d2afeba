"""The README's commands and CI agree."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command.strip() in [line.strip() for line in ci]


def test_readme_starts_with_space_front_matter():
    head = (ROOT / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in head and "app_file: app.py" in head


# docs/CONTRIBUTING.md's layers, in order: a module may import its own layer and the ones before it.
LAYERS = [
    {"turbo", "turbo.errors", "turbo.preprocess", "turbo.deprecated_flags"},
    {"turbo.formats", "turbo.registry", "turbo.download", "turbo.model_source"},
    {"turbo.base", "turbo.skip_vae", "turbo.conv_in", "turbo.lora", "turbo.generator"},
    {"turbo.fast", "turbo.bench"},
    {"turbo.pipeline", "turbo.cli", "turbo.app", "turbo.__main__", "turbo.push", "turbo.model_card"},
    {"training"},
]


def _layer(module: str) -> int:
    """The layer of a module, by the longest listed name it starts with."""
    names = [name for layer in LAYERS for name in layer]
    best = max((n for n in names if module == n or module.startswith(n + ".")), key=len, default=None)
    assert best is not None, f"{module} is in no layer of docs/CONTRIBUTING.md (add it to LAYERS and the doc)"
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def test_imports_go_one_way():
    """Every module-level or function-level import of ours points to its own layer or an earlier
    one (imports under TYPE_CHECKING are for annotations only and may point anywhere)."""
    import ast

    wrong = []
    for path in [*ROOT.glob("turbo/**/*.py"), *ROOT.glob("training/**/*.py")]:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        tree = ast.parse(path.read_text())
        ifs = [n for n in ast.walk(tree) if isinstance(n, ast.If)]
        guards = [n for n in ifs if "TYPE_CHECKING" in ast.unparse(n.test)]
        typing_only = {id(n) for guard in guards for n in ast.walk(guard)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.split(".")[0] in ("turbo", "training") and _layer(name) > _layer(module):
                    wrong.append(f"{module} imports {name}")
    assert not wrong, wrong
