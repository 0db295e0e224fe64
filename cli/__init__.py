"""The ``kits-keras`` command line: one thin module per command."""
