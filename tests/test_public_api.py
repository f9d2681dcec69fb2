"""The names docs/design.md promises users (its Contracts) are where it says they are."""

import helios_jax as hj


def test_design_contract_names():
    for name in ("load_transformer", "load_vae", "load_text_encoder", "HeliosTransformer", "WanVAE", "UMT5Encoder",
                 "HeliosPipeline", "PromptEncoder", "TransformerConfig", "VAEConfig", "UMT5Config"):
        assert hasattr(hj, name), name
    assert callable(hj.sampling.make_schedule)
    assert callable(hj.models.attention.attention)
    assert callable(hj.HeliosPipeline.from_pretrained) and callable(hj.HeliosPipeline.stream)
    from helios_jax import convert, kernels

    assert callable(convert.load_params) and callable(kernels.flash_attention)
    from helios_jax import step_cache

    assert callable(step_cache.StepCache) and callable(step_cache.read_calibration)


def test_runtime_import_does_not_load_torch():
    import subprocess
    import sys

    code = ("import sys, helios_jax, helios_jax.cli, helios_jax.pipeline; "
            "print('torch' in sys.modules, any(m in sys.modules for m in ('starlette', 'uvicorn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False", "torch, or the serve extra (starlette, uvicorn), is imported at import time"


def import_graph() -> dict[str, set[str]]:
    """helios_jax's modules (``kernels`` and ``convert`` included) and the package modules each imports (at
    the top or in a function), read with ``ast``: ``from a import b`` is an edge to ``a.b`` when that is a
    module, else to ``a``."""
    import ast
    import importlib.util
    import pkgutil

    modules = {"helios_jax": hj.__file__}
    for package in (hj, __import__("helios_jax.convert").convert, __import__("helios_jax.kernels").kernels):
        modules[package.__name__] = package.__file__
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            modules[info.name] = importlib.util.find_spec(info.name).origin

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        edges = set()
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges |= {owner(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                edges |= {owner(f"{base}.{a.name}") for a in node.names}
        graph[name] = {e for e in edges if e and e != name}
    return graph


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"helios_jax.training.stages", "helios_jax.training.stages.dmd", "helios_jax.training.parts"} <= set(graph)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            assert state.get(other) != 1, "import cycle: " + " -> ".join(path[path.index(other):] + [name, other])
            if other not in state:
                visit(other, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_stage_module_imports_another():
    """training/stages/: one module per stage, the registry in its __init__; shared pieces live in training.parts."""
    from helios_jax.training import stages

    graph = import_graph()
    names = {f"helios_jax.training.stages.{m}" for m in ("flow_matching", "pyramid", "ode_regression", "dmd")}
    assert names <= set(graph)
    for name in names:
        assert not graph[name] & (names | {"helios_jax.training.stages"}), name
    assert set(stages.STAGES) == {"stage1", "stage2_packed", "stage2_sequential", "stage3_ode", "stage3_dmd"}
