"""The course machinery: exercise checks, the notebook build and the ``moe-learn`` command.

    checks/            one module per chapter: each exercise's check
    exercises.py       every exercise of the course, with its hints
    notebook_build.py  notebooks/ from solutions/ (answers -> stubs)
    progress.py        run a learner's notebooks and judge each exercise
    doctor.py          is everything installed?
    cli.py             ``moe-learn doctor | progress | hint | reset | bench``
"""
