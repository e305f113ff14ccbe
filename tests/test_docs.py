"""The README and docs/ as a reader uses them: the commands marked as runnable offline run as written,
every link to a file or heading of the repository leads somewhere, and the README stays short.

A fenced block whose info string is `sh offline` holds commands that need no account, network or GPU
(`--help`, `--dry-run`, ...): each line is run with bash from the repository's root, as a reader would
paste it, and must exit 0 without a traceback. Other blocks (gcloud, a real table, a long training) are
shown, never run.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def offline_commands():
    for page in PAGES:
        for info, body in FENCE.findall(page.read_text()):
            if info.split() == ["sh", "offline"]:
                for line in body.splitlines():
                    if line.strip() and not line.lstrip().startswith("#"):
                        yield pytest.param(line.strip(), id=f"{page.relative_to(ROOT)}: {line.strip()}")


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    text = FENCE.sub("", page.read_text())
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_there_are_offline_commands_in_every_stage_page():
    marked = {p.name for p in PAGES for info, _ in FENCE.findall(p.read_text()) if info.split() == ["sh", "offline"]}
    assert {"README.md", "data.md", "finetune.md", "benchmarks.md"} <= marked


@pytest.mark.parametrize("command", list(offline_commands()))
def test_offline_command_runs_as_written(command):
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    if command.endswith("--help"):
        assert result.stdout.startswith("usage:"), result.stdout[:500]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_lead_somewhere(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # https://, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading in {linked.relative_to(ROOT)}")
    assert not broken, broken


def test_readme_is_short_and_each_docs_page_starts_with_what_you_do():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    for page in PAGES[1:]:
        first = re.search(r"^## (.+)$", page.read_text(), re.M)
        assert first and first.group(1).startswith("What you do"), f"{page.name}: {first and first.group(1)}"


# -- what the docs name exists: make targets, and each flag given to one of the project's commands

CODE_SPAN = re.compile(r"`([^`\n]+)`")
CLI = re.compile(r"(?:\.venv(?:-gpu)?/bin/)?python3? (-m [a-z_.]+|(?:bench|scripts)/[a-z_]+\.py)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def code(page):
    """The page's code: each fenced block's lines (a line ending in \\ joined with the next), and each
    inline code span."""
    text = page.read_text()
    for _, body in FENCE.findall(text):
        yield from body.replace("\\\n", " ").splitlines()
    yield from CODE_SPAN.findall(FENCE.sub("", text))


def make_targets():
    return set(re.findall(r"^([a-z][a-z0-9-]*):(?!=)", (ROOT / "Makefile").read_text(), re.M))


def test_make_targets_named_in_the_docs_exist():
    named = {(page.name, target) for page in PAGES for line in code(page)
             for target in re.findall(r"(?:^|[\s(])make ([a-z][a-z0-9-]*)", line)}
    assert {"demo", "test", "setup-gpu", "bench"} <= {t for _, t in named}
    assert not [(page, t) for page, t in named if t not in make_targets()]


def commands(line):
    """(command, its part of the line) for each of the project's commands on a line of code; the part
    ends where the shell's next command or a comment starts."""
    found = list(CLI.finditer(line))
    for i, match in enumerate(found):
        end = found[i + 1].start() if i + 1 < len(found) else len(line)
        part = re.split(r"\s#|[|;&<>]|\$\(", line[match.end():end])[0]
        yield match.group(1).removeprefix("-m "), part


_help = {}


def flags_of(command):
    """The flags a command's --help lists (finetune.cloud passes the training's flags on)."""
    if command not in _help:
        cmd = ["-m", command] if "/" not in command else [command]
        result = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), *cmd, "--help"], cwd=ROOT,
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0 and result.stdout.startswith("usage:"), (command, result.stderr[-2000:])
        _help[command] = set(FLAG.findall(result.stdout)) | {"--help"}
        if command == "finetune.cloud":
            _help[command] |= flags_of("finetune")
    return _help[command]


NO_FLAGS = {"app"}  # python -m app has no flags: it reads the environment


def test_flags_given_to_the_projects_commands_exist():
    unknown, checked = [], 0
    for page in PAGES:
        for line in code(page):
            for command, part in commands(line):
                if command in NO_FLAGS:
                    continue
                checked += 1
                unknown += [f"{page.name}: {command} {flag}" for flag in FLAG.findall(part)
                            if flag not in flags_of(command)]
    assert checked > 50
    assert not unknown, unknown


def other_python():
    return next(filter(None, map(shutil.which, ["python3.13", "python3.12", "python3.10", "python3.9"])), None)


@pytest.mark.parametrize("which", ["missing", "another version"])
def test_make_setup_gpu_needs_python_311(which):
    # docs/finetune.md: make setup-gpu needs Python 3.11 (TensorFlow 2.15's wheels stop there); a Python
    # that is missing or of another version is named in one line before anything is installed.
    python = "/no/such/python3.11" if which == "missing" else other_python()
    if python is None:
        pytest.skip("no Python but 3.11 on this machine")
    result = subprocess.run(["make", "-s", "-C", str(ROOT), "setup-gpu", f"GPU_PYTHON={python}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.startswith("make setup-gpu needs Python 3.11"), result.stderr
    assert python in result.stderr.splitlines()[0]
    assert not (ROOT / ".venv-gpu").exists()


def test_the_native_apis_parameter_table_is_the_servers():
    """docs/serving.md's table of `/`'s parameters: the names in app/params.py's order, their defaults
    and their ranges (with GPT-2's n_ctx and n_vocab put in for the names)."""
    from app.params import parameters

    n_ctx, n_vocab = 1024, 50257
    table = parameters(n_ctx, n_vocab)
    section = (ROOT / "docs" / "serving.md").read_text().split("## The native API")[1].split("\n\n")[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \|", section, re.M)
    assert [name for name, _, _ in rows] == list(table)
    words = {"true": True, "false": False, "none": None, "random": None, '""': ""}
    for name, default, allowed in rows:
        limits = table[name].limits()
        first = default.split()[0]
        if first in words:
            assert (words[first], type(words[first])) == (limits["default"], type(limits["default"])), name
        else:
            assert float(first) == limits["default"], name
        bounds = re.match(r"([\d.]+) to ([\w.−-]+)", allowed.strip())
        if bounds:
            top = bounds.group(2).replace("n_ctx−1", str(n_ctx - 1)).replace("n_vocab", str(n_vocab))
            assert (float(bounds.group(1)), float(top)) == (limits["min"], limits["max"]), name
        elif chars := re.match(r"≤ (\d+) characters", allowed.strip()):
            assert int(chars.group(1)) == limits["max_chars"], name
