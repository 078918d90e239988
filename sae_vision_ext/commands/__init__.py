"""Every ``sae-vision`` subcommand: its flags (from a config dataclass, see :mod:`._common`) and its ``main``.

Library modules hold no argparse; each module here turns flags into a config, calls the library, prints.
"""
