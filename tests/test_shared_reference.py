"""tests/shared_reference.py: a reference file that cannot be found fails the test, naming where
it looked (issue 8 item 7: the MuseCoco vocabulary check used to skip outside one layout)."""

import pytest

from tests.shared_reference import shared_file


def test_missing_reference_fails_naming_the_places(tmp_path, monkeypatch):
    monkeypatch.setenv("BOSSA_SHARED_DIR", str(tmp_path))
    with pytest.raises(
        pytest.fail.Exception, match=rf"shared/reference/none.json not found in {tmp_path}"
    ):
        shared_file("reference/none.json")
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "none.json").write_text("{}")
    assert shared_file("reference/none.json") == tmp_path / "reference" / "none.json"
