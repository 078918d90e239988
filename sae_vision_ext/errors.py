"""Errors that mean "the user asked for something that cannot be done here", not "the program is broken".

``sae-vision`` prints them as one line and exits with code 2; library callers catch them like any exception.
Kept free of imports so every layer (and ``--help``) can use it.
"""


class UserError(Exception):
    """A request that cannot be carried out as given; the message names the problem and the way out."""
