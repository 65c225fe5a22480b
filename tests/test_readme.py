"""README's code runs: its Python blocks and the quickstart example."""
import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_quickstart_example_matches_references(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    diff = float(re.search(r"max \|diff\| = (\S+)", out).group(1))
    assert diff < 1e-4
    auto, fd = map(float, re.search(r"autograd (\S+), finite difference (\S+)", out).groups())
    assert abs(auto - fd) <= 1e-3 * max(1.0, abs(fd))
