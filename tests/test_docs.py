"""The README and docs/ as a reader uses them: the commands marked as runnable offline run as written,
every link to a file or heading of the repository leads somewhere, and the README stays short.

A fenced block whose info string is `sh offline` holds commands that need no account, network or GPU
(`--help`, `--dry-run`, ...): each line is run with bash from the repository's root, as a reader would
paste it, and must exit 0 without a traceback. Other blocks (gcloud, a real table, a long training) are
shown, never run.
"""
import re
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
