"""Entry point of the ``kits-keras`` command.

Each command lives in its own module under ``cli/`` and imports the library
lazily, so ``kits-keras --help`` is fast and backend selection
(``--backend``) happens before Keras is imported.
"""

import importlib

import click

import kits_keras

if kits_keras.backend.cpu_only_host():
    # Before NumPy or TensorFlow start threads: see tune_allocator.
    kits_keras.backend.tune_allocator()

# (module under cli/, click command name in it)
COMMANDS = (
    ("infer", "infer"),
    ("postprocess", "postprocess"),
    ("evaluate", "evaluate"),
    ("synth", "synth"),
    ("prepare", "prepare"),
    ("export", "export"),
    ("fit", "fit"),
    ("demo", "demo"),
    ("show_batch", "show_batch"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(kits_keras.__version__, prog_name="kits-keras")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose):
    """Kidney and kidney-tumour segmentation on CT (KiTS19) with Keras 3."""
    from cli.common import setup_logging

    setup_logging(verbose)


for _module, _name in COMMANDS:
    main.add_command(getattr(importlib.import_module(f"cli.{_module}"), _name))
