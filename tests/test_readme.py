"""The README's Python examples are part of the API contract: they must run as written."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = (README, ROOT / "benchmarks" / "RECIPE_TUNING.md")  # every command in these must parse


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_reuse_example_runs():
    block = next(b for b in _python_blocks() if "build_model" in b)
    exec(compile(block, str(README), "exec"), {})


def test_the_summary_demo_prints_what_the_readme_shows_and_reads_the_same_from_python(tmp_path, monkeypatch,
                                                                                        capsys):
    from cardinal import summary
    from cardinal.cli import run

    demo = next(b for b in _python_blocks() if "write_run" in b)
    api = next(b for b in _python_blocks() if "summarize(" in b)
    shown = re.search(r"`COLUMNS=80 python -m cardinal.summary runs/demo` prints:\n\n```text\n(.*?)```",
                      README.read_text(), flags=re.S).group(1)
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    exec(compile(demo, str(README), "exec"), {})
    with pytest.raises(SystemExit) as done:
        run(summary.main, ["runs/demo"])
    assert done.value.code == 0 and capsys.readouterr().out == shown
    exec(compile(api, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("best: tiny_resnext (seed, fp32), 72.77% ± 2.39 over 3 seeds\n")
    assert "+0.73 points, not distinguishable at 95%" in printed and "0.01" in printed


def test_architecture_table_matches_the_registry():
    from cardinal import build_model, list_archs, model_cost

    row = re.compile(r"^\| `(\w+)` \|.*?\| ([\d,]{5,}) \| [\d.]+ \|", re.M)
    rows = dict(row.findall(README.read_text()))
    assert set(rows) == set(list_archs())
    for name in ("resnet50", "resnext50_flat128", "tiny_resnet"):
        assert int(rows[name].replace(",", "")) == model_cost(build_model(name)).params


def test_every_repository_path_the_docs_name_exists():
    for doc in DOCS:
        named = set(re.findall(r"`((?:cardinal|benchmarks|launch|tests|\.ci)/[\w./-]*\w)`", doc.read_text()))
        assert named, doc
        missing = sorted(path for path in named if not (ROOT / path).exists())
        assert not missing, f"{doc.name} names files that do not exist: {missing}"


# --- every command of the docs parses with its exact flags; the cheap ones run for real -------------------

LAUNCH_VALUES = ("--num_processes", "--num_machines", "--mixed_precision", "--dynamo_backend")


def readme_commands():
    """(launcher tokens, module, arguments, source line) of every ``-m cardinal.X`` command in a bash block of
    the docs; line continuations joined, shell variables and loop variables replaced by their (first) value."""
    found = []
    blocks = [block for doc in DOCS for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S)]
    for block in blocks:
        variables = {}
        for line in block.replace("\\\n", " ").splitlines():
            for name, value in re.findall(r"\bfor (\w+) in (\S+)", line):
                variables[name] = value
            line = re.sub(r"\$(\w+)", lambda m, known=variables: known.get(m[1], m[0]), line)
            tokens = shlex.split(line, comments=True)
            if len(tokens) == 1 and re.fullmatch(r"\w+=.*", tokens[0]):  # NAME=value on a line of its own
                name, value = tokens[0].split("=", 1)
                variables[name] = value
                continue
            command = []
            for token in [*tokens, ";"]:
                if token not in ("&&", ";", "|", "do", "done"):
                    command.append(token)
                    continue
                if "-m" in command and command.index("-m") + 1 < len(command) \
                        and command[command.index("-m") + 1].startswith("cardinal."):
                    at = command.index("-m")
                    found.append((command[:at], command[at + 1], command[at + 2:], line.strip()))
                command = []
    return found


def parse_command(module, args):
    """Parse ``args`` as ``python -m module`` would (study passes what it does not know to train)."""
    import importlib

    from cardinal import train

    if module == "cardinal.study":
        if "--" in args:
            args, passthrough = args[:args.index("--")], args[args.index("--") + 1:]
        else:
            passthrough = []
        _, unknown = importlib.import_module(module).build_parser().parse_known_args(args)
        train.build_parser().parse_args(unknown + passthrough)
    else:
        importlib.import_module(module).build_parser().parse_args(args)


def test_every_readme_command_parses_and_no_launch_warns(capsys):
    from accelerate.commands.launch import launch_command_parser

    commands = readme_commands()
    modules = {module for _, module, _, _ in commands}
    assert {"cardinal.train", "cardinal.study", "cardinal.summary", "cardinal.export", "cardinal.bench",
            "cardinal.profile"} <= modules
    for launcher, module, args, line in commands:
        try:
            parse_command(module, args)
        except SystemExit:
            pytest.fail(f"README command does not parse: {line}\n{capsys.readouterr().err}")
        if module == "cardinal.study" and "--launcher" in args:  # the launcher the study starts runs with
            launcher = shlex.split(args[args.index("--launcher") + 1])
        if "accelerate" in launcher:
            at = launcher.index("accelerate")
            assert launcher[at + 1] == "launch", line
            flags = launcher[at + 2:]
            # accelerate warns about every value that neither a config file nor a flag gives
            assert "--config_file" in flags or all(flag in flags for flag in LAUNCH_VALUES), line
            if "--config_file" in flags:
                assert (README.parent / flags[flags.index("--config_file") + 1]).is_file(), line
            launch_command_parser().parse_args([*flags, "-m", module, *args])
        else:
            assert launcher[-1] in ("python", "python3"), line


@pytest.mark.slow
def test_the_readmes_small_training_command_runs_on_generated_cifar(cifar_dir, tmp_path):
    from conftest import cli, output_tail

    launcher, module, args, line = next(c for c in readme_commands()
                                        if c[1] == "cardinal.train" and "tiny_resnet" in c[2] and "--data-dir" in c[2])
    assert launcher == ["python"]
    args = [str(cifar_dir) if a == "../shared/data/cifar10-sample" else a for a in args]
    done = cli(module, [*args, "--no-progress", "--limit-batches", "1", "--no-export", "--output-dir", str(tmp_path)])
    assert done.returncode == 0, output_tail(done)
    runs = list(tmp_path.glob("*/epochs.csv"))
    assert len(runs) == 1 and "Records" in done.stdout and "…" not in done.stdout
    assert "were not passed" not in done.stdout + done.stderr
