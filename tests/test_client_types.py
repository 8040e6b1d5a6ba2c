"""The client package is typed: mypy --strict passes on it, and both clients'
methods have the same signatures, the asyncio ones returning awaitables."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "client" / "pyproject.toml"


def mypy(tmp_path: pathlib.Path, *paths: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--strict", "--config-file", str(CONFIG)),
            *("--cache-dir", str(tmp_path / "mypy-cache"), "--no-color-output"),
            *paths,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        # The editable install is an import hook mypy does not follow.
        env={**os.environ, "MYPYPATH": str(ROOT / "client")},
        timeout=300,
    )


def test_the_client_package_passes_mypy_strict(tmp_path):
    done = mypy(tmp_path, "client/phonebind_client")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("Success: no issues found")


def test_both_clients_have_the_same_typed_methods(tmp_path):
    use = tmp_path / "use_clients.py"
    use.write_text(
        textwrap.dedent(
            """
            from phonebind_client import AsyncPhonebindClient, PhonebindClient

            def blocking(pb: PhonebindClient) -> None:
                reveal_type(pb.start_rebind)
                reveal_type(pb.complete_rebind("a", "r").account)
                pb.verify_code("a", "r", "old", 123456)
                reveal_type(pb.approve_rebind)
                reveal_type(pb.with_options(on_behalf_of="alice").get_review("r").signals[0])

            async def awaited(pb: AsyncPhonebindClient) -> None:
                reveal_type(pb.start_rebind)
                reveal_type((await pb.complete_rebind("a", "r")).account)
                await pb.verify_code("a", "r", "old", 123456)
                async for change in pb.iter_binding_history("a"):
                    reveal_type(change)
                reveal_type(pb.approve_rebind)
                async for case in pb.iter_reviews(readiness="ready"):
                    reveal_type(case)
            """
        ),
        encoding="utf-8",
    )
    out = mypy(tmp_path, str(use)).stdout
    signature = (
        "def (account_id: str, new_phone: str, *, old_phone_lost: bool =, "
        "request_id: str | None =, timeout: float | None =) -> "
    )
    assert f'Revealed type is "{signature}phonebind.v1.resources_pb2.Rebind"' in out
    awaitable = "typing.Coroutine[Any, Any, phonebind.v1.resources_pb2.Rebind]"
    assert f'Revealed type is "{signature}{awaitable}"' in out
    assert out.count('Revealed type is "phonebind.v1.resources_pb2.Account"') == 2
    assert 'Revealed type is "phonebind.v1.resources_pb2.BindingChange"' in out
    approve = "def (rebind_id: str, *, note: str =, timeout: float | None =) -> "
    case = "phonebind.v1.review_service_pb2.ReviewCase"
    assert f'Revealed type is "{approve}{case}"' in out
    assert f'Revealed type is "{approve}typing.Coroutine[Any, Any, {case}]"' in out
    assert f'Revealed type is "{case}"' in out
    assert 'Revealed type is "phonebind.v1.review_service_pb2.RiskSignal"' in out
    # A code passed as a number is caught by either client's signature.
    assert out.count('Argument 4 has incompatible type "int"; expected "str"') == 2, out
