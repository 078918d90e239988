"""``python -m sae_vision_ext.quickstart``: the same as ``sae-vision quickstart`` (see
:mod:`sae_vision_ext.commands.quickstart`)."""

import sys

from sae_vision_ext.commands.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
