"""lmms-eval integration of tokenpress: the ``tokenpress`` model and a local shapes task.

* :mod:`tokenpress_lmms_eval.model`: the lmms-eval model that answers with a stack attached;
* :mod:`tokenpress_lmms_eval.registration`: what lmms-eval's ``lmms_eval.models`` entry point loads;
* :mod:`tokenpress_lmms_eval.shapes_task`: writes the shapes benchmark as a local lmms-eval task, and
  the task's document and scoring functions.
"""

__version__ = "0.1.0"
