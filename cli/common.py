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
