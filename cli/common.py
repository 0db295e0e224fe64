"""Shared CLI plumbing: turning library errors into one-line messages."""

import functools
import logging

import click


class UserError(click.ClickException):
    """One line on stderr, exit code 1."""

    exit_code = 1


def user_errors(fn):
    """Reports expected failures (bad files, bad options) as one line.

    Library code raises ``CaseError`` (bad input files), ``ValueError``
    (bad arguments) and ``FileNotFoundError``; the user sees ``Error: ...``
    and the exit code is 1. Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from kits_keras.io import CaseError

        try:
            return fn(*args, **kwargs)
        except (CaseError, ValueError, FileNotFoundError) as err:
            raise UserError(str(err)) from None

    return wrapper


def setup_logging(verbose):
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
    )


def backend_option(extra_help=""):
    """The ``--backend`` option every command that runs the network takes.

    The choice is applied with :func:`kits_keras.backend.select_backend`
    before Keras is imported.
    """
    from kits_keras.backend import BACKENDS

    return click.option(
        "--backend", type=click.Choice(BACKENDS), default="auto",
        show_default=True,
        help="Keras backend; auto = JAX with an accelerator, TensorFlow on "
        "CPU-only hosts (faster 3-D convolutions)." + extra_help)
