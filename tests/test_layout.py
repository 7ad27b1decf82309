"""The package's shape as a user meets it: one top-level name, stages that
import only what they may, and one vocabulary between ranks and judge."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from fsdp_fuzz.data import Purpose, Status
from fsdp_fuzz.engines import ENGINES
from fsdp_fuzz.judge.known_issues import markdown_table

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path, **environment: str) -> subprocess.CompletedProcess:
    """In a fresh interpreter with only ``environment`` set."""
    command = [sys.executable, "-c", code]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def test_an_install_adds_one_top_level_name_and_leaves_a_users_models_package_alone(tmp_path):
    """A user's project with its own ``models`` package installs the fuzzer
    beside it: both import, each the right one."""
    site = tmp_path / "site"
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation, "--target", str(site), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    top_level = {path.name for path in site.iterdir() if not path.name.endswith(".dist-info")}
    assert top_level <= {"fsdp_fuzz", "bin"}, top_level
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "__init__.py").write_text("OWNER = 'the user'\n")
    both = run_python(
        "import models, fsdp_fuzz.models.spec, fsdp_fuzz.data\n"
        "assert models.OWNER == 'the user', models.__file__\n"
        "print(fsdp_fuzz.models.spec.__file__)",
        cwd=project,
        PYTHONPATH=f"{project}:{site}",
    )
    assert both.returncode == 0, both.stderr
    assert both.stdout.strip().startswith(str(site / "fsdp_fuzz" / "models"))


def test_the_judge_imports_no_torch():
    """Judging is pure: no process group, no torch.distributed, so recorded
    observations can be judged anywhere."""
    judged = run_python(
        "import sys\n"
        "import fsdp_fuzz.data, fsdp_fuzz.judge.orders, fsdp_fuzz.judge.oracles, fsdp_fuzz.judge.known_issues\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'torch'))",
        cwd=ROOT,
    )
    assert judged.returncode == 0, judged.stderr
    assert judged.stdout.strip() == "[]"


def test_the_ranks_speak_the_data_vocabulary():
    """One data model: ranks read the typed scenario and report typed
    outcomes, so the executor spells no status of its own and
    reads no scenario field by its JSON name; every engine's unit hooks
    serve one of the data module's purposes."""
    statuses = "|".join(status.value for status in Status)
    words = re.compile(rf"""["']({statuses})["']""")
    json_fields = re.compile(r"""(scenario|step|settings|node)\[["']""")
    for path in sorted((ROOT / "fuzz" / "execute").rglob("*.py")):
        source = path.read_text()
        assert not words.search(source), f"{path.relative_to(ROOT)} spells {words.search(source).group(0)}"
        assert not json_fields.search(source), f"{path.relative_to(ROOT)} reads {json_fields.search(source).group(0)}"
    assert {hook.purpose for hook in ENGINES["fsdp1"].unit_hooks} == set(Purpose)
    assert all(isinstance(hook.purpose, Purpose) for engine in ENGINES.values() for hook in engine.unit_hooks)


def test_the_readme_table_of_known_issues_is_generated_from_the_records():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- known-issues:start -->\n", 1)[1].split("\n<!-- known-issues:end -->", 1)[0]
    assert table == markdown_table(), (
        "README.md's known-issue table differs from the records; regenerate it with "
        'python -c "from fsdp_fuzz.judge.known_issues import markdown_table; print(markdown_table())"'
    )


def test_the_readme_tree_names_every_module_and_only_modules_that_exist():
    """The README's "How it works" is the map a contributor reads first: every module
    of ``fuzz/`` appears in its tree, and every file it names exists."""
    readme = (ROOT / "README.md").read_text()
    tree = readme.split("## How it works", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"[\w*]+\.py", tree))
    modules = {
        path.name
        for path in (ROOT / "fuzz").rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py") and not path.name.startswith("test_")
    }
    assert modules <= named, f"the README's tree does not name {sorted(modules - named)}"
    existing = {path.name for package in ("fuzz", "models") for path in (ROOT / package).rglob("*.py")}
    assert {name for name in named if "*" not in name} <= existing, sorted(named - existing)
