"""hrseg: full-resolution 3D segmentation with spatial partitioning (see the README).

Importing hrseg changes nothing in the process: the entry points (the ``hrseg`` command,
``pipeline.notebook_setup()``, the tests' conftest) configure it with ``hrseg.runtime.start``.
"""
