"""The examples in the docstrings run and print what they say."""

import doctest

import pytest

import importlib
import pkgutil

import lowbit

# Every module of the package, subpackages included (lowbit.nas.search, lowbit.models.qat, ...):
# an example lives beside the code it shows, wherever the code moves.
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(lowbit.__path__, "lowbit.") if m.name != "lowbit._lowbit"
)
# The public modules, each of which shows how it is used.
PUBLIC = {"lowbit._quant", "lowbit._gguf", "lowbit.bitnet", "lowbit.calib", "lowbit.crossval", "lowbit.data", "lowbit.demo", "lowbit.export",
          "lowbit.models", "lowbit.nas", "lowbit.ptq", "lowbit.runtime", "lowbit.torch"}


def test_every_module_is_walked():
    assert PUBLIC <= set(MODULES)


@pytest.mark.parametrize("name", ["lowbit", *MODULES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    r = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert r.failed == 0
    if name in PUBLIC or name == "lowbit":
        assert r.attempted > 0, f"{name} has no docstring example"


def test_stub_examples():
    import ast
    import pathlib

    stub = pathlib.Path(lowbit._lowbit.__file__).with_name("_lowbit.pyi")
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for node in ast.walk(ast.parse(stub.read_text())):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
            test = doctest.DocTestParser().get_doctest(ast.get_docstring(node), {}, node.name, str(stub), node.lineno)
            runner.run(test)
    r = runner.summarize(verbose=False)
    assert r.attempted > 0 and r.failed == 0


def test_readme_python_examples_run(tmp_path, monkeypatch):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_lowbit_torch_is_reachable_as_an_attribute():
    import lowbit.torch as lt

    assert lowbit.torch is lt
    with pytest.raises(AttributeError):
        lowbit.does_not_exist  # noqa: B018
