"""The committed generated code matches the protos (run `make proto` when this fails)."""

from __future__ import annotations

import filecmp
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
GENERATED = ROOT / "client" / "phonebind" / "v1"


def test_committed_generated_code_is_current(tmp_path):
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "protos").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "protos",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        cwd=ROOT,
        check=True,
    )
    fresh = tmp_path / "phonebind" / "v1"
    generated = sorted(p.name for p in fresh.iterdir())
    committed = sorted(
        p.name for p in GENERATED.iterdir() if p.name not in ("__init__.py", "__pycache__")
    )
    assert generated == committed, (
        "generated files differ from the committed ones: run `make proto`"
    )
    stale = [
        name for name in generated if not filecmp.cmp(fresh / name, GENERATED / name, shallow=False)
    ]
    assert not stale, f"stale generated code {stale}: run `make proto`"


def test_error_reasons_in_proto_match_the_domain():
    from phonebind.v1 import errors_pb2
    from phonebind_server.domain.errors import Reason
    from phonebind_server.rpc.errors import STATUS_FOR_REASON, TRANSPORT_REASONS

    in_proto = {
        name.removeprefix("ERROR_REASON_")
        for name in errors_pb2.ErrorReason.keys()
        if name != "ERROR_REASON_UNSPECIFIED"
    }
    assert in_proto == {r.value for r in Reason} | TRANSPORT_REASONS
    assert set(STATUS_FOR_REASON) == set(Reason)


def test_cn_province_table_matches_the_installed_geocoder():
    """cn_provinces.py is phonenumbers' geocoder data, boiled down; regenerate when stale."""
    import random

    import phonenumbers
    from phonenumbers import geocoder

    from phonebind_server.domain import cn_provinces
    from phonebind_server.domain.phone import parse_phone, province_code
    from phonebind_server.domain.regions import PROVINCE_NAMES

    assert cn_provinces.PHONENUMBERS_VERSION == phonenumbers.__version__, (
        "phonenumbers changed: run scripts/gen_cn_provinces.py"
    )
    rng = random.Random(7)
    checked = 0
    for _ in range(3000):
        national = "1" + rng.choice("3456789") + "".join(rng.choice("0123456789") for _ in range(9))
        number = phonenumbers.parse(national, "CN")
        if not phonenumbers.is_valid_number(number):
            continue  # unassigned ranges are not mobiles
        phone = parse_phone(national)
        described = geocoder.description_for_number(phonenumbers.parse(phone.e164), "zh")
        expected = next(
            (code for code, name in PROVINCE_NAMES.items() if described.startswith(name)), None
        )
        assert province_code(phone) == expected, phone.masked()
        checked += 1
    assert checked > 1000
