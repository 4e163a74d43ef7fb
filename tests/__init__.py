"""mailgate's tests: the layout and the helpers to reuse are in tests/README.md."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's root
