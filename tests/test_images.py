"""images/: one Dockerfile per stage image, non-root, pinned, with the project's pins — and every module a
pipeline component imports is installed by the image that component runs in."""

import ast
import importlib.util
import re
import shlex
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PINS = {canonicalize_name(Requirement(r).name): Requirement(r)
        for r in PYPROJECT["dependencies"] + sum(PYPROJECT["optional-dependencies"].values(), [])}
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))


def stage_images() -> dict[str, str]:
    """stage -> image name (`ghcr.io/x/base:0.1.0` -> `base`), from pipelines.images when it exists."""
    try:
        from pipelines.images import STAGE_IMAGES
    except ImportError:
        return {}
    return {stage: ref.rsplit("/", 1)[-1].split(":")[0] for stage, ref in STAGE_IMAGES.items()}


class Install:
    """What a Dockerfile's `pip install` lines put in the image."""

    def __init__(self, path: Path):
        text = re.sub(r"\\\n", " ", path.read_text())
        self.text = text
        self.pins: dict[str, str] = {}
        self.project = self.project_deps = False
        for line in text.splitlines():
            if not line.startswith("RUN"):
                continue
            for cmd in re.split(r"&&|;", line[3:]):
                words = shlex.split(cmd)
                if "pip" in words and "install" in words:
                    self._pip(words[words.index("install") + 1:])

    def _pip(self, args: list[str]) -> None:
        for arg in args:
            if arg in (".", "./") or arg.startswith(".["):
                self.project = True
                self.project_deps |= "--no-deps" not in args
            elif "==" in arg:
                name, version = arg.split("==")
                self.pins[canonicalize_name(name)] = version

    def distributions(self) -> set[str]:
        """Pinned distributions, the project's when installed with deps, and all their requirements."""
        roots = set(self.pins) | ({canonicalize_name(Requirement(r).name) for r in PYPROJECT["dependencies"]}
                                  if self.project_deps else set())
        return _requirement_closure(roots)


def _requirement_closure(roots: set[str]) -> set[str]:
    seen, stack = set(), list(roots)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            if not r.marker or r.marker.evaluate({"extra": ""}):
                stack.append(canonicalize_name(r.name))
    return seen


def test_every_stage_image_has_a_dockerfile():
    names = {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES}
    assert {"base", "train", "eval", "quantize"} <= names
    missing = {stage: image for stage, image in stage_images().items() if image not in names}
    assert not missing, f"stages whose image has no images/<name>.Dockerfile: {missing}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_non_root_and_ships_kfp(dockerfile):
    install = Install(dockerfile)
    (base,) = re.findall(r"^FROM\s+(\S+)", install.text, re.M)
    assert re.search(r":[\w.-]+$", base) and not base.endswith(":latest"), f"{dockerfile.name}: unpinned {base}"
    users = re.findall(r"^USER\s+(\S+)", install.text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name}: runs as root"
    assert install.project, f"{dockerfile.name}: does not install trafficvlm"
    # components are lightweight with install_kfp_package=False: kfp must be in the image
    assert "kfp" in install.distributions(), f"{dockerfile.name}: no kfp"


@pytest.mark.parametrize("name", ["train", "eval", "quantize"])
def test_images_that_torch_compile_on_cuda_carry_a_c_compiler(name):
    """Triton builds its CUDA launcher modules with the system C compiler on the first torch.compile; the
    slim Python base has none, and these stages compile by default on CUDA (vision blocks, eval's text step)."""
    text = (IMAGES / f"{name}.Dockerfile").read_text()
    apt = " ".join(re.findall(r"apt-get install[^\n]*(?:\\\n[^\n]*)*", text))
    assert re.search(r"\bgcc\b", apt) and "libc6-dev" in apt, f"{name}.Dockerfile installs no C compiler"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pins_equal_the_project_pins(dockerfile):
    for name, version in Install(dockerfile).pins.items():
        if name in PINS:
            assert str(PINS[name].specifier) == f"=={version}", (
                f"{dockerfile.name}: {name}=={version} but pyproject.toml says {PINS[name]}")


def _components() -> dict[str, tuple[str, set[str]]]:
    """component name -> (stage key of STAGE_IMAGES, trafficvlm/pipelines modules its body imports)."""
    path = REPO / "pipelines" / "components.py"
    if not path.is_file():
        return {}
    out = {}
    for fn in ast.parse(path.read_text()).body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for deco in fn.decorator_list:
            image = next((kw.value for kw in getattr(deco, "keywords", []) if kw.arg == "base_image"), None)
            if isinstance(image, ast.Subscript) and isinstance(image.slice, ast.Constant):
                out[fn.name] = (image.slice.value, {m for m in _imports(fn) if m.split(".")[0] == "trafficvlm"})
    return out


def _imports(tree: ast.AST, all_levels: bool = True) -> set[str]:
    nodes = ast.walk(tree) if all_levels else getattr(tree, "body", [])
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def third_party_imports(modules: set[str]) -> set[str]:
    """Top-level third-party imports of `modules` (every import in them, since the stage calls into them)
    and of the project modules they reach (module-level imports only: those always run)."""
    found, seen = set(), set()
    stack = [(m, True) for m in modules]
    while stack:
        name, all_levels = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        for imp in _imports(ast.parse(Path(spec.origin).read_text()), all_levels):
            top = imp.split(".")[0]
            if top in ("trafficvlm", "pipelines"):
                stack.append((imp, False))
            elif top not in sys.stdlib_module_names:
                found.add(top)
    return found


COMPONENTS = _components()


@pytest.mark.skipif(not COMPONENTS or not stage_images(), reason="pipelines/components.py not written yet")
@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_component_imports_are_installed_in_its_image(component):
    stage, modules = COMPONENTS[component]
    unwritten = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    if unwritten:
        pytest.skip(f"component {component} calls {unwritten}, not written yet")
    image = stage_images()[stage]
    provided = Install(IMAGES / f"{image}.Dockerfile").distributions()
    dists = metadata.packages_distributions()
    missing = {}
    for module in third_party_imports(modules):
        names = {canonicalize_name(d) for d in dists.get(module, [module])}
        if not names & provided:
            missing[module] = sorted(names)
    assert not missing, f"component {component} runs in images/{image}.Dockerfile, which lacks {missing}"


def test_every_component_names_a_mapped_stage_image():
    """Every pipeline step, the late ones included, runs in an image that STAGE_IMAGES maps."""
    assert {"ingest", "prepare", "sft", "evaluate", "quantize", "promote", "rollout", "smoke", "start_tracking",
            "finish_tracking"} <= set(COMPONENTS)
    unmapped = {name: stage for name, (stage, _) in COMPONENTS.items() if stage not in stage_images()}
    assert not unmapped, f"components whose base_image key is not in pipelines.images.STAGE_IMAGES: {unmapped}"
