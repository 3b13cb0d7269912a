"""Coverage-guided fuzzing of one target with atheris (pip install atheris): run_atheris.py TARGET [libFuzzer args]."""

import sys

import atheris

with atheris.instrument_imports():
    from targets import TARGETS  # noqa: E402

if __name__ == "__main__":
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
