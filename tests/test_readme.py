"""README's code runs: its Python blocks and the quickstart example."""
import importlib.util
import json
import pathlib
import re
import runpy

from cnn_numba import cli
from cnn_numba import train as T

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)  # the ONNX example writes a file
    for code in blocks:
        if "cnn_numba.onnx" in code and importlib.util.find_spec("onnx") is None:
            continue  # the onnx extra is not installed here
        exec(compile(code, "README.md", "exec"), {})


def test_quickstart_example_matches_references(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    diff = float(re.search(r"max \|diff\| = (\S+)", out).group(1))
    assert diff < 1e-4
    auto, fd = map(float, re.search(r"autograd (\S+), finite difference (\S+)", out).groups())
    assert abs(auto - fd) <= 1e-3 * max(1.0, abs(fd))


def test_readme_accuracies_are_the_checked_runs():
    """Each accuracy README quotes sits beside its command, and bench/accuracy.py reruns that
    command and checks that figure (and nothing else is quoted)."""
    accuracy = runpy.run_path(str(ROOT / "bench" / "accuracy.py"))
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if "`python -m cnn_numba train" in line and line.startswith("|")]
    quoted = {}
    for row in rows:
        command, figure = re.fullmatch(r"\|.*\| `(python -m cnn_numba train[^`]*)` \| (\d+\.\d\d)% \|", row).groups()
        quoted[command] = float(figure)
    assert quoted == {r.command: r.quoted for r in accuracy["RUNS"]}
    for r in accuracy["RUNS"]:
        assert r.quoted >= r.floor and (ROOT / "bench" / "results" / r.record).is_file(), r.name
        log = json.loads((ROOT / "bench" / "results" / r.record).read_text())
        assert f"{100 * log['test']['accuracy']:.2f}" == f"{r.quoted:.2f}", r.name
        # The record is a run of the command as the trainer resolves it today (recipes included).
        args = cli.build_parser().parse_args(r.command.split()[3:])
        given = {k: getattr(args, k) for k in T.RUN_KEYS if getattr(args, k) is not None}
        config = T._resolve(T.TrainConfig(**given, epochs=args.epochs))
        for k in (*T.RUN_KEYS, "epochs"):
            assert log["args"].get(k, getattr(config, k)) == getattr(config, k), (r.name, k)
        assert accuracy["check"](r, r.quoted) is None and accuracy["check"](r, r.floor - 0.01) is not None


def test_the_repository_cites_only_what_it_holds():
    """Docs and comments cite docs/ pages, not design notes outside the repository."""
    files = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("bench/*.md"),
             *ROOT.glob("cnn_numba/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]
    assert not [str(f.relative_to(ROOT)) for f in files if "SPEC" + ".md" in f.read_text()]
    for link in re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text()):
        assert (ROOT / link).is_file(), link
