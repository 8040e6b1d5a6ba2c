"""`make breaking` (part of `make lint`): scripts/buf-breaking.sh runs `buf breaking`
against where the branch left main, and in a fresh clone of main against its
previous commit. Checked on temporary git repositories holding a copy of the
contract, and on the project's own tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "buf-breaking.sh"
REMOVED_FIELD = "  string phone_masked = 2;\n"


def buf() -> str:
    path = ROOT / "node_modules" / ".bin" / "buf"
    if not path.exists():
        pytest.fail("buf is missing: `make lint` installs it (npm ci)")
    return str(path)


def git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.invalid",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.invalid",
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
    )
    return env


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=repo, env=git_env(), capture_output=True, text=True, check=True
    )
    return done.stdout


def run_check(repo: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = git_env() | {"BUF": buf()} | extra
    return subprocess.run(
        ["sh", "scripts/buf-breaking.sh"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with the contract, buf.yaml and the script on main."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "protos", repo / "protos")
    shutil.copy(ROOT / "buf.yaml", repo / "buf.yaml")
    (repo / "scripts").mkdir()
    shutil.copy(SCRIPT, repo / "scripts" / "buf-breaking.sh")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "contract")
    return repo


def remove_field(repo: Path) -> None:
    resources = repo / "protos" / "phonebind" / "v1" / "resources.proto"
    text = resources.read_text()
    assert REMOVED_FIELD in text
    resources.write_text(text.replace(REMOVED_FIELD, "", 1))


def add_field(repo: Path) -> None:
    resources = repo / "protos" / "phonebind" / "v1" / "resources.proto"
    text = resources.read_text()
    assert "message Account {\n" in text
    resources.write_text(
        text.replace("message Account {\n", "message Account {\n  string nickname = 99;\n", 1)
    )


def commit(repo: Path, message: str) -> None:
    git(repo, "commit", "-q", "-am", message)


def test_a_branch_that_removes_a_field_fails(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    remove_field(repo)
    commit(repo, "drop phone_masked")
    done = run_check(repo)
    assert done.returncode != 0, done.stdout + done.stderr
    assert 'Previously present field "2" with name "phone_masked"' in done.stdout + done.stderr
    assert "where this branch left main" in done.stdout


def test_a_branch_compares_with_its_merge_base_not_with_a_newer_main(repo: Path) -> None:
    """A field main added after the branch started is not the branch's deletion."""
    git(repo, "checkout", "-q", "-b", "feature")
    (repo / "README").write_text("unrelated\n")
    git(repo, "add", "README")
    commit(repo, "unrelated")
    git(repo, "checkout", "-q", "main")
    add_field(repo)
    commit(repo, "add nickname")
    git(repo, "checkout", "-q", "feature")
    assert run_check(repo).returncode == 0
    # Against the tip of main, the same tree reads as a removal.
    against_main = run_check(repo, BUF_BREAKING_AGAINST="main")
    assert against_main.returncode != 0
    assert "nickname" in against_main.stdout + against_main.stderr


def test_an_added_field_passes(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    add_field(repo)
    commit(repo, "add nickname")
    done = run_check(repo)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "where this branch left main" in done.stdout


def test_a_fresh_clone_of_main_checks_its_last_commit(repo: Path, tmp_path: Path) -> None:
    remove_field(repo)
    commit(repo, "drop phone_masked")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    done = run_check(clone)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "HEAD~1" in done.stdout
    assert "phone_masked" in done.stdout + done.stderr


def test_uncommitted_changes_on_main_are_checked_against_head(repo: Path) -> None:
    remove_field(repo)
    done = run_check(repo)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "uncommitted" in done.stdout


def test_nothing_to_compare_with_is_said_plainly(repo: Path, tmp_path: Path) -> None:
    done = run_check(repo)
    assert done.returncode == 0
    assert "skipped" in done.stdout and "nothing to compare with" in done.stdout
    # A shallow clone of main has no parent either.
    remove_field(repo)
    commit(repo, "drop phone_masked")
    shallow = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow))
    done = run_check(shallow)
    assert done.returncode == 0
    assert "skipped" in done.stdout


def test_the_project_contract_passes() -> None:
    done = subprocess.run(
        ["sh", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "buf breaking: " in done.stdout


def test_make_lint_runs_it() -> None:
    done = subprocess.run(
        ["make", "-n", "lint", "breaking"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("scripts/buf-breaking.sh") == 2
