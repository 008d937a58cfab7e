"""The README documents every variable the program reads."""

from containerboot.settings import FILE_VARIABLES, VARIABLES
from tests.conftest import ROOT


def test_readme_lists_every_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [v for v in [*VARIABLES, *FILE_VARIABLES] if f"`{v}`" not in readme]
    assert not missing
