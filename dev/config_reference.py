"""Regenerate docs/config.md from dermray/config.py: `python dev/config_reference.py`."""

from pathlib import Path

from dermray.config import config_reference

target = Path(__file__).resolve().parent.parent / "docs" / "config.md"
target.write_text(config_reference())
print(f"wrote {target}")
