"""Every place where this package works around, or leans on a private detail of, SAELens 6.

One module, so that a SAELens upgrade touches one file. Each workaround names the SAELens behaviour it works
around; ``tests/test_saelens_compat.py`` pins that behaviour, so an upgrade that fixes it upstream shows up as a
failing test there (then delete the workaround).
"""
