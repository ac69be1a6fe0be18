"""The import graph of rlcore, read from the source with ``ast`` (nothing here imports the modules it checks).

The layering it pins down:
- the math modules (ops, logprobs, kl, advantages, losses, preference, distillation) depend on torch alone, and ``import rlcore``
  loads only them;
- engines (every other rlcore module) never load the embedded default (rlcore.toy) when imported: the
  names that ask for it ("tiny", "toy:<kind>", the built-in reward names) import it lazily, inside the
  function that resolves them; rlcore.toy itself depends on no engine;
- recipes import only modules that exist, none named after the recipes that use it (no rlcore.online);
- every declared dependency is used, and every third-party import is declared (directly or through a
  declared dependency).
"""

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rlcore"
MATH_MODULES = ("ops", "logprobs", "kl", "advantages", "losses", "preference", "distillation")
RLCORE_MODULES = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")
ENGINE_MODULES = [name for name in RLCORE_MODULES if name not in MATH_MODULES and name != "toy"]
RECIPES = sorted(REPO.glob("recipes/*.py"))
RECIPE_NAMES = [path.stem for path in RECIPES]


@dataclass(frozen=True)
class Import:
    """One imported module as written: ``module`` is absolute (relative imports resolved against rlcore)."""

    module: str
    names: tuple[str, ...]  # the names of ``from module import ...`` (empty for ``import module``)
    relative: bool
    top_level: bool  # runs when the file is imported (module or class body; not a function, not TYPE_CHECKING)
    function: str | None  # the enclosing function of a lazy import
    line: int

    def targets(self) -> set[str]:
        """The modules this import loads: ``from rlcore import toy`` loads rlcore and rlcore.toy."""
        found = {self.module}
        if self.module == "rlcore":
            found |= {f"rlcore.{name}" for name in self.names if (PACKAGE / f"{name}.py").exists()}
        return found


class _Collector(ast.NodeVisitor):
    def __init__(self, package: str | None):
        self.package, self.imports, self.functions, self.type_checking = package, [], [], 0

    def _add(self, node, module: str, names: tuple[str, ...], relative: bool) -> None:
        top_level = not self.functions and not self.type_checking
        self.imports.append(
            Import(module, names, relative, top_level, self.functions[-1] if self.functions else None, node.lineno)
        )

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name, (), False)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        names = tuple(alias.name for alias in node.names)
        if node.level:
            assert node.level == 1 and self.package, f"line {node.lineno}: unexpected relative import"
            module = ".".join(filter(None, [self.package, node.module]))
        else:
            module = node.module
        self._add(node, module, names, bool(node.level))

    def _function(self, node) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        guard = ast.unparse(node.test)
        if guard in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):  # never runs
            self.type_checking += 1
            for child in node.body:
                self.visit(child)
            self.type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)


def imports_of(path: Path) -> list[Import]:
    collector = _Collector("rlcore" if path.parent == PACKAGE else None)
    collector.visit(ast.parse(path.read_text(), filename=str(path)))
    return collector.imports


def module_path(name: str) -> Path:
    return PACKAGE / f"{name}.py"


def top_package(module: str) -> str:
    return module.split(".")[0]


# ---------------------------------------------------------------- (a, b) math modules and the package


@pytest.mark.parametrize("name", MATH_MODULES)
def test_math_module_imports_only_torch_math_and_its_siblings(name):
    imports = imports_of(module_path(name))
    assert any(item.module == "torch" for item in imports)  # the parse sees the imports at all
    for item in imports:  # anywhere in the file, lazy imports included
        sibling = item.relative and item.module.startswith("rlcore.") and item.module.split(".", 1)[1] in MATH_MODULES
        allowed = sibling or top_package(item.module) == "torch" or item.module in ("math", "__future__")
        assert allowed, f"rlcore/{name}.py:{item.line} imports {item.module} ({item.names})"


def test_package_init_imports_only_the_math_modules():
    imports = imports_of(PACKAGE / "__init__.py")
    assert {item.module for item in imports} == {f"rlcore.{name}" for name in MATH_MODULES}
    assert all(item.relative and item.top_level for item in imports)


def test_package_all_is_what_it_imports():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    imported = {
        alias.asname or alias.name for item in tree.body if isinstance(item, ast.ImportFrom) for alias in item.names
    }
    exported = next(
        ast.literal_eval(item.value)
        for item in tree.body
        if isinstance(item, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in item.targets)
    )
    assert set(exported) == imported and len(exported) == len(set(exported))


# ---------------------------------------------------------------- (c) recipes import modules that exist, none named after them


def _exported_by_package() -> set[str]:
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    names = {
        alias.asname or alias.name for item in tree.body if isinstance(item, ast.ImportFrom) for alias in item.names
    }
    return names | {
        target.id
        for item in tree.body
        if isinstance(item, ast.Assign)
        for target in item.targets
        if isinstance(target, ast.Name)
    }


USER_NAMED = {"online", "offline", "recipes", *RECIPE_NAMES}  # modules named after their users, not their contents


@pytest.mark.parametrize("path", [*RECIPES, REPO / "quickstart.py"], ids=lambda path: path.name)
def test_script_imports_existing_rlcore_modules(path):
    exported = _exported_by_package()
    rlcore_imports = [item for item in imports_of(path) if top_package(item.module) == "rlcore"]
    if path.parent.name == "recipes":
        assert rlcore_imports, f"{path.name} imports nothing from rlcore?"
    for item in rlcore_imports:
        where = f"{path.name}:{item.line}"
        assert item.module != "rlcore.online", (
            f"{where}: rlcore.online is gone (its parts live in rlcore.task, rlcore.run, ...)"
        )
        if item.module == "rlcore":  # from rlcore import name: a math function or a submodule
            missing = [name for name in item.names if name not in exported and not module_path(name).exists()]
            assert not missing, f"{where}: rlcore exports no {missing}"
            continue
        name = item.module.split(".")[1]
        assert name not in USER_NAMED, f"{where}: rlcore.{name} is named after its users"
        assert module_path(name).exists(), f"{where}: imports {item.module}, but rlcore/{name}.py does not exist"


def test_no_rlcore_module_is_named_after_its_users():
    assert not USER_NAMED & set(RLCORE_MODULES)


@pytest.mark.parametrize("name", RLCORE_MODULES)
def test_engine_imports_existing_rlcore_modules(name):
    for item in imports_of(module_path(name)):
        for target in item.targets():
            if target.startswith("rlcore."):
                assert module_path(target.split(".")[1]).exists(), f"rlcore/{name}.py:{item.line} imports {target}"


# ---------------------------------------------------------------- (d, e) the embedded default stays out of the engines


def _loads_toy(item: Import) -> bool:
    return "rlcore.toy" in item.targets() or item.module.startswith("rlcore.toy.")


@pytest.mark.parametrize("name", ENGINE_MODULES)
def test_engine_does_not_import_toy_at_top_level(name):
    top = [item for item in imports_of(module_path(name)) if item.top_level and _loads_toy(item)]
    assert not top, (
        f"rlcore/{name}.py:{top[0].line} imports rlcore.toy when imported; import it inside the function that needs it"
    )


def _top_level_graph() -> dict[str, set[str]]:
    """rlcore module -> the rlcore modules it loads when imported (the package __init__ included)."""
    graph = {}
    for name in [*RLCORE_MODULES, "__init__"]:
        path = PACKAGE / f"{name}.py"
        targets = {
            target
            for item in imports_of(path)
            if item.top_level
            for target in item.targets()
            if top_package(target) == "rlcore"
        }
        graph["rlcore" if name == "__init__" else f"rlcore.{name}"] = targets | (
            {"rlcore"} if name != "__init__" else set()
        )
    return graph


@pytest.mark.parametrize("name", ENGINE_MODULES)
def test_importing_an_engine_never_loads_toy(name):
    """Transitively: no chain of top-level imports leads from an engine to rlcore.toy."""
    graph, seen, stack = _top_level_graph(), set(), [f"rlcore.{name}"]
    while stack:
        module = stack.pop()
        if module not in seen:
            seen.add(module)
            stack += sorted(graph.get(module, ()))
    assert "rlcore.toy" not in seen


# the lazy imports that resolve the names asking for the embedded default, where the code has them today
LAZY_TOY_IMPORTS = {"data": "load_rows", "models": "resolve_model", "rewards": "load_reward_function"}


@pytest.mark.parametrize("name, function", LAZY_TOY_IMPORTS.items())
def test_names_of_the_default_are_resolved_by_a_lazy_import(name, function):
    lazy = [item for item in imports_of(module_path(name)) if _loads_toy(item)]
    assert lazy and all(not item.top_level for item in lazy)
    assert function in {item.function for item in lazy}


def test_every_toy_import_of_an_engine_is_inside_a_function():
    for name in ENGINE_MODULES:
        for item in imports_of(module_path(name)):
            if _loads_toy(item):
                assert item.function is not None, f"rlcore/{name}.py:{item.line}"


TOY_THIRD_PARTY = {"datasets", "torch", "tokenizers", "transformers"}  # rows, the model, the tokenizer


def test_toy_imports_no_engine():
    """rlcore.toy builds the task, tokenizer and model from datasets/tokenizers/transformers directly and runs
    the SFT warm start as a subprocess: it needs no rlcore module, at top level or in a function."""
    imports = imports_of(module_path("toy"))
    rlcore_imports = {target for item in imports for target in item.targets() if top_package(target) == "rlcore"}
    assert rlcore_imports == set()
    assert not {"rlcore.data", "rlcore.models", "rlcore.rewards", "rlcore.evaluation"} & rlcore_imports
    third_party = {top_package(item.module) for item in imports if item.top_level} - set(sys.stdlib_module_names)
    assert third_party == TOY_THIRD_PARTY


# ---------------------------------------------------------------- (f) declared dependencies are used, used ones declared

IMPORT_NAMES = {
    "torch": "torch",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "bitsandbytes": "bitsandbytes",
    "einops": "einops",
    "datasets": "datasets",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "pyyaml": "yaml",
    "jinja2": "jinja2",
    "tokenizers": "tokenizers",
    "peft": "peft",
    "trl": "trl",
}
SOURCES = [*sorted(PACKAGE.glob("*.py")), *RECIPES, REPO / "quickstart.py"]


def _project() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _distribution(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0).lower().replace("_", "-")


def _used_packages() -> dict[str, list[str]]:
    """Top-level package -> where it is imported (anywhere in the file, lazy imports included)."""
    used: dict[str, list[str]] = {}
    for path in SOURCES:
        for item in imports_of(path):
            used.setdefault(top_package(item.module), []).append(f"{path.relative_to(REPO)}:{item.line}")
    return used


def test_einops_is_declared_and_used():
    assert "einops" in [_distribution(requirement) for requirement in _project()["dependencies"]]
    assert "einops" in _used_packages()


@pytest.mark.parametrize("requirement", _project()["dependencies"])
def test_declared_dependency_is_imported(requirement):
    distribution = _distribution(requirement)
    assert distribution in IMPORT_NAMES, f"add the import name of {distribution!r} to IMPORT_NAMES"
    assert IMPORT_NAMES[distribution] in _used_packages(), (
        f"{requirement} is declared but imported nowhere in rlcore/, recipes/ or quickstart.py"
    )


def test_third_party_imports_are_declared_or_come_with_a_declared_dependency():
    """What rlcore imports beyond the standard library is a dependency, or a requirement of one (jinja2 comes
    with torch; tokenizers and pyyaml with transformers)."""
    metadata = pytest.importorskip("importlib.metadata")
    declared = {_distribution(requirement) for requirement in _project()["dependencies"]}
    provided = set(declared)
    for distribution in declared:
        try:
            provided |= {
                _distribution(requirement)
                for requirement in metadata.requires(distribution) or ()
                if "extra ==" not in requirement
            }
        except metadata.PackageNotFoundError:
            pytest.skip(f"{distribution} is not installed")
    import_to_distribution = {name: distribution for distribution, name in IMPORT_NAMES.items()}
    extras = {_distribution(r) for name, group in _project()["optional-dependencies"].items() for r in group}
    lazy = _lazy_packages()
    for package, places in _used_packages().items():
        if package in sys.stdlib_module_names or package == "rlcore":
            continue
        distribution = import_to_distribution.get(package, package)
        if distribution in extras and package in lazy and package not in _top_level_packages():
            continue  # an optional extra (a tracker of --report_to), imported only where it is asked for
        assert distribution in provided, (
            f"{package} (imported at {places}) is neither declared nor required by a declared dependency"
        )


def _lazy_packages() -> set[str]:
    return {top_package(item.module) for path in SOURCES for item in imports_of(path) if not item.top_level}


def _top_level_packages() -> set[str]:
    return {top_package(item.module) for path in SOURCES for item in imports_of(path) if item.top_level}
