"""Grade a class's exercise notebooks: ``python -m course_lib grade``.

The steps, one module each:

- `submissions` finds each student's notebooks in the submissions folder,
  reads them as untrusted input and merges the student's answer cells into
  the released exercise notebook, whose check cells then record results
  instead of judging them.
- `worker` runs one student's merged notebooks in a separate process: pytest
  with nbval (and `nbval_plugin`) in a scratch copy of the student's folder,
  with time and memory limits and a cleared environment. `kernel` is the
  code that the check cells call inside the student's kernel.
- `scoring` awards the points in the grader's own process, from the JSON
  results (and weights files) that the student's process left, and writes
  the grade table, one feedback file per student and the terminal summary.
- `command` is the command line and runs the students in parallel.
"""
