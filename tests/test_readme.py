"""The README documents every setting, and only settings that exist."""

import re
from pathlib import Path

from service.settings import Settings

README = Path(__file__).parent.parent / "README.md"


def test_settings_table_matches_the_settings_class():
    documented = set(re.findall(r"`CHATLOOP_([A-Z0-9_]+)`", README.read_text()))
    fields = {name.upper() for name in Settings.model_fields}
    assert documented == fields
