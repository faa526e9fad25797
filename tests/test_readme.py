"""The README's Python examples are part of the API contract: they must run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_reuse_example_runs():
    block = next(b for b in _python_blocks() if "build_model" in b)
    exec(compile(block, str(README), "exec"), {})


def test_architecture_table_matches_the_registry():
    from cardinal import build_model, list_archs, model_cost

    row = re.compile(r"^\| `(\w+)` \|.*?\| ([\d,]{5,}) \| [\d.]+ \|", re.M)
    rows = dict(row.findall(README.read_text()))
    assert set(rows) == set(list_archs())
    for name in ("resnet50", "resnext50_flat128", "tiny_resnet"):
        assert int(rows[name].replace(",", "")) == model_cost(build_model(name)).params
