"""The package's shape, as the engine's docs draw it (docs/engine.md): no import circle among collocate's
modules, the loop small and free of mode branches (those live in the rule objects, modes.py), and every
decoding option declared once in DecodeConfig."""
import ast
import inspect
import re
from dataclasses import fields
from pathlib import Path

import collocate
from collocate.decode import Decoder
from collocate.options import DecodeConfig

PACKAGE = Path(collocate.__file__).parent


def module_imports() -> dict[str, set[str]]:
    """collocate module -> the collocate modules it imports at module level (not inside functions)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                deps.add(target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("collocate"))
        graph[name] = deps
    return graph


def test_no_import_circle():
    graph = module_imports()
    assert "collocate.decode" in graph and "collocate.modes" in graph
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for dep in graph.get(node, ()):
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join(path + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_loop_is_small_and_knows_no_mode():
    source = inspect.getsource(Decoder)
    assert len(source.splitlines()) <= 150
    outside_rules = [p for p in PACKAGE.rglob("*.py") if p.name not in ("modes.py", "options.py")]
    for path in outside_rules:  # no `mode == ...` / `plan.verify` style branches outside the rule objects
        text = path.read_text()
        hits = re.findall(r"\b(?:cfg|plan|spec|rule|self)\.(?:mode\s*(?:==|!=|in\b)|verify\b)", text)
        assert not hits, (path.name, hits)


def test_each_decoding_option_is_declared_once():
    """cli.py, serve.py and bench.py derive DecodeConfig's options (command-line options, request fields,
    bench mode names) from its fields: none declares an option again, and each derived set is whole."""
    from collocate.cli import parser
    from collocate.options import api_fields, flag_of
    from collocate.serve import Options

    for name in ("cli.py", "serve.py", "bench.py"):
        text = (PACKAGE / name).read_text()
        for f in fields(DecodeConfig):
            assert f'add_argument("{flag_of(f)}"' not in text, (name, f.name)  # an option written out again
            if (name, f.name) != ("bench.py", "max_new_tokens"):  # (BenchConfig records the run's answer length
                # at the top of results.json, where the tables read it; the option itself is derived)
                assert not re.search(rf"^\s+{f.name}\s*:", text, re.M), (name, f.name)  # a field declared again
        assert '"verify-t' not in text  # the bench's mode names are parsed in one place (options.spec_options)
    generate = next(a for a in parser()._subparsers._group_actions[0].choices.items() if a[0] == "generate")[1]
    dests = {a.dest for a in generate._actions}
    assert {f.name for f in fields(DecodeConfig)} <= dests  # every option, derived
    assert set(api_fields()) <= set(Options.model_fields)
