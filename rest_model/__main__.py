"""`python -m rest_model`: the inference commands (generate, export) and the stages of the wings.

This file is the one place where the core's command line meets the data, training and evaluation
wings: each module below adds its sub-commands with `register(sub)`.
"""
import sys

from . import cli
from .data import prepare, synth
from .eval import evaluate
from .train import asd, student_init, sync, teacher, vae

WINGS = (vae, teacher, student_init, asd, sync, synth, prepare, evaluate)


def main(argv=None) -> int:
    return cli.main(argv, WINGS)


if __name__ == "__main__":
    sys.exit(main())
